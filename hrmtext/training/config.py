"""The one experiment schema; `experiments/*.py` start from `base_config()` and override."""
import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from hrmtext.errors import UserError
from hrmtext.data.config import data_config
from hrmtext.model.attention import auto_implementation
from hrmtext.model.config import ComputeConfig, ModelConfig
from hrmtext.model.lora import LoraConfig
from hrmtext.training import schedules, step


def experiment_config(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the experiment file at `path` (experiments that build on another)."""
  name = 'experiment_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def model_schema() -> ml_collections.ConfigDict:
  """`config.model`: every ModelConfig field, unset (None) unless an experiment or a flag sets
  it, so the `size` preset (B/L/XL/XXL), then ModelConfig's own defaults, fill the rest.

  `vocab_size` unset takes the tokenizer's size from the data, padded to `vocab_multiple`.
  """
  fields = {f.name: config_dict.placeholder(f.type) for f in dataclasses.fields(ModelConfig)}
  return ml_collections.ConfigDict(dict(size='', vocab_multiple=256, **fields))


def horizon_schema() -> ml_collections.ConfigDict:
  """`config.train.horizon`, the credit horizon over training (schedules.HORIZON_SCHEDULES):
  schedule '' is the architecture's (HRM: warmup; the Transformer: full; the other baselines:
  fixed at their reference H_bp/L_bp). warmup: bp_steps from bp_min to bp_max over the first
  warmup_ratio of the steps; fixed: H_bp, L_bp; per_cycle: L_bp_cycles (the HF release's [2])."""
  return ml_collections.ConfigDict(dict(
      schedule='', bp_min=2, bp_max=5, warmup_ratio=0.2, H_bp=0, L_bp=0,
      L_bp_cycles=config_dict.placeholder(tuple)))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_schema()
  # How the model runs (model.config.ComputeConfig): dtype, remat policy, attention kernel
  # ('auto': the one for the devices), loop unrolling. Not part of a checkpoint's model.
  c.compute = ml_collections.ConfigDict(ComputeConfig().to_dict())
  c.data = data_config()
  c.train = ml_collections.ConfigDict(dict(
      steps=0,  # 0: epochs * tokens per epoch / global batch
      epochs=4,
      global_batch_tokens=196_608,
      # Gradient accumulation steps per train step; 0: the fewest whose step fits the devices'
      # memory (training.fit; with compute.remat_policy 'auto', the cheapest remat that fits too).
      micro_batches=1,
      lr=2.2e-4, warmup_steps=2000, lr_min_ratio=1.0,
      b1=0.9, b2=0.95, weight_decay=0.1, ema_decay=0.9999,
      horizon=horizon_schema(),
      # The fixed vector z_L starts from, never trained: 'truncated_normal' (reference training)
      # or 'zeros' (the HF release's). init_from takes the source's.
      z_L_init='truncated_normal',
      # Cross-entropy over this many positions at a time (0: whole rows; -1: 512 where a row's
      # float32 logits take >= 128 MiB). Same values; saves the memory of the full logits.
      loss_chunk_len=-1,
      seed=0,
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # Saves every `every_steps` steps and, if every_minutes > 0, when that many minutes passed since
  # the last save (all processes agree on the step), at the end, and on SIGTERM.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, every_minutes=0.0, keep=3,
                                                async_save=True))
  # A jax.profiler trace of num_steps steps (0: none) from step start_step (as logged, from 1), in
  # <workdir>/tb where TensorBoard's profile plugin reads it.
  c.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
  # Held-out eval: teacher-forced loss/accuracies (rows per batch; 0: the train step's rows) and,
  # with generate_per_task > 0 (single-process runs), greedy generation's exact match on that many
  # raw held-out examples per task (the `hrmtext.evaluate` harness).
  c.eval = ml_collections.ConfigDict(dict(every_steps=1000, rows=0, generate_per_task=0))
  c.log_every_steps = 10
  # Fine-tuning (SFT): start a new run from another run's latest checkpoint. init_mode
  # 'continue' (the reference default): its params, EMA, optimizer moments and per-leaf counts,
  # with the step counter and lr/bp_steps schedules restarting at 0 and this config's betas,
  # weight decay and EMA decay; 'ema' / 'params': its EMA / raw weights, a fresh optimizer and EMA.
  c.init_from = ''
  c.init_mode = 'continue'
  # LoRA (hrmtext.model.lora; rank 0: off): adapters of rank `rank` (scale alpha / rank, dropout
  # on their input) on the `targets` projections (attn.q/k/v/gate/o, mlp.gate/up/down, lm_head;
  # groups attn, mlp, all) of the `stacks` ('both', 'H', 'L') train, the weights of `init_from`
  # (its EMA with init_mode ema, else its params) stay frozen in `base_dtype` ('': the compute
  # dtype). Checkpoints hold the adapters and refer to that run.
  c.lora = ml_collections.ConfigDict(LoraConfig().to_dict())
  return c


def _at_least(low):
  return (lambda value, _: value >= low), f'>= {low}'


_FRACTION = (lambda value, _: 0 <= value < 1), 'in [0, 1)'

# (field, (is the value fine given the config, what it must be)). Model fields are ModelConfig's.
_RULES = (
    ('train.steps', (lambda v, _: v >= 0, '>= 0 (0: train.epochs epochs)')),
    ('train.epochs', (lambda v, c: v >= 1 or c.train.steps > 0, '>= 1 when train.steps is 0')),
    ('data.seq_len', _at_least(1)),
    ('train.global_batch_tokens', (lambda v, c: v >= c.data.seq_len, '>= data.seq_len (one row)')),
    ('train.micro_batches', (lambda v, _: v >= 0, '>= 0 (0: the fewest that fit the devices)')),
    ('train.lr', _at_least(0)),
    ('train.warmup_steps', _at_least(0)),
    ('train.lr_min_ratio', _at_least(0)),
    ('train.b1', _FRACTION),
    ('train.b2', _FRACTION),
    ('train.weight_decay', _at_least(0)),
    ('train.ema_decay', (lambda v, _: 0 <= v <= 1, 'in [0, 1]')),
    ('train.horizon.bp_min', _at_least(1)),
    ('train.horizon.bp_max', (lambda v, c: v >= c.train.horizon.bp_min,
                              '>= train.horizon.bp_min')),
    ('train.horizon.warmup_ratio', _at_least(0)),
    ('train.horizon.H_bp', _at_least(0)),
    ('train.horizon.L_bp', _at_least(0)),
    ('train.z_L_init', (lambda v, _: v in ('truncated_normal', 'zeros'),
                        "'truncated_normal' or 'zeros'")),
    ('train.loss_chunk_len', (lambda v, _: v >= -1, '>= 0, or -1 (auto)')),
    ('data.worker_count', _at_least(0)),
    ('data.worker_buffer_size', _at_least(1)),
    ('data.pack_window_rows', _at_least(1)),
    ('data.max_segments_per_row', _at_least(1)),
    ('checkpoint.every_steps', _at_least(1)),
    ('checkpoint.every_minutes', (lambda v, _: v >= 0, '>= 0 (0: off)')),
    ('checkpoint.keep', _at_least(1)),  # 0 would delete every checkpoint, old ones too
    ('eval.every_steps', _at_least(1)),
    ('eval.rows', (lambda v, _: v >= 0, ">= 0 (0: the train step's rows)")),
    ('eval.generate_per_task', _at_least(0)),
    ('profile.start_step', _at_least(1)),
    ('profile.num_steps', _at_least(0)),
    ('log_every_steps', _at_least(1)),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """UserError naming the first field of an experiment config (base_config's schema) whose value
  cannot work, e.g. checkpoint.keep=0 (which would delete every checkpoint) or train.steps=-1
  (which would train nothing and exit 0). Call it before any work."""
  for field, (fine, requirement) in _RULES:
    value = config
    for key in field.split('.'):
      value = value.get(key) if value is not None else None
    if value is not None and not fine(value, config):
      raise UserError(f'config {field}={value!r}: must be {requirement}')
  LoraConfig.from_dict(config.get('lora'))  # its own checks


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig of `config.model`: its size preset, then its fields; an unset vocab_size is
  `vocab_size` (the tokenizer's), padded to vocab_multiple."""
  fields = config.model.to_dict()
  fields['vocab_size'] = fields['vocab_size'] or vocab_size
  return ModelConfig.from_dict(fields)


def resolve(config: ml_collections.ConfigDict, *, vocab_size: int, epoch_tokens: int | None,
            device) -> ml_collections.ConfigDict:
  """A copy of a validated `config` with every value left to a default filled in, once, at
  start-up: what the run does, written to its config.json.

  model: the size preset expanded, vocab_size (unset: `vocab_size`, the tokenizer's, padded to
  vocab_multiple), cycles, MLP size and embedding scale; compute.attention 'auto': the kernel
  for `device`; train.steps 0: train.epochs over `epoch_tokens` tokens; train.loss_chunk_len -1;
  train.horizon: its schedule and numbers; eval.rows 0: a micro-batch's rows (once
  train.micro_batches is known: 0 leaves both to training.fit).
  """
  r = ml_collections.ConfigDict(config.to_dict())
  tc = r.train
  model_cfg = model_config(config, vocab_size)
  r.model = ml_collections.ConfigDict(dict(
      model_cfg.to_dict(), size='', vocab_multiple=1, intermediate_size=model_cfg.mlp_size,
      embedding_scale=model_cfg.scale))
  if r.compute.attention == 'auto':
    r.compute.attention = auto_implementation(device, r.compute.dtype)
  if not tc.steps:
    if epoch_tokens is None:
      raise UserError('train.steps is 0 and there is no data to count epochs in')
    tc.steps = max(1, tc.epochs * epoch_tokens // tc.global_batch_tokens)
  tc.loss_chunk_len = step.loss_chunk_len(tc.loss_chunk_len, model_cfg.vocab_size,
                                          r.data.seq_len)
  tc.horizon = schedules.resolve_horizon(tc.horizon, model_cfg)
  if tc.micro_batches:  # else fit.fit picks them, and then the eval rows
    r.eval.rows = r.eval.rows or max(1, tc.global_batch_tokens // r.data.seq_len //
                                     tc.micro_batches)
  return r
