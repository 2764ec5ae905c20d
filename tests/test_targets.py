"""The real train step compiles for TPU and GPU targets that are not here (hrmtext.parallel.targets)
with the kernels those devices run: Mosaic splash on TPU, cuDNN flash attention on H100.

Each compile runs in a subprocess (this file as a script): a target's compiler plugin reads its
environment when it starts (targets.prepare_environment), and the pytest process keeps its one CPU
device. Skipped, with the reason, where the target's compiler package is not installed (the
`targets` extra: libtpu, jax-cuda13-plugin/-pjrt).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from hrmtext.model.attention import auto_implementation
from hrmtext.parallel import sharding, targets
from hrmtext.parallel.mesh import make_mesh
from hrmtext.training.config import base_config, resolve
from hrmtext.training.program import TrainProgram

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_TARGET, GPU_TARGET = 'v5p:2x2x1', 'h100:2'
# What each kernel leaves in the compiled module.
KERNEL_CALLS = {'splash': 'tpu_custom_call', 'cudnn': '__cudnn$fmha'}
SEQ_LEN = 256


def compiler_missing(target: str) -> str | None:
  module = 'libtpu' if target.startswith('v') else 'jax_plugins.xla_cuda13'
  if importlib.util.find_spec(module.split('.')[0]) is None or (
      '.' in module and importlib.util.find_spec(module) is None):
    package = "'jax[tpu]'" if module == 'libtpu' else 'jax-cuda13-plugin and jax-cuda13-pjrt'
    return f'compiling for {target} needs {package} of jax {jax.__version__} (extra targets)'
  return None


def small_config(attention: str) -> ml_collections.ConfigDict:
  """HRM with both stacks, recurrence and a credit horizon (bp_steps 3); head_dim 128 as the
  real sizes; bf16 with the `attention` kernel."""
  config = base_config()
  config.model.update(vocab_size=512, hidden_size=256, num_heads=2, head_dim=128,
                      layers_per_stack=1, H_cycles=2, L_cycles=2)
  config.compute.update(dtype='bfloat16', attention=attention)
  config.train.horizon.update(bp_min=3, bp_max=3)
  return config


def program_for(config, devices, rows: int) -> TrainProgram:
  """The train program of `config` with fsdp over `devices`, one micro-batch of `rows` rows."""
  config.data.seq_len = SEQ_LEN
  config.train.update(global_batch_tokens=rows * SEQ_LEN, lr=1e-3, warmup_steps=10,
                      ema_decay=0.999, steps=100)
  mesh = make_mesh(SimpleNamespace(data=1, fsdp=-1, tensor=1), devices)
  return TrainProgram(resolve(config, vocab_size=512, epoch_tokens=None,
                              device=mesh.devices.flat[0]), mesh)


def lower(attention: str, devices, rows: int):
  program = program_for(small_config(attention), devices, rows)
  with sharding.activate(program.mesh):  # the mesh in context: the kernels trace for its devices
    return program.train_step(program.horizon(0)).lower(program.abstract_state(),
                                                        program.abstract_batch(rows))


def module_text(lowered) -> str:
  """The lowered module, less the Python object ids jax writes for custom partitioning rules."""
  return re.sub(r'backend_config = "\d+"', 'backend_config = ""', lowered.as_text())


def kernel_calls(module_text: str) -> list[str]:
  return sorted(kernel for kernel, call in KERNEL_CALLS.items() if call in module_text)


def compile_for_target(target: str, kernel: str) -> dict:
  """Runs in a fresh process (see main): the train step for `target` with `kernel`, compiled, and
  whether 'auto' lowers to the same module."""
  devices = targets.devices(target)
  rows = 2 * len(devices)
  lowered = lower(kernel, devices, rows)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  return {'device_kind': devices[0].device_kind, 'devices': len(devices),
          'kernels': kernel_calls(compiled.as_text()),
          'temp_bytes': memory.temp_size_in_bytes if memory else None,
          'auto_is_same': module_text(lower('auto', devices, rows)) == module_text(lowered)}


def run_compile(target: str, kernel: str) -> dict:
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}  # the host runs nothing
  # No GPU to autotune on: XLA's defaults, and half the compile time.
  env['XLA_FLAGS'] = '--xla_gpu_autotune_level=0'
  result = subprocess.run([sys.executable, os.path.abspath(__file__), target, kernel], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('target, kernel, devices, device_kind', [
    (TPU_TARGET, 'splash', 4, 'TPU v5'),
    (GPU_TARGET, 'cudnn', 2, 'NVIDIA H100 80GB HBM3'),
])
def test_train_step_compiles_for_target_with_its_kernel(target, kernel, devices, device_kind):
  """The compiled module holds the kernel's call (Mosaic, cuDNN fused attention); 'auto' lowers
  to the very same module."""
  if reason := compiler_missing(target):
    pytest.skip(reason)
  got = run_compile(target, kernel)
  assert (got['device_kind'], got['devices']) == (device_kind, devices)
  assert got['kernels'] == [kernel], got
  assert got['temp_bytes'] > 0
  assert got['auto_is_same']


def test_auto_is_xla_on_cpu():
  """With a CPU mesh in context 'auto' lowers to exactly the 'xla' step (the interpreted splash
  kernel would lower to a different module)."""
  devices = jax.devices('cpu')[:1]
  assert module_text(lower('auto', devices, rows=1)) == module_text(lower('xla', devices, rows=1))


@pytest.mark.parametrize('device, dtype, want', [
    (SimpleNamespace(platform='tpu', device_kind='TPU v6 lite'), jnp.float32, 'splash'),
    (SimpleNamespace(platform='gpu', compute_capability='9.0'), jnp.bfloat16, 'cudnn'),
    (SimpleNamespace(platform='gpu', compute_capability='10.0'), jnp.float16, 'cudnn'),
    (SimpleNamespace(platform='gpu', compute_capability='9.0'), jnp.float32, 'xla'),
    (SimpleNamespace(platform='gpu', compute_capability='8.0'), jnp.bfloat16, 'xla'),  # A100
    (SimpleNamespace(platform='gpu', compute_capability='gfx942'), jnp.bfloat16, 'xla'),  # ROCm
    (SimpleNamespace(platform='cpu', device_kind='cpu'), jnp.bfloat16, 'xla'),
])
def test_auto_implementation(device, dtype, want):
  assert auto_implementation(device, dtype) == want


@pytest.mark.parametrize('name, error', [
    ('a100:8', 'unknown target'), ('v5p', 'bad shape'), ('v5p:2x2x2x2', 'bad shape'),
    ('h100:2x4', 'bad shape'), ('h100:0', 'bad shape'), ('h100:12', 'whole hosts of 8'),
])
def test_bad_target_names(name, error):
  with pytest.raises(ValueError, match=error):
    targets.devices(name)


if __name__ == '__main__':
  target_name, kernel_name = sys.argv[1:]
  targets.prepare_environment(target_name)
  print(json.dumps(compile_for_target(target_name, kernel_name)))
