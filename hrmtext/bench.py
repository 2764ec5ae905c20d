r"""Train-step speed, cost and memory of an experiment config, on synthetic packed rows.

  python -m hrmtext.bench --config experiments/hrm.py:XL
  python -m hrmtext.bench --config experiments/hrm.py:L --config.model.architecture=transformer
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m hrmtext.bench \
      --config experiments/hrm.py:XL --config.mesh.fsdp=8 --compile_only --json
  python -m hrmtext.bench --config experiments/hrm.py:XL --compile_only --target v5p:2x2x2

Builds the model, optimizer, shardings and jitted train step as training does (the one builder,
hrmtext.training.program.build_program: the config's mesh, micro-batches and remat fitted to the
devices, loss chunking, the state donated) and feeds it
rows packed, as the data pipeline packs, from random examples: lengths uniform in
[--min_example_len, --max_example_len], instructions about --instruction_fraction of each. The
same batch every step, so data loading is not measured (see hrmtext.bench_data for that).

Prints the compile time, step time, tokens/s (all row slots, as training counts them), model
TFLOP/s and MFU (hrmtext.model.flops at --bp_steps: forward of every stack application, backward
of the differentiable ones) and peak device memory, then one line `bench: key=value ...`.
Config fields are overridable as in training, e.g. --config.train.micro_batches=2.

--compile_only lowers and compiles the train step on abstract inputs (nothing is allocated, so
a 1B model compiles on a laptop, for N fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N) and reports the parameter count, the analytic
and the compiled FLOPs per token (the matmuls of the optimised HLO, loop bodies times their trip
counts: hrmtext.model.flops.compiled_matmul_flops) and the per-device memory of the compiled step
(compiled.memory_analysis()). CPU buffer assignment only approximates a GPU's or TPU's:
treat its bytes as an estimate of what the step needs, not a measurement of another backend.
With --target the step is compiled by the target's own compiler for devices that are not here
(hrmtext.parallel.targets: TPU slices through libtpu, H100/H200 GPUs deviceless), so its memory
is that compiler's buffer assignment. The attention kernel is the config's compute.attention,
'auto' by default: the one for the devices compiled for (XLA on CPU, cuDNN on H100 in bf16,
splash on TPU).

XLA flags and the GPU memory fraction are those every entry point runs with
(hrmtext.parallel.accelerator): bench and train compile the same program.
"""
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from tqdm import tqdm

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.data import packing
from hrmtext.data.layout import Index
from hrmtext.model import architecture_horizon
from hrmtext.model.flops import compiled_matmul_flops, peak_flops, train_flops_per_token
from hrmtext.parallel import distributed, roofline, sharding, targets
from hrmtext.parallel.mesh import make_mesh
from hrmtext.training import schedules
from hrmtext.training.loop import check_batch_split
from hrmtext.training import program as program_lib
from hrmtext.training.program import TrainProgram

BENCH_STEPS = 1000  # the learning-rate schedule's length when config.train.steps is 0

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'experiments', 'tiny_cpu.py'),
    'Experiment config file (experiments/*.py); fields overridable as --config.a.b=value.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Train steps to time.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed train steps after compiling.')
_BP_STEPS = flags.DEFINE_integer(
    'bp_steps', 0, 'HRM\'s credit horizon (bp_steps; the baselines keep their reference ones); 0: '
    'the config\'s at the end of training (train.horizon).')
_ROWS = flags.DEFINE_integer('rows', 0, 'Rows per step; 0: global_batch_tokens / seq_len.')
_VOCAB = flags.DEFINE_integer('vocab', 65536, 'Vocabulary size when config.model.vocab_size is 0.')
_MIN_LEN = flags.DEFINE_integer('min_example_len', 64, 'Shortest synthetic example (tokens).')
_MAX_LEN = flags.DEFINE_integer('max_example_len', 2048, 'Longest synthetic example (tokens).')
_INSTRUCTION = flags.DEFINE_float('instruction_fraction', 0.3,
                                  'Mean instruction share of an example.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the synthetic examples.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only lower and compile the train step on abstract inputs and report '
    'params, FLOPs per token and per-device memory (CPU buffer assignment approximates a GPU\'s '
    'or TPU\'s; see the module doc).')
_COMPARE_HF = flags.DEFINE_bool(
    'compare_hf', False, 'Also time transformers\' HrmTextForCausalLM train step on the same '
    'shape in this process (float32, sdpa, AdamW, the instruction share of each row marked by '
    'token_type_ids, the credit horizon as L_bp_cycles, torch on all cores) and print both '
    'and the ratio. Needs torch and transformers.')
