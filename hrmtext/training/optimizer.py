"""AdamATan2 and the parameter EMA (DESIGN §3), with per-parameter skipping.

A parameter that the current credit horizon leaves without a gradient (the token embedding
while bp_steps = 2) is skipped entirely that step, as the reference optimizer skips params
whose grad is None: no weight decay, no moment, step-count or EMA update. The train step
knows statically which leaves get a gradient and says so with `grad_mask`, a pytree of
Python bools with the params' structure or a prefix of it (e.g. {'embed': False, 'blocks':
True}). Each distinct mask is its own compiled step. Use from a train step:

  tx = adam_atan2(schedules.warmup_cosine(...), weight_decay=0.1)
  updates, opt_state = tx.update(grads, opt_state, params, grad_mask=grad_mask)
  params = optax.apply_updates(params, updates)
  ema = ema_update(ema, params, ema_decay, grad_mask)

Grads of masked leaves are ignored (pass the zeros jax.grad gives).
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdamATan2State(NamedTuple):
  step: jax.Array  # int32 []: updates applied so far (global train step); drives the lr schedule
  count: Any  # per leaf, int32 []: updates this leaf took part in; drives its bias correction
  mu: Any  # per leaf, fp32: first moment
  nu: Any  # per leaf, fp32: second moment


def _leaf_mask(grad_mask, params):
  """Broadcasts a (prefix) mask of Python bools to one bool per params leaf."""
  if grad_mask is None:
    return jax.tree.map(lambda _: True, params)
  return jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: bool(keep), sub), grad_mask, params)


def adam_atan2(learning_rate: float | Callable, b1: float = 0.9, b2: float = 0.95,
               weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """The reference AdamATan2 (no epsilon) with decoupled weight decay.

  Per leaf that has a gradient, with bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t from the
  leaf's own count t:
    p <- p * (1 - lr * weight_decay)
    p <- p - (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))
  The first-moment correction scales the step, outside the atan2 (the first update of a
  consistent gradient moves lr / (1 - b1) * atan2(1 - b1, 1), about 0.997 lr). The moments are
  updated as the reference does, m <- m + (1 - b1) (g - m) and v <- b2 v + (1 - b2) g^2.
  `learning_rate` is a float or a schedule of the global step, which the state counts (every
  update call, whatever the mask), so it equals the train step when the state is created at 0.
  """
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return AdamATan2State(step=jnp.zeros([], jnp.int32),
                          count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
                          mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(grads, state, params=None, *, grad_mask=None, **unused_extra_args):
    if params is None:
      raise ValueError('adam_atan2 needs params (for weight decay)')
    lr = jnp.asarray(schedule(state.step), jnp.float32)

    def leaf(grad, param, count, mu, nu, has_grad):
      if not has_grad:
        return jnp.zeros_like(param), count, mu, nu
      grad = grad.astype(jnp.float32)
      count = count + 1
      mu = mu + (1 - b1) * (grad - mu)
      nu = b2 * nu + (1 - b2) * grad * grad
      t = count.astype(jnp.float32)
      bc1, bc2 = 1 - jnp.float32(b1)**t, 1 - jnp.float32(b2)**t
      direction = jnp.arctan2(mu, jnp.sqrt(nu) / jnp.sqrt(bc2))
      update = -(lr * weight_decay) * param - (lr / bc1) * direction
      return update.astype(param.dtype), count, mu, nu

    per_leaf = jax.tree.map(leaf, grads, params, state.count, state.mu, state.nu,
                            _leaf_mask(grad_mask, params))
    updates, count, mu, nu = jax.tree.transpose(
        jax.tree.structure(params), jax.tree.structure((0, 0, 0, 0)), per_leaf)
    return updates, AdamATan2State(step=state.step + 1, count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def state_shardings(param_shardings) -> AdamATan2State:
  """Shardings of an AdamATan2State: moments like their params, counters replicated."""
  some_sharding = jax.tree.leaves(param_shardings)[0]
  replicated = jax.sharding.NamedSharding(some_sharding.mesh, jax.sharding.PartitionSpec())
  return AdamATan2State(step=replicated, count=jax.tree.map(lambda _: replicated, param_shardings),
                        mu=param_shardings, nu=param_shardings)


def ema_init(params):
  """The EMA starts as a copy of the params."""
  return jax.tree.map(jnp.copy, params)


def ema_update(ema, params, decay: float = 0.9999, grad_mask=None):
  """ema <- decay * ema + (1 - decay) * params, except for leaves masked out by grad_mask."""
  return jax.tree.map(lambda e, p, keep: e + (1 - decay) * (p - e) if keep else e,
                      ema, params, _leaf_mask(grad_mask, params))
