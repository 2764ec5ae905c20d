"""Training schedules (DESIGN §3): learning rate and the credit horizon.

Both take the 0-based global train step, i.e. the number of updates applied before this one.
"""
import math

import jax.numpy as jnp
import ml_collections

from hrmtext.errors import UserError
from hrmtext.model.config import ARCHITECTURES, ModelConfig
from hrmtext.model.horizon import (Horizon, bp_steps_horizon, fixed_horizon, full_horizon,
                                   per_cycle_horizon)

# train.horizon.schedule: how the credit horizon goes over training.
#   warmup     HRM's: bp_steps from bp_min to bp_max over the first warmup_ratio of training
#   fixed      the last H_bp H and L_bp L applications (the baselines' reference horizons)
#   full       every application differentiable (full backprop through time)
#   per_cycle  the HF release's L_bp_cycles: every H application, trailing L steps per H cycle
HORIZON_SCHEDULES = ('warmup', 'fixed', 'full', 'per_cycle')


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  lr_min_ratio: float = 1.0):
  """lr(step): linear warmup to `peak_lr`, then cosine down to `peak_lr * lr_min_ratio`.

  The update at 0-based `step` is counted as update `step + 1`, as the reference does (it
  increments its step before computing the lr): the first update uses peak_lr / warmup_steps
  instead of wasting a batch on lr 0, `peak_lr` is reached at step warmup_steps - 1 and the
  floor at step total_steps - 1 (held afterwards). lr_min_ratio=1 gives warmup then constant.
  Works on Python ints and traced int arrays.
  """
  def schedule(step):
    t = jnp.asarray(step, jnp.float32) + 1
    warmup = peak_lr * t / max(1, warmup_steps)
    progress = jnp.clip((t - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * progress))
    decayed = peak_lr * (lr_min_ratio + (1 - lr_min_ratio) * cosine)
    return jnp.where(t < warmup_steps, warmup, decayed)

  return schedule


def bp_steps(step: int, total_steps: int, bp_min: int = 2, bp_max: int = 5,
             bp_warmup_ratio: float = 0.2) -> int:
  """Credit horizon at `step`: grows linearly from bp_min to bp_max over the first
  `bp_warmup_ratio` of training (host-side: each value is a separately compiled step)."""
  warmup = bp_warmup_ratio * total_steps
  progress = 1.0 if warmup <= 0 else min(1.0, step / warmup)
  return bp_min + math.floor(progress * (bp_max - bp_min))


def resolve_horizon(horizon: ml_collections.ConfigDict, cfg: ModelConfig) -> dict:
  """`train.horizon` with its schedule filled ('': the architecture's, see ARCHITECTURES) and,
  for 'fixed', H_bp/L_bp left at 0 taken from the architecture."""
  resolved = dict(horizon)
  default = ARCHITECTURES[cfg.architecture].horizon
  if not resolved['schedule']:
    resolved['schedule'] = default if isinstance(default, str) else 'fixed'
  if resolved['schedule'] not in HORIZON_SCHEDULES:
    raise UserError(f"train.horizon.schedule {resolved['schedule']!r} is not one of "
                    f'{", ".join(HORIZON_SCHEDULES)}')
  if resolved['schedule'] == 'fixed' and not (resolved['H_bp'] or resolved['L_bp']):
    if isinstance(default, str):
      raise UserError(f'train.horizon.schedule fixed needs H_bp and L_bp for {cfg.architecture}')
    resolved['H_bp'], resolved['L_bp'] = default
  if resolved['schedule'] == 'per_cycle' and not resolved['L_bp_cycles']:
    raise UserError('train.horizon.schedule per_cycle needs L_bp_cycles')
  resolved['L_bp_cycles'] = list(resolved['L_bp_cycles'] or ())
  return resolved


def horizon_schedule(horizon: dict, cfg: ModelConfig, total_steps: int):
  """step -> Horizon of a resolved `train.horizon` (resolve_horizon)."""
  schedule = horizon['schedule']
  if schedule == 'warmup':
    return lambda step: bp_steps_horizon(cfg, bp_steps(
        step, total_steps, horizon['bp_min'], horizon['bp_max'], horizon['warmup_ratio']))
  fixed = {'full': lambda: full_horizon(cfg),
           'fixed': lambda: fixed_horizon(cfg, horizon['H_bp'], horizon['L_bp']),
           'per_cycle': lambda: per_cycle_horizon(cfg, horizon['L_bp_cycles'])}[schedule]()
  return lambda step: fixed


def final_horizon(horizon: dict, cfg: ModelConfig) -> Horizon:
  """The horizon at the end of training (all of it, past any warmup)."""
  return horizon_schedule(horizon, cfg, total_steps=1)(1)