_TARGET = flags.DEFINE_string(
    'target', '', 'With --compile_only: compile for these devices instead of this machine\'s, a '
    'libtpu topology (v5p:2x2x2, v6e:2x4, v4:2x2x1) or GPUs (h100:8, h200:16); needs the '
    'targets extra (hrmtext.parallel.targets).')
_JSON = flags.DEFINE_bool('json', False, 'Also print the results as one JSON object on the last '
                          'stdout line.')


def synthetic_rows(rows: int, seq_len: int, vocab_size: int, min_len: int, max_len: int,
                   instruction_fraction: float, window_rows: int, max_segments: int,
                   seed: int) -> dict:
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
    index = Index.from_lengths(inst_len, resp_len)
    lengths = packing.packed_lengths(index, seq_len)
    plan = packing.pack(lengths, seq_len, window_rows, max_segments)
    if plan.num_rows >= rows:
      break
    count *= 2
  tokens = rng.integers(1, vocab_size, int(index.resp_start[-1] + resp_len[-1]))
  return packing.pack_rows(tokens.astype(np.int32), index, lengths, plan.rows(range(rows)),
                           seq_len, max_segments=max_segments)


def check_flags() -> None:
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise UserError('--steps must be >= 1 and --warmup >= 0')
  if not 2 <= _MIN_LEN.value <= _MAX_LEN.value:
    raise UserError('need 2 <= --min_example_len <= --max_example_len')
  if not 0 < _INSTRUCTION.value < 1:
    raise UserError('--instruction_fraction must be in (0, 1)')


def peak_memory_gib() -> float | None:
  """Largest peak_bytes_in_use over this process's devices; None where not reported (CPU)."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in jax.local_devices()]
  return None if None in peaks else max(peaks) / 2**30


def build_program(config, mesh, vocab_size: int) -> TrainProgram:
  """The Trainer's program for `config` (vocab_size: when config.model leaves it unset). Without
  train.steps (no data here to count epochs in) the schedule spans BENCH_STEPS."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.steps = config.train.steps or BENCH_STEPS
  return program_lib.build_program(config, mesh, vocab_size=vocab_size, epoch_tokens=None,
                                   log=lambda line: print(line, flush=True))


def compile_report(train_step, abstract_state, abstract_batch, flops_per_token: float) -> dict:
  """Compiles on abstract inputs: compile time, compiled FLOPs per token, per-device bytes."""
  start = time.perf_counter()
  compiled = train_step.lower(abstract_state, abstract_batch).compile()
  compile_s = time.perf_counter() - start
  tokens = abstract_batch['inputs'].size
  # The compiled module is one device's program (SPMD): all devices together do this times N.
  mesh = abstract_batch['inputs'].sharding.mesh
  compiled_flops = compiled_matmul_flops(compiled.as_text()) * mesh.size
  memory = compiled.memory_analysis()
  per_device = None
  if memory is not None:
    per_device = {
        'argument': memory.argument_size_in_bytes, 'output': memory.output_size_in_bytes,
        'alias': memory.alias_size_in_bytes, 'temp': memory.temp_size_in_bytes}
    # Donated state: outputs that alias arguments take no memory of their own.
    per_device['total'] = (per_device['argument'] + per_device['output'] - per_device['alias']
                           + per_device['temp'])
  return {
      'compile_s': compile_s,
      # None where the matmuls are opaque custom calls (cuBLAS on GPU targets, TPU kernels).
      'compiled_flops_per_token': compiled_flops / tokens or None,
      'compiled_to_analytic_flops': compiled_flops / tokens / flops_per_token or None,
      'per_device_memory_bytes': per_device,
      # Roofline: predicted step time, tokens/s, MFU and the ops that dominate.
      **roofline.predict(compiled.as_text(), mesh.devices.flat[0].device_kind, tokens,
                         flops_per_token, mesh.size),
  }


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


