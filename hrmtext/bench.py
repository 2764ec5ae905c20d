r"""Train-step speed of an experiment config on synthetic packed rows.

  python -m hrmtext.bench --config experiments/hrm_XL.py
  python -m hrmtext.bench --config experiments/transformer_L.py --config.model.attention=cudnn

Builds the model, optimizer, shardings and jitted train step as training does (hrmtext.train.step)
and feeds it rows packed, as the data pipeline packs, from random examples: lengths uniform in
[--min_example_len, --max_example_len], instructions about --instruction_fraction of each. The
same batch every step, so data loading is not measured (see hrmtext.data.bench for that).

Prints the compile time, step time, tokens/s (all row slots, as training counts them), model
TFLOP/s and MFU (hrmtext.model.flops at --bp_steps: forward of every stack application, backward
of the differentiable ones) and peak device memory, then one line `bench: key=value ...`.
Config fields are overridable as in training, e.g. --config.train.micro_batches=2.

On GPU, unless XLA_FLAGS is set, XLA_FLAGS becomes GPU_XLA_FLAGS below (suggested for H100).
"""
import importlib.util
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from hrmtext.cli import quiet_logs
from hrmtext.data import packing
from hrmtext.data.layout import Index
from hrmtext.model import build_model, credit_horizon
from hrmtext.model.flops import peak_flops, train_flops_per_token
from hrmtext.parallel import distributed, sharding
from hrmtext.parallel.mesh import make_mesh
from hrmtext.train import optimizer, schedules
from hrmtext.train.loop import model_config
from hrmtext.train.step import init_state, make_train_step, state_shardings

# Each flag exists in the XLA of jax 0.10.2 and 0.11.2 (NVIDIA JAX-Toolbox / MaxText practice,
# not yet A/B-measured here: set XLA_FLAGS yourself to compare). The collective ones pay off with
# FSDP over several GPUs.
GPU_XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',  # overlap collectives with compute
    '--xla_gpu_enable_triton_gemm=false',  # cuBLAS for the GEMMs
    '--xla_gpu_enable_while_loop_double_buffering=true',  # layer and L-step scans
    '--xla_gpu_enable_pipelined_all_gather=true',  # FSDP: next layer's weights during this one
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864',
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
)
CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin')

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'experiments', 'tiny_cpu.py'),
    'Experiment config file (experiments/*.py); fields overridable as --config.a.b=value.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Train steps to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed train steps after compiling.')
_BP_STEPS = flags.DEFINE_integer('bp_steps', 0, 'Credit horizon; 0: config.train.bp_max.')
_ROWS = flags.DEFINE_integer('rows', 0, 'Rows per step; 0: global_batch_tokens / seq_len.')
_VOCAB = flags.DEFINE_integer('vocab', 65536, 'Vocabulary size when config.model.vocab_size is 0.')
_MIN_LEN = flags.DEFINE_integer('min_example_len', 64, 'Shortest synthetic example (tokens).')
_MAX_LEN = flags.DEFINE_integer('max_example_len', 2048, 'Longest synthetic example (tokens).')
_INSTRUCTION = flags.DEFINE_float('instruction_fraction', 0.3,
                                  'Mean instruction share of an example.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the synthetic examples.')


def use_gpu_xla_flags() -> bool:
  """Sets XLA_FLAGS to GPU_XLA_FLAGS when unset and JAX may use CUDA (its plugin is installed,
  JAX_PLATFORMS allows it); call before anything initializes a JAX backend."""
  platforms = set(filter(None, os.environ.get('JAX_PLATFORMS', '').split(',')))
  if ('XLA_FLAGS' in os.environ or (platforms and not platforms & {'cuda', 'gpu'})
      or not any(importlib.util.find_spec(plugin) for plugin in CUDA_PLUGINS)):
    return False
  os.environ['XLA_FLAGS'] = ' '.join(GPU_XLA_FLAGS)
  return True


