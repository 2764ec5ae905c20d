"""Training schedules (DESIGN §3): learning rate and the credit-horizon (bp_steps) warmup.

Both take the 0-based global train step, i.e. the number of updates applied before this one.
"""
import math

import jax.numpy as jnp


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
