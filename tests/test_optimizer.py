"""AdamATan2 + EMA against a plain NumPy reference; lr and bp_steps schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrmtext.train import optimizer, schedules

B1, B2, WD, PEAK_LR, WARMUP, DECAY = 0.9, 0.95, 0.1, 0.05, 4, 0.8


def numpy_lr(step):
  t = step + 1  # reference convention: the step counter is incremented before the lr
  return PEAK_LR * min(1.0, t / WARMUP)


def numpy_reference(params, grads_per_step, masks_per_step):
  """Reference semantics, leaf by leaf: a skipped leaf keeps params, moments, count and EMA."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  ema = dict(params)
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  count = dict.fromkeys(params, 0)
  for step, (grads, mask) in enumerate(zip(grads_per_step, masks_per_step)):
    lr = numpy_lr(step)
    for k in params:
      if not mask[k]:
        continue
      g = grads[k].astype(np.float64)
      count[k] += 1
      mu[k] = B1 * mu[k] + (1 - B1) * g
      nu[k] = B2 * nu[k] + (1 - B2) * g * g
      m_hat, v_hat = mu[k] / (1 - B1**count[k]), nu[k] / (1 - B2**count[k])
      params[k] = params[k] * (1 - lr * WD) - lr * np.arctan2(m_hat, np.sqrt(v_hat))
      ema[k] = DECAY * ema[k] + (1 - DECAY) * params[k]
  return params, ema, count, mu, nu


def test_adam_atan2_and_ema_match_numpy_with_per_leaf_skipping():
  rng = np.random.default_rng(0)
  shapes = {'embed': (5, 3), 'w': (3, 4), 'b': (4,)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  steps = 10
  # Grads are nonzero even where masked: the optimizer must ignore them there.
  grads_per_step = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
                    for _ in range(steps)]
  masks_per_step = [{'embed': step % 3 == 1, 'w': True, 'b': step != 4} for step in range(steps)]

  tx = optimizer.adam_atan2(
      schedules.warmup_cosine(PEAK_LR, WARMUP, total_steps=100), B1, B2, weight_decay=WD)
  params = jax.tree.map(jnp.asarray, init)
  opt_state, ema = tx.init(params), optimizer.ema_init(params)
  for grads, mask in zip(grads_per_step, masks_per_step):

    @jax.jit
    def train_step(params, opt_state, ema, grads, mask=mask):
      updates, opt_state = tx.update(grads, opt_state, params, grad_mask=mask)
      params = optax.apply_updates(params, updates)
      return params, opt_state, optimizer.ema_update(ema, params, DECAY, mask)

    before = opt_state
    params, opt_state, ema = train_step(params, opt_state, ema, grads)
    for k, keep in mask.items():
      if not keep:  # skipped leaves keep their state bit for bit
        assert int(opt_state.count[k]) == int(before.count[k])
        np.testing.assert_array_equal(opt_state.mu[k], before.mu[k])
        np.testing.assert_array_equal(opt_state.nu[k], before.nu[k])

  ref_params, ref_ema, ref_count, ref_mu, ref_nu = numpy_reference(
      init, grads_per_step, masks_per_step)
  assert int(opt_state.step) == steps
  assert {k: int(c) for k, c in opt_state.count.items()} == ref_count
  assert ref_count['embed'] < ref_count['b'] < ref_count['w']  # the per-leaf counts differ
  for k in shapes:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ema[k], ref_ema[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(opt_state.mu[k], ref_mu[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(opt_state.nu[k], ref_nu[k], rtol=2e-5, atol=2e-6)
    assert params[k].dtype == ema[k].dtype == opt_state.mu[k].dtype == jnp.float32


def test_prefix_mask_and_chain_forward_the_mask():
  params = {'embed': jnp.ones((2, 2)), 'blocks': {'w': jnp.ones(3), 'b': jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optimizer.adam_atan2(0.1, weight_decay=0.1))
  mask = {'embed': False, 'blocks': True}
  updates, state = tx.update(grads, tx.init(params), params, grad_mask=mask)
  np.testing.assert_array_equal(updates['embed'], 0.0)
  assert np.all(np.asarray(updates['blocks']['w']) < 0)
  assert int(state[1].count['embed']) == 0 and int(state[1].count['blocks']['b']) == 1


def test_warmup_cosine():
  peak, warmup, total, ratio = 2.0, 10, 110, 0.1
  lr = schedules.warmup_cosine(peak, warmup, total, lr_min_ratio=ratio)
  for step in range(warmup - 1):
    assert float(lr(step)) == pytest.approx(peak * (step + 1) / warmup)
  assert float(lr(warmup - 1)) == pytest.approx(peak)
  middle = warmup - 1 + (total - warmup) // 2
  assert float(lr(middle)) == pytest.approx(peak * (ratio + (1 - ratio) / 2))
  assert float(lr(total - 1)) == pytest.approx(peak * ratio)
  assert float(lr(total + 50)) == pytest.approx(peak * ratio)
  values = [float(lr(s)) for s in range(warmup - 1, total)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert float(jax.jit(lr)(jnp.int32(3))) == pytest.approx(float(lr(3)))

  constant = schedules.warmup_cosine(peak, warmup, total)
  assert [float(constant(s)) for s in (warmup, total // 2, total + 7)] == pytest.approx([peak] * 3)


def test_bp_steps():
  total = 1000  # warmup over the first 200 steps
  assert schedules.bp_steps(0, total) == 2
  assert schedules.bp_steps(66, total) == 2 + math.floor(66 / 200 * 3)
  assert schedules.bp_steps(67, total) == 3
  assert schedules.bp_steps(199, total) == 4
  assert schedules.bp_steps(200, total) == 5
  assert schedules.bp_steps(10_000, total) == 5
  values = [schedules.bp_steps(s, total) for s in range(300)]
  assert all(a <= b for a, b in zip(values, values[1:]))
  assert schedules.bp_steps(0, total, bp_warmup_ratio=0.0) == 5
  assert schedules.bp_steps(3, 0) == 5
