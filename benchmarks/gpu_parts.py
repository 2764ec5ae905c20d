"""The in-process parts of benchmarks/gpu_check.py: the environment and the attention kernel check.

Each runs in a process of its own (gpu_check.py --part=...), which it leaves when done, so the
train and decode benches after it get the whole device. Only APIs of jax 0.11 (the GPU image's)
and 0.12.
"""
import importlib.metadata
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from hrmtext.model.attention import AttentionMask, attention
from hrmtext.model.kernels import PackedRuns, cudnn


def environment() -> dict:
  """What ran the check: GPU, driver, CUDA and cuDNN (as jax loaded them), packages, Python."""
  device = jax.devices()[0]
  env = {'python': platform.python_version(), 'platform': device.platform,
         'device_kind': device.device_kind, 'device_count': jax.device_count(),
         'compute_capability': getattr(device, 'compute_capability', None)}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'jax-cuda13-plugin',
                  'jax-cuda12-plugin'):
    try:
      env[package.replace('-', '_')] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  env['cuda_plugin'] = env.pop('jax_cuda13_plugin', env.pop('jax_cuda12_plugin', None))
  env.update(_nvidia_smi())
  env.update(_cuda_versions())
  return env


def _nvidia_smi() -> dict:
  try:
    line = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
        capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError) as e:
    return {'gpu': None, 'gpu_reason': f'nvidia-smi: {type(e).__name__}'}
  name, driver, memory = (field.strip() for field in line.split(','))
  return {'gpu': name, 'driver': driver, 'gpu_memory': memory}