def time_hf_train_step(cfg, horizon, rows: int, seq_len: int) -> float:
  """Mean seconds of transformers' train step (forward, backward, AdamW) at this shape."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'--compare_hf needs torch and transformers ({e})') from e
  if cfg.architecture != 'hrm' or not all(horizon.H):
    raise UserError('--compare_hf needs an HRM whose H applications are all differentiable '
                    '(bp_steps >= H_cycles + 1): transformers\' L_bp_cycles cannot say otherwise')
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(_SEED.value)
  hf_config = transformers.HrmTextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_size,
      num_hidden_layers=cfg.layers_per_stack, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim, H_cycles=cfg.H_cycles,
      L_cycles=cfg.L_cycles, rope_parameters={'rope_theta': cfg.rope_theta, 'rope_type': 'default'},
      L_bp_cycles=[sum(horizon.L[h * cfg.L_cycles:(h + 1) * cfg.L_cycles])
                   for h in range(cfg.H_cycles)],
      attn_implementation='sdpa')
  model = transformers.HrmTextForCausalLM(hf_config).train()
  adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.randint(1, cfg.vocab_size, (rows, seq_len))
  is_instruction = torch.arange(seq_len)[None].expand(rows, -1) < int(
      _INSTRUCTION.value * seq_len)
  labels = torch.where(is_instruction, packing.IGNORE_LABEL, ids)

  def step():
    loss = model(input_ids=ids, token_type_ids=is_instruction.long(), labels=labels).loss
    loss.backward()
    adamw.step()
    adamw.zero_grad()

  for _ in range(_WARMUP.value):
    step()
  start = time.perf_counter()
  for _ in tqdm(range(_STEPS.value), desc='timed transformers steps',
                disable=not distributed.is_main_process()):
    step()
  return (time.perf_counter() - start) / _STEPS.value


def run(config) -> dict:
  """Builds, compiles and (unless --compile_only) times the train step; the results (None: not
  measurable here)."""
  check_flags()
  config, seq_len = ml_collections.ConfigDict(config.to_dict()), config.data.seq_len
  if _ROWS.value:
    config.train.global_batch_tokens = _ROWS.value * seq_len
  mesh = make_mesh(config.mesh, targets.devices(_TARGET.value) if _TARGET.value else None)
  device_kind = mesh.devices.flat[0].device_kind
  rows = config.train.global_batch_tokens // seq_len
  program = build_program(config, mesh, _VOCAB.value)
  micro = program.config.train.micro_batches
  check_batch_split(rows, micro, mesh.shape['data'] * mesh.shape['fsdp'])
  model_cfg = program.model_cfg
  horizon = (architecture_horizon(model_cfg, _BP_STEPS.value) if _BP_STEPS.value else
             schedules.final_horizon(program.config.train.horizon, model_cfg))
  bp = horizon.differentiable
  flops_per_token = train_flops_per_token(model_cfg, horizon, seq_len)
  train_step = program.train_step(horizon)
  devices = mesh.devices.size
  applications = ((1, 1) if model_cfg.architecture == 'transformer' else
                  (sum(horizon.L) + sum(horizon.H), len(horizon.L) + len(horizon.H)))
  abstract_state = program.abstract_state()
  results = {
      'architecture': model_cfg.architecture,
      'attention': program.compute.attention,
      'devices': devices,
      'device_kind': device_kind.replace(' ', '_'),
      'mesh': 'x'.join(map(str, mesh.devices.shape)),
      'params': sum(x.size for x in jax.tree.leaves(abstract_state.weights())),
      # What trains: all the params, or a LoRA model's adapters (config.lora).
      'trainable_params': sum(x.size for x in jax.tree.leaves(abstract_state.params)),
      'rows': rows,
      'micro_batches': micro,
      'seq_len': seq_len,
      'bp_steps': bp,
      'differentiable_applications': '{}/{}'.format(*applications),
      'remat_policy': program.compute.remat_policy,
      'loss_chunk_len': program.loss_chunk_len,
      'flops_per_token': flops_per_token,
  }
  if distributed.is_main_process():
    print(f'compiling the train step ({model_cfg.architecture}, bp_steps {bp}, {rows} rows x '
          f'{seq_len} tokens in {micro} micro-batches, {devices} x '
          f'{device_kind})', flush=True)
  with sharding.activate(mesh):  # logical activation constraints apply while tracing
    if _COMPILE_ONLY.value:
      return {**results, **compile_report(train_step, abstract_state, program.abstract_batch(rows),
                                          flops_per_token)}
    rows_batch = synthetic_rows(rows, seq_len, model_cfg.vocab_size, _MIN_LEN.value,
                                _MAX_LEN.value, _INSTRUCTION.value, config.data.pack_window_rows,
                                config.data.max_segments_per_row, _SEED.value)
    state = program.init_state()
    batch = {name: jax.make_array_from_callback(
        (micro, rows // micro, *x.shape[1:]), program.batch_sharding,
        lambda index, x=x.reshape(micro, rows // micro, *x.shape[1:]): x[index])
             for name, x in rows_batch.items()}
    compile_s, step_s, metrics = time_train_step(train_step, state, batch)

  tokens_per_s = rows * seq_len / step_s
  flops_per_s = flops_per_token * tokens_per_s
  device_peak = peak_flops(jax.devices()[0].device_kind)
  if _COMPARE_HF.value:
    hf_step_s = time_hf_train_step(model_cfg, horizon, rows, seq_len)
    results.update(hf_step_s=hf_step_s, hf_tokens_per_s=rows * seq_len / hf_step_s,
                   speedup_vs_hf=hf_step_s / step_s)
  return {
      **results,
      'params_m': results['params'] / 1e6,
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
  """A readable summary, then every result on one `bench: key=value ...` line (and with --json
  as one JSON object on the last line)."""
  r = {k: 'n/a' if v is None else v for k, v in results.items()}
  lora = (f' ({r["trainable_params"] / 1e6:.2f}M trainable: LoRA)'
          if r['trainable_params'] != r['params'] else '')
  print(f'model: {r["architecture"]}, {r["params"] / 1e6:.1f}M params{lora}, attention '
        f'{r["attention"]}, bp_steps {r["bp_steps"]} ({r["differentiable_applications"]} stack '
        f'applications differentiable), remat {r["remat_policy"]}')
  print(f'batch: {r["rows"]} rows x {r["seq_len"]} tokens in {r["micro_batches"]} micro-batches '
        f'on mesh {r["mesh"]}, loss chunk {r["loss_chunk_len"] or "none"}')
  print(f'compile: {r["compile_s"]:.1f} s')
  if _COMPILE_ONLY.value:
    compiled = ('n/a (the matmuls are custom calls XLA does not count)'
                if results['compiled_flops_per_token'] is None else
                f'{r["compiled_flops_per_token"]:.4g} (matmuls, loops by trip count), ratio '
                f'{r["compiled_to_analytic_flops"]:.3f}')
    print(f'FLOPs per token: analytic {r["flops_per_token"]:.4g}, compiled {compiled}')
    memory = results['per_device_memory_bytes'] or {}
    print('per-device memory: ' + (', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in
                                              memory.items()) or 'n/a'))
    print('\n'.join(roofline.report_lines(results)))
    flat = {k: v for k, v in r.items()
            if k not in ('per_device_memory_bytes', *roofline.NOT_FLAT)}
    flat.update({f'memory_{k}_bytes': v for k, v in memory.items()})
  else:
    mfu = r['mfu'] if results['mfu'] is None else f'{r["mfu"]:.1%}'
    memory = r['peak_memory_gib'] if results['peak_memory_gib'] is None else (
        f'{r["peak_memory_gib"]:.2f} GiB')
    print(f'step: {r["step_s"]:.4f} s ({r["packing"]:.1%} real tokens, last loss '
          f'{r["loss"]:.4f})')
    print(f'tokens/s: {r["tokens_per_s"]:,.0f} total, {r["tokens_per_s_per_device"]:,.0f} per '
          f'device ({r["devices"]} x {r["device_kind"]})')
    print(f'model TFLOP/s per device: {r["tflops_per_device"]:.2f}, MFU {mfu}')
    print(f'peak device memory: {memory}')
    if 'hf_step_s' in r:
      print(f'transformers: {r["hf_step_s"]:.4f} s/step, {r["hf_tokens_per_s"]:,.0f} tokens/s; '
            f'hrmtext/transformers: {r["speedup_vs_hf"]:.2f}x')
    flat = r
  fields = ' '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in flat.items())
  print(f'bench: {fields}', flush=True)
  if _JSON.value:
    print(json.dumps(results), flush=True)


def main(argv):
  del argv  # cli.run refuses stray arguments
  if _TARGET.value:  # before a JAX backend starts: the target's compiler reads its environment
    if not _COMPILE_ONLY.value:
      raise UserError('--target needs --compile_only (the target\'s devices are not here)')
    targets.prepare_environment(_TARGET.value)
  distributed.initialize()
  try:
    results = run(_CONFIG.value)
  except jax.errors.JaxRuntimeError as e:  # e.g. out of device memory
    raise UserError(str(e).splitlines()[0]) from e
  if distributed.is_main_process():
    report(results)


if __name__ == '__main__':
  cli.run(main)
