"""The inference engine on a mesh: sharded over 8 simulated CPU devices (fsdp 4 x tensor 2) it
generates the tokens one device does and scores alike, with params placed once and the params and
KV cache actually sharded.

The device checks run once in a subprocess (this file run as a script with
--xla_force_host_platform_device_count=8), so the pytest process keeps its single device.
"""
import functools
import os
import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hrmtext.infer import Engine, Sampling
from hrmtext.model import ModelConfig, build_model
from hrmtext.parallel.mesh import inference_mesh
from hrmtext import checkpoint
from hrmtext.run import Run
from tests.device_checks import DeviceChecks

MESH = SimpleNamespace(data=1, fsdp=4, tensor=2)
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16, intermediate_size=64,
                  layers_per_stack=1, H_cycles=1, L_cycles=1)  # L then H: quick to compile
EOA = 3
device_check = DeviceChecks(__file__)


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, CFG.vocab_size, n).tolist() for n in lengths]


@functools.cache
def engines():
  """(one-device engine, sharded engine) on the same weights; 2 slots for 6 requests (rounded
  up to 4 on the mesh): finished rows are refilled mid-flight."""
  model = build_model(CFG)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0))))  # compiles nothing
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype), shapes)
  kwargs = dict(eoa=EOA, slots=2, max_len=48)
  return (Engine(model, params, **kwargs),
          Engine(model, params, mesh=inference_mesh(MESH), **kwargs))


@device_check
def sharded_engine_generates_and_scores_as_one_device():
  one, sharded = engines()
  assert len(one.mesh.devices.flat) == 1 and dict(sharded.mesh.shape) == dict(
      data=1, fsdp=4, tensor=2)
  requests, limits = prompts([5, 11, 2, 7, 16, 3]), [6, 9, 4, 12, 5, 8]  # one prompt bucket
  held = sharded.params
  for sampling, seed in ((Sampling(), 0), (Sampling(1.0, 0.9), 7)):
    want = one.generate(requests, limits, sampling, seed=seed)
    assert sharded.generate(requests, limits, sampling, seed=seed) == want, sampling
  scored = [(p, g + [EOA]) for p, g in zip(requests, want)]
  for (lp_one, n_one, g_one), (lp, n, g) in zip(one.score(scored, 4), sharded.score(scored, 3)):
    assert (n, g) == (n_one, g_one)
    assert abs(lp - lp_one) <= 1e-5 * max(1.0, abs(lp_one))
  assert sharded.params is held  # placed once: calls neither copy nor replace them


@device_check
def params_and_cache_are_sharded_and_placed_once():
  _, sharded = engines()
  leaves = jax.tree.leaves(sharded.params)
  assert all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and
             x.sharding.mesh == sharded.mesh for x in leaves)
  assert sharded.params['embed']['embedding'].sharding.spec == P('tensor', 'fsdp')
  gqkv = sharded.params['L']['layers']['attn']['gqkv']  # [layers, hidden, 4, heads, head_dim]
  assert gqkv.sharding.spec == P(None, 'fsdp', None, 'tensor', None)
  assert gqkv.addressable_shards[0].data.shape == (1, 8, 4, 1, 16)
  # Params already on the mesh with their shardings (a training state's) are used as they lie.
  again = Engine(sharded.model, sharded.params, eoa=EOA, mesh=sharded.mesh)
  assert all(a is b for a, b in zip(jax.tree.leaves(again.params), leaves))
  state = sharded._init_state()
  assert sharded.slots == 4
  for entry in jax.tree.leaves(state['cache']):  # [layers, slots, heads, length, head_dim]
    assert entry.sharding.spec == P(None, ('data', 'fsdp'), 'tensor', None, None)
    assert {s.data.shape for s in entry.addressable_shards} == {(1, 1, 1, 48, 16)}
  assert state['segment_ids'].sharding.spec == P(('data', 'fsdp'))


@device_check
def checkpoint_loads_straight_onto_the_mesh_of_the_flags():
  """generate/score/evaluate's --mesh.* flags reach text.load, which restores onto the mesh."""
  workdir = os.path.join(os.environ['TEST_TMPDIR'], 'run')
  one, _ = engines()
  saved = jax.device_get(one.params)
  mngr = Run(workdir).manager(async_save=False)
  checkpoint.save(mngr, 1, meta={'model': CFG.to_dict()}, params=saved)
  mngr.close()
  # A command line, as an entry point sees it: ml_collections defines the --mesh.* overrides it
  # finds in sys.argv when the flag is defined.
  sys.argv = ['generate', f'--checkpoint={workdir}', '--mesh.fsdp=4', '--mesh.tensor=2']
  from absl import flags  # pylint: disable=import-outside-toplevel
  from hrmtext.infer import flags as infer_flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS(sys.argv)
  engine, _, _ = infer_flags.load(need_tokenizer=False)
  assert dict(engine.mesh.shape) == dict(data=1, fsdp=4, tensor=2)
  assert jax.tree.map(lambda x: x.sharding, engine.params) == engine.param_shardings
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(engine.params), saved)


@pytest.fixture(scope='module')
def device_check_output(tmp_path_factory):
  return device_check.output(TEST_TMPDIR=str(tmp_path_factory.mktemp('mesh')))


@pytest.mark.parametrize('name', list(device_check.checks))
def test_on_8_cpu_devices(name, device_check_output):
  device_check.assert_passed(name, device_check_output)


if __name__ == '__main__':
  device_check.run()
