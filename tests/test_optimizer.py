"""AdamATan2 + EMA against an fp32 PyTorch oracle of the reference formula; lr and bp_steps
schedules. `torch_oracle` is reused by test_sft.py (a tiny training run's first 3 steps)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hrmtext.training import optimizer, schedules

B1, B2, WD, PEAK_LR, WARMUP, DECAY = 0.9, 0.95, 0.1, 0.05, 4, 0.8


def reference_lr(step):
  """The reference's lr for the update at 0-based `step` (it counts updates from 1)."""
  return PEAK_LR * min(1.0, (step + 1) / WARMUP)


def torch_oracle(torch, params, grads_per_step, masks_per_step, lr_of_step=reference_lr,
                 b1=B1, b2=B2, wd=WD, ema_decay=DECAY, count=None, mu=None, nu=None, ema=None):
  """The reference AdamATan2 + EMA in fp32 PyTorch, written from its formula, leaf by leaf:

    p <- p * (1 - lr * wd);  p <- p - (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))

  with bc1 = 1 - b1^t, bc2 = 1 - b2^t from the leaf's own count t. A leaf without a gradient
  that step (mask False) is skipped: no decay, no moment, count or EMA update.
  Returns (params, ema, count, mu, nu) as NumPy arrays / ints.
  """
  tensor = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)
  p = {k: tensor(v) for k, v in params.items()}
  ema = {k: tensor(v) for k, v in (ema or params).items()}
  mu = {k: tensor(v) for k, v in mu.items()} if mu else {k: torch.zeros_like(v) for k, v in p.items()}
  nu = {k: tensor(v) for k, v in nu.items()} if nu else {k: torch.zeros_like(v) for k, v in p.items()}
  count = {k: torch.tensor(float(c)) for k, c in (count or dict.fromkeys(p, 0)).items()}
  for step, (grads, mask) in enumerate(zip(grads_per_step, masks_per_step)):
    lr = torch.tensor(lr_of_step(step), dtype=torch.float32)
    for k in p:
      if not mask[k]:
        continue
      g = tensor(grads[k])
      p[k].mul_(1 - lr * wd)
      mu[k].lerp_(g, 1 - b1)
      nu[k].mul_(b2).addcmul_(g, g, value=1 - b2)
      count[k] += 1
      bc1, bc2 = 1 - b1**count[k], 1 - b2**count[k]
      p[k].add_(-(lr / bc1) * torch.atan2(mu[k], nu[k].sqrt() / bc2.sqrt()))
      ema[k].lerp_(p[k], 1 - ema_decay)
  numpy = lambda d: {k: v.numpy() for k, v in d.items()}
  return numpy(p), numpy(ema), {k: int(c) for k, c in count.items()}, numpy(mu), numpy(nu)


def test_adam_atan2_and_ema_match_a_torch_oracle_with_per_leaf_skipping():
  torch = pytest.importorskip('torch', reason='the oracle is written in PyTorch (not installed)')
  rng = np.random.default_rng(0)
  shapes = {'embed': (5, 3), 'w': (3, 4), 'b': (4,)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  steps = 10
  # Consistent-sign gradients in 'w' (where the bias-correction placement matters most), noisy
  # elsewhere. Grads are nonzero even where masked: the optimizer must ignore them there.
  grads_per_step = [{k: (rng.normal(size=s) + (3.0 if k == 'w' else 0.0)).astype(np.float32)
                     for k, s in shapes.items()} for _ in range(steps)]
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

    before, before_params = opt_state, params
    params, opt_state, ema = train_step(params, opt_state, ema, grads)
    for k, keep in mask.items():
      if not keep:  # skipped leaves keep their params and state bit for bit
        np.testing.assert_array_equal(params[k], before_params[k])
        assert int(opt_state.count[k]) == int(before.count[k])
        np.testing.assert_array_equal(opt_state.mu[k], before.mu[k])
        np.testing.assert_array_equal(opt_state.nu[k], before.nu[k])

  ref_params, ref_ema, ref_count, ref_mu, ref_nu = torch_oracle(
      torch, init, grads_per_step, masks_per_step)
  assert int(opt_state.step) == steps
  assert {k: int(c) for k, c in opt_state.count.items()} == ref_count
  assert ref_count['embed'] < ref_count['b'] < ref_count['w']  # the per-leaf counts differ
  for k in shapes:
    for ours, ref in ((params, ref_params), (ema, ref_ema), (opt_state.mu, ref_mu),
                      (opt_state.nu, ref_nu)):
      np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert params[k].dtype == ema[k].dtype == opt_state.mu[k].dtype == jnp.float32


def test_first_update_moves_a_consistent_gradient_by_the_reference_step():
  """bc1 scales the step outside the atan2: the first update is lr/(1-b1)*atan2(1-b1, 1)
  ~ 0.997 lr, not atan2(1, 1) = 0.785 lr (bias correction inside the atan2)."""
  lr = 0.01
  params = {'w': jnp.zeros(3)}
  tx = optimizer.adam_atan2(lr, B1, B2)
  updates, _ = tx.update({'w': jnp.full(3, 0.5)}, tx.init(params), params)
  expected = -lr / (1 - B1) * math.atan2(1 - B1, 1)
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-6)
  assert expected == pytest.approx(-0.9967 * lr, rel=1e-4)


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

