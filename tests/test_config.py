"""The experiment config resolved once at start-up (training.config.resolve), the credit-horizon
section, and model configs of older checkpoints."""
from types import SimpleNamespace

import jax
import pytest

from hrmtext.cli import UserError
from hrmtext.model import ComputeConfig, ModelConfig, bp_steps_horizon, fixed_horizon
from hrmtext.training import schedules
from hrmtext.training.config import base_config, experiment_config, resolve

CPU = jax.devices('cpu')[0]
H100 = SimpleNamespace(platform='gpu', device_kind='NVIDIA H100 80GB HBM3', compute_capability='9.0')


def test_resolve_fills_every_default_once():
  config = experiment_config('experiments/hrm.py', 'XL')
  r = resolve(config, vocab_size=65_000, epoch_tokens=10**9, device=CPU)
  assert r.model.size == '' and r.model.vocab_size == 65_024  # padded to 256
  assert (r.model.hidden_size, r.model.layers_per_stack, r.model.H_cycles, r.model.L_cycles) == (
      1536, 16, 2, 3)
  assert r.model.intermediate_size == 4096 and r.model.embedding_scale == pytest.approx(1536**0.5)
  assert ModelConfig.from_dict(r.model).weight_differences(ModelConfig.from_dict(
      dict(config.model.to_dict(), vocab_size=65_000))) == {}  # the same weights, spelled out
  assert r.compute.attention == 'xla'  # 'auto' on a CPU
  assert resolve(config, vocab_size=65_000, epoch_tokens=10**9,
                 device=H100).compute.attention == 'cudnn'  # bf16 on Hopper
  assert r.train.steps == 4 * 10**9 // 196_608
  assert r.train.loss_chunk_len == 512  # 65k-vocab float32 logits of a 4096-token row
  assert r.train.horizon.schedule == 'warmup' and r.train.horizon.L_bp_cycles == []
  assert r.train.micro_batches == 0 and r.eval.rows == 0  # left to training.fit
  assert config.model.size == 'XL' and config.compute.attention == 'auto'  # a copy
  tiny = resolve(base_config(), vocab_size=300, epoch_tokens=10**6, device=CPU)
  assert tiny.eval.rows == 196_608 // 512  # a micro-batch's rows
  with pytest.raises(UserError, match='no data to count epochs in'):
    resolve(base_config(), vocab_size=300, epoch_tokens=None, device=CPU)


@pytest.mark.parametrize('architecture, horizon, want', [
    ('hrm', {}, ('warmup', 0, 0)),
    ('transformer', {}, ('full', 0, 0)),
    ('ut', {}, ('fixed', 0, 2)),
    ('rins', {}, ('fixed', 1, 4)),
    ('hrm', {'schedule': 'fixed', 'H_bp': 1, 'L_bp': 3}, ('fixed', 1, 3)),
    ('trm', {'schedule': 'full'}, ('full', 0, 0)),
])
def test_horizon_section_resolves_the_architecture_s_default(architecture, horizon, want):
  config = base_config()
  config.train.horizon.update(horizon)
  cfg = ModelConfig(architecture=architecture)
  resolved = schedules.resolve_horizon(config.train.horizon, cfg)
  assert (resolved['schedule'], resolved['H_bp'], resolved['L_bp']) == want


def test_horizon_schedules_step_by_step():
  cfg = ModelConfig()  # HRM, 2 H x 3 L
  warmup = dict(schedule='warmup', bp_min=2, bp_max=5, warmup_ratio=0.2, H_bp=0, L_bp=0,
                L_bp_cycles=[])
  at = schedules.horizon_schedule(warmup, cfg, total_steps=100)
  assert [at(s).differentiable for s in (0, 7, 13, 20, 99)] == [2, 3, 3, 5, 5]
  assert at(0) == bp_steps_horizon(cfg, 2)
  fixed = schedules.horizon_schedule(dict(warmup, schedule='fixed', H_bp=1, L_bp=3), cfg, 100)
  assert fixed(0) == fixed(99) == fixed_horizon(cfg, 1, 3)
  per_cycle = schedules.horizon_schedule(dict(warmup, schedule='per_cycle', L_bp_cycles=[2]),
                                         cfg, 100)
  assert per_cycle(0).L == (False, False, True, False, True, True)
  with pytest.raises(UserError, match='per_cycle needs L_bp_cycles'):
    schedules.resolve_horizon(dict(warmup, schedule='per_cycle'), cfg)
  with pytest.raises(UserError, match='is not one of'):
    schedules.resolve_horizon(dict(warmup, schedule='sometimes'), cfg)


def test_model_configs_of_older_checkpoints_still_load():
  """Before ComputeConfig and train.horizon, a checkpoint's model config held how it ran and its
  horizon: reading it keeps what the weights are."""
  old = dict(ModelConfig(hidden_size=64, num_heads=2, head_dim=32).to_dict(), dtype='bfloat16',
             remat_policy='none', attention='cudnn', unroll_loops=True, H_bp=0, L_bp=0,
             L_bp_cycles=[2], full_bptt=False, z_L_init='zeros')
  assert ModelConfig.from_dict(old) == ModelConfig(hidden_size=64, num_heads=2, head_dim=32)
  assert ComputeConfig.from_dict(old) == ComputeConfig(
      dtype='bfloat16', remat_policy='none', attention='cudnn', unroll_loops=True)