def synthetic_rows(rows: int, seq_len: int, vocab_size: int, min_len: int, max_len: int,
                   instruction_fraction: float, window_rows: int, seed: int) -> dict:
  """A packed batch [rows, seq_len] of random examples, planned as the data pipeline plans rows."""
  rng = np.random.default_rng(seed)
  max_len = min(max_len, seq_len)
  min_len = min(min_len, max_len)
  count = 2 * rows * seq_len // (min_len + max_len) + window_rows
  while True:
    length = rng.integers(min_len, max_len + 1, count)  # tokens each example takes in a row
    fraction = instruction_fraction * rng.uniform(0.5, 1.5, count)
    inst_len = np.clip(np.rint(length * fraction), 1, length - 1).astype(np.int64)
    resp_len = length - inst_len + 1  # packed inputs: instruction ++ response[:-1]
    inst_start = np.cumsum(inst_len + resp_len) - (inst_len + resp_len)
    index = Index(inst_start, inst_len, inst_start + inst_len, resp_len)
    lengths = packing.packed_lengths(index, seq_len)
    plan = packing.pack(lengths, seq_len, window_rows)
    if plan.num_rows >= rows:
      break
    count *= 2
  tokens = rng.integers(1, vocab_size, int(inst_start[-1] + inst_len[-1] + resp_len[-1]))
  return packing.pack_rows(tokens.astype(np.int32), index, lengths, plan.rows(range(rows)),
                           seq_len)


def check_flags(config, rows: int, batch_shards: int) -> None:
  tc = config.train
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise ValueError('--steps must be >= 1 and --warmup >= 0')
  if not 2 <= _MIN_LEN.value <= _MAX_LEN.value:
    raise ValueError('need 2 <= --min_example_len <= --max_example_len')
  if not 0 < _INSTRUCTION.value < 1:
    raise ValueError('--instruction_fraction must be in (0, 1)')
  if rows < 1 or rows % (tc.micro_batches * batch_shards):
    raise ValueError(f'{rows} rows per step do not split into {tc.micro_batches} micro-batches '
                     f'over {batch_shards} batch shards')