def _cuda_versions() -> dict:
  """CUDA runtime/driver and cuDNN versions of jax's CUDA plugin (jax._src.lib.cuda_versions:
  no public API says them in jax 0.11/0.12); empty without the plugin."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  if cuda_versions is None:
    return {}
  cuda = lambda v: f'{v // 1000}.{v % 1000 // 10}'  # 13000 -> 13.0
  versions = {}
  for key, read, spell in (('cuda', 'cuda_runtime_get_version', cuda),
                           ('cuda_driver', 'cuda_driver_get_version', cuda),
                           ('cudnn', 'cudnn_get_version',
                            lambda v: f'{v // 10000}.{v % 10000 // 100}.{v % 100}')):
    try:
      versions[key] = spell(getattr(cuda_versions, read)())
    except Exception as e:  # pylint: disable=broad-except (a library that is not loaded)
      versions[key + '_reason'] = f'{type(e).__name__}: {e}'
  return versions


def packed_rows(rng, batch: int, seq_len: int, max_segments: int):
  """segment_ids [batch, seq_len] int32 and is_instruction bool, as packing lays rows out: each
  example an instruction then its response inputs. Row 0 holds exactly `max_segments` examples,
  the first of which has a response of 1 token (nothing of it is an input: all instruction) and
  the second a single response input; the others random lengths, the last row ending in
  padding (segment 0)."""
  if seq_len < 3 * max_segments:
    raise ValueError(f'seq_len {seq_len} cannot hold {max_segments} examples of >= 3 tokens')
  segment_ids = np.zeros((batch, seq_len), np.int32)
  is_instruction = np.zeros((batch, seq_len), bool)
  for row in range(batch):
    used = seq_len - (seq_len // 8 if row == batch - 1 and batch > 1 else 0)
    if row == 0:
      lengths = rng.multinomial(used - 3 * max_segments, [1 / max_segments] * max_segments) + 3
    else:
      lengths = _random_lengths(rng, used, max_segments)
    start = 0
    for segment, length in enumerate(lengths):
      instruction = rng.integers(1, length)  # at least one response input
      if row == 0 and segment < 2:
        instruction = length - 1 + (segment == 0)
      segment_ids[row, start:start + length] = segment + 1
      is_instruction[row, start:start + instruction] = True
      start += length
  return segment_ids, is_instruction


def _random_lengths(rng, total: int, max_segments: int) -> list:
  """At most `max_segments` lengths of >= 3 tokens summing to `total`."""
  lengths = []
  while total - sum(lengths) >= 6 and len(lengths) < max_segments - 1:
    left = total - sum(lengths)
    lengths.append(int(rng.integers(3, max(4, min(total // 3, left - 3)))))
  return lengths + [total - sum(lengths)]


def attention_check(batch, seq_len, heads, head_dim, max_segments, repeats, seed,
                    tolerance) -> dict:
  """'cudnn' and 'xla' in bf16 against 'xla' in fp32 (matmuls at HIGHEST) on packed rows."""
  rng = np.random.default_rng(seed)
  segment_ids, is_instruction = packed_rows(rng, batch, seq_len, max_segments)
  # The runs as the packer gives them to training (tests/test_kernels.py: the packer's runs are
  # these), sized by the bound: the cuDNN path training runs.
  segments, instruction = jnp.asarray(segment_ids), jnp.asarray(is_instruction)
  runs = PackedRuns(*cudnn._runs(segments, jnp.ones_like(instruction), max_segments + 1),
                    *cudnn._runs(segments, instruction, max_segments + 1))
  mask = AttentionMask.packed(segments, instruction, runs)
  shape = (batch, seq_len, heads, head_dim)
  inputs = [jax.random.normal(key, shape, jnp.float32)
            for key in jax.random.split(jax.random.key(seed), 4)]  # q, k, v, cotangent
  real = segment_ids[:, :, None, None] > 0  # padding outputs may differ by design
  with jax.default_matmul_precision('float32'):
    reference, reference_ms = _fwd_bwd('xla', inputs, mask, repeats)
  rows = [{'implementation': 'xla', 'dtype': 'float32', 'reference': True, 'status': 'ok',
           'nans': _nans(reference), 'fwd_bwd_ms': reference_ms}]
  for implementation in ('cudnn', 'xla'):
    rows.append(_compare(implementation, inputs, mask, repeats, reference, real, tolerance))
  return {'shape': dict(zip(('batch', 'seq_len', 'heads', 'head_dim'), shape)),
          'max_segments': max_segments,
          'segments_per_row': [int(np.unique(r[r > 0]).size) for r in segment_ids],
          'one_token_response': True, 'rows': rows}


def _compare(implementation, inputs, mask, repeats, reference, real, tolerance) -> dict:
  row = {'implementation': implementation, 'dtype': 'bfloat16'}
  device = jax.devices()[0]
  if implementation == 'cudnn' and device.platform != 'gpu':
    return {**row, 'status': 'skipped', 'reason': f'cuDNN needs a CUDA GPU; have '
                                                  f'{device.device_kind} ({device.platform})'}
  try:
    got, milliseconds = _fwd_bwd(implementation, [x.astype(jnp.bfloat16) for x in inputs], mask,
                                 repeats)
  except Exception as e:  # pylint: disable=broad-except (recorded; the other rows go on)
    return {**row, 'status': 'failed', 'reason': ' '.join(f'{type(e).__name__}: {e}'.split())[:500]}
  errors = {f'{name}_error': _relative_error(x, ref, real)
            for name, x, ref in zip(('out', 'dq', 'dk', 'dv'), got, reference)}
  nans = _nans(got)
  return {**row, 'status': 'ok', **errors, 'nans': nans, 'fwd_bwd_ms': milliseconds,
          'passed': max(errors.values()) <= tolerance and not any(nans.values())}


def _fwd_bwd(implementation, inputs, mask, repeats):
  """((out, dq, dk, dv) as float32 numpy, median fwd+bwd milliseconds) of the jitted kernel."""
  @jax.jit
  def run(q, k, v, cotangent, mask):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, implementation=implementation),
                       q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))

  results = jax.block_until_ready(run(*inputs, mask))  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(*inputs, mask))
    times.append(time.perf_counter() - start)
  return [np.asarray(x, np.float32) for x in results], statistics.median(times) * 1e3


def _relative_error(x, reference, real) -> float:
  """Largest absolute difference on real tokens over the reference's largest absolute value."""
  real = np.broadcast_to(real, x.shape)
  scale = np.abs(reference[real]).max()
  return float(np.abs(x[real] - reference[real]).max() / scale) if scale else float('nan')


def _nans(arrays) -> dict:
  return {name: int(np.isnan(x).sum()) for name, x in zip(('out', 'dq', 'dk', 'dv'), arrays)}
