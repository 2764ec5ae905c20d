"""Mesh, logical axis rules and batch sharding on 8 simulated CPU devices.

The device checks run once in a subprocess (this file run as a script with
--xla_force_host_platform_device_count=8), so the pytest process keeps its single device.
"""
import os
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hrmtext.parallel import distributed
from hrmtext.parallel import mesh as mesh_lib
from hrmtext.parallel import sharding
from hrmtext.training import optimizer
from tests.device_checks import DeviceChecks

device_check = DeviceChecks(__file__)


def mesh_cfg(data, fsdp, tensor):
  return SimpleNamespace(data=data, fsdp=fsdp, tensor=tensor)


class TinyModel(nn.Module):
  """Params carrying each logical axis; activations constrained by logical names."""

  @nn.compact
  def __call__(self, tokens):
    init = nn.initializers.normal(1.0)

    def param(name, axes, shape):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape)

    embedding = param('embedding', ('vocab', 'embed'), (16, 8))
    up = param('up', ('layers', 'embed', 'mlp'), (2, 8, 12))
    heads = param('heads', ('embed', 'heads', 'head_dim'), (8, 4, 2))
    scale = self.param('scale', init, (8,))  # no axis metadata: replicated
    x = nn.with_logical_constraint(embedding[tokens] * scale,
                                   ('act_batch', 'act_length', 'act_embed'))
    hidden = nn.with_logical_constraint(jnp.tanh(x @ up[0]), ('act_batch', 'act_length', 'act_mlp'))
    x = x + hidden @ up[1].T + jnp.einsum('ble,ehd->bl', x, heads)[..., None]
    return nn.with_logical_constraint(x @ embedding.T, ('act_batch', 'act_length', 'act_vocab'))


def test_mesh_shape_fills_one_axis_and_rejects_bad_shapes():
  assert mesh_lib.mesh_shape(mesh_cfg(2, -1, 2), 8) == (2, 2, 2)
  assert mesh_lib.mesh_shape(mesh_cfg(-1, 1, 1), 16) == (16, 1, 1)
  assert mesh_lib.mesh_shape(mesh_cfg(1, 2, 4), 8) == (1, 2, 4)
  for bad, devices in [((3, 1, 1), 8), ((-1, -1, 1), 8), ((3, -1, 1), 8), ((0, 1, 8), 8),
                       ((2, 2, 2), 4)]:
    with pytest.raises(ValueError, match='mesh data='):
      mesh_lib.mesh_shape(mesh_cfg(*bad), devices)


def test_initialize_is_a_noop_for_a_single_process(monkeypatch):
  for var in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_STEP_NUM_TASKS'):
    monkeypatch.delenv(var, raising=False)
  distributed.initialize()
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


@device_check
def make_mesh_uses_all_devices():
  mesh = mesh_lib.make_mesh(mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@device_check
def params_are_sharded_by_the_rules():
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 2, 2))
  model, tokens = TinyModel(), jnp.zeros((8, 5), jnp.int32)
  shardings = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0), tokens), mesh)
  specs = {name: s.spec for name, s in shardings['params'].items()}
  assert specs == {'embedding': P('tensor', 'fsdp'), 'up': P(None, 'fsdp', 'tensor'),
                   'heads': P('fsdp', 'tensor', None), 'scale': P()}
  params = jax.jit(lambda key: nn.unbox(model.init(key, tokens)), out_shardings=shardings)(
      jax.random.key(0))
  assert params['params']['embedding'].addressable_shards[0].data.shape == (8, 4)
  assert params['params']['up'].addressable_shards[0].data.shape == (2, 4, 6)

  tx = optimizer.adam_atan2(1e-3)
  state = jax.jit(tx.init, out_shardings=optimizer.state_shardings(shardings))(params)
  assert state.mu['params']['embedding'].sharding == shardings['params']['embedding']
  assert state.count['params']['up'].sharding.spec == P()


@device_check
def activation_constraints_apply_only_when_activated():
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 2, 2))
  model = TinyModel()
  tokens = np.random.default_rng(0).integers(0, 16, (8, 5)).astype(np.int32)
  params = nn.unbox(model.init(jax.random.key(0), tokens))
  expected = jax.jit(model.apply)(params, tokens)
  assert len(expected.sharding.device_set) == 1  # rules inactive: constraints are no-ops

  shardings = sharding.param_shardings(model.init(jax.random.key(0), tokens), mesh)
  sharded_params = jax.device_put(params, shardings)
  batch = sharding.make_global_batch({'tokens': tokens}, mesh)
  with sharding.activate(mesh):
    logits = jax.jit(model.apply)(sharded_params, batch['tokens'])
  assert logits.sharding.spec == P(('data', 'fsdp'), None, 'tensor')
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@device_check
def global_batch_rows_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh(mesh_cfg(2, 2, 2))
  rows = np.arange(8 * 6, dtype=np.int32).reshape(8, 6)
  batch = sharding.make_global_batch({'inputs': rows, 'labels': -rows}, mesh)
  assert batch['inputs'].sharding == sharding.batch_sharding(mesh)
  shards = batch['inputs'].addressable_shards
  # 4 row blocks, each on 2 devices (the 'tensor' axis)
  assert len(shards) == 8 and all(shard.data.shape == (2, 6) for shard in shards)
  np.testing.assert_array_equal(batch['inputs'], rows)
  np.testing.assert_array_equal(batch['labels'], -rows)
  assert sharding.process_data_shard(mesh) == (0, 1)


@pytest.fixture(scope='module')
def device_check_output():
  return device_check.output()


@pytest.mark.parametrize('name', list(device_check.checks))
def test_on_8_cpu_devices(name, device_check_output):
  device_check.assert_passed(name, device_check_output)


def test_accelerator_environment_keeps_the_user_s_settings(monkeypatch):
  """Where a CUDA plugin is installed: the GPU flags and memory fraction join what the user set,
  and the user's own value of a flag wins; elsewhere nothing changes."""
  from hrmtext.parallel import accelerator
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x')
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  monkeypatch.setattr(accelerator, 'cuda_installed', lambda: False)
  assert accelerator.configure_environment() == {}
  monkeypatch.setattr(accelerator, 'cuda_installed', lambda: True)
  changed = accelerator.configure_environment()
  flags = os.environ['XLA_FLAGS'].split()
  assert flags[:2] == ['--xla_gpu_enable_triton_gemm=true', '--xla_dump_to=/tmp/x']
  assert '--xla_gpu_enable_triton_gemm=false' not in flags
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags
  assert os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert accelerator.memory_fraction() == 0.9
  assert set(changed) == {'XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION'}
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  accelerator.configure_environment()
  assert accelerator.memory_fraction() == 0.5 and os.environ['XLA_FLAGS'].split() == flags


if __name__ == '__main__':
  device_check.run()