def peak_memory_gib() -> float | None:
  """Largest peak_bytes_in_use over this process's devices; None where not reported (CPU)."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in jax.local_devices()]
  return None if None in peaks else max(peaks) / 2**30


def jitted_train_step(config, model, mesh, horizon):
  """(optimizer, state shardings, batch sharding, jitted train step), as hrmtext.train.loop's
  Trainer builds them."""
  tc = config.train
  tx = optimizer.adam_atan2(
      schedules.warmup_cosine(tc.lr, tc.warmup_steps, max(1, tc.steps), tc.lr_min_ratio),
      tc.b1, tc.b2, tc.weight_decay)
  shardings = state_shardings(model, mesh)
  batch_sharding = NamedSharding(  # [micro_batches, rows, len]
      mesh, PartitionSpec(None, *sharding.batch_sharding(mesh).spec))
  train_step = jax.jit(make_train_step(model, tx, horizon, tc.ema_decay),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
  return tx, shardings, batch_sharding, train_step


def time_train_step(train_step, state, batch) -> tuple[float, float, dict]:
  """(compile seconds, mean step seconds, last step's metrics)."""
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in tqdm(range(_STEPS.value), desc='timed steps',
                disable=not distributed.is_main_process()):
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
  return compile_s, (time.perf_counter() - start) / _STEPS.value, metrics


def run(config) -> dict:
  """Builds, compiles and times the train step; the results (None: not measurable here)."""
  tc, seq_len, micro = config.train, config.data.seq_len, config.train.micro_batches
  mesh = make_mesh(config.mesh)
  model_cfg = model_config(config, _VOCAB.value)
  model = build_model(model_cfg)
  rows = _ROWS.value or tc.global_batch_tokens // seq_len
  check_flags(config, rows, mesh.shape['data'] * mesh.shape['fsdp'])
  bp = _BP_STEPS.value or tc.bp_max
  horizon = credit_horizon(model_cfg, bp)
  tx, shardings, batch_sharding, train_step = jitted_train_step(config, model, mesh, horizon)
  rows_batch = synthetic_rows(rows, seq_len, model_cfg.vocab_size, _MIN_LEN.value,
                              _MAX_LEN.value, _INSTRUCTION.value, config.data.pack_window_rows,
                              _SEED.value)
  if distributed.is_main_process():
    print(f'compiling the train step ({model_cfg.architecture}, bp_steps {bp}, {rows} rows x '
          f'{seq_len} tokens, {jax.device_count()} x {jax.devices()[0].device_kind})', flush=True)
  with sharding.activate(mesh):  # logical activation constraints apply while tracing
    state = jax.jit(lambda: init_state(model, tx, jax.random.key(tc.seed)),
                    out_shardings=shardings)()
    params_m = sum(x.size for x in jax.tree.leaves(state.params)) / 1e6
    batch = {name: jax.make_array_from_callback(
        (micro, rows // micro, seq_len), batch_sharding,
        lambda index, x=x.reshape(micro, rows // micro, seq_len): x[index])
             for name, x in rows_batch.items()}
    compile_s, step_s, metrics = time_train_step(train_step, state, batch)

  devices = jax.device_count()
  tokens_per_s = rows * seq_len / step_s
  flops_per_s = train_flops_per_token(model_cfg, horizon, seq_len) * tokens_per_s
  device_peak = peak_flops(jax.devices()[0].device_kind)
  applications = ((1, 1) if model_cfg.architecture == 'transformer' else
                  (sum(horizon.L) + sum(horizon.H), len(horizon.L) + len(horizon.H)))
  return {
      'architecture': model_cfg.architecture,
      'attention': model_cfg.attention,
      'devices': devices,
      'device_kind': jax.devices()[0].device_kind.replace(' ', '_'),
      'params_m': params_m,
      'rows': rows,
      'seq_len': seq_len,
      'bp_steps': bp,
      'differentiable_applications': '{}/{}'.format(*applications),
      'packing': float((rows_batch['segment_ids'] > 0).mean()),
      'loss': float(metrics['loss']),
      'compile_s': compile_s,
      'step_s': step_s,
      'tokens_per_s': tokens_per_s,
      'tokens_per_s_per_device': tokens_per_s / devices,
      'tflops_per_device': flops_per_s / devices / 1e12,
      'mfu': flops_per_s / (device_peak * devices) if device_peak else None,
      'peak_memory_gib': peak_memory_gib(),
  }


def report(results: dict) -> None:
  """A readable summary, then every result on one `bench: key=value ...` line."""
  r = {k: 'n/a' if v is None else v for k, v in results.items()}
  mfu = r['mfu'] if results['mfu'] is None else f'{r["mfu"]:.1%}'
  memory = r['peak_memory_gib'] if results['peak_memory_gib'] is None else (
      f'{r["peak_memory_gib"]:.2f} GiB')
  print(f'model: {r["architecture"]}, {r["params_m"]:.1f}M params, attention {r["attention"]}, '
        f'bp_steps {r["bp_steps"]} ({r["differentiable_applications"]} stack applications '
        f'differentiable)')
  print(f'batch: {r["rows"]} rows x {r["seq_len"]} tokens, {r["packing"]:.1%} real tokens; '
        f'last loss {r["loss"]:.4f}')
  print(f'compile: {r["compile_s"]:.1f} s')
  print(f'step: {r["step_s"]:.4f} s')
  print(f'tokens/s: {r["tokens_per_s"]:,.0f} total, {r["tokens_per_s_per_device"]:,.0f} per device '
        f'({r["devices"]} x {r["device_kind"]})')
  print(f'model TFLOP/s per device: {r["tflops_per_device"]:.2f}, MFU {mfu}')
  print(f'peak device memory: {memory}')
  fields = ' '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items())
  print(f'bench: {fields}', flush=True)


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if use_gpu_xla_flags():
    print(f'XLA_FLAGS={os.environ["XLA_FLAGS"]}')
  distributed.initialize()
  try:
    results = run(_CONFIG.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  except jax.errors.JaxRuntimeError as e:  # e.g. out of device memory
    sys.exit(f'error: {str(e).splitlines()[0]}')
  if distributed.is_main_process():
    report(results)


if __name__ == '__main__':
  app.run(main)
