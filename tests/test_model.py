"""Model semantics: HF parity, credit horizon (values and cost). Packing invariance, for every
architecture, is in test_baselines.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrmtext.model import (AttentionMask, ComputeConfig, ModelConfig, bp_steps_horizon, build_model,
                           per_cycle_horizon)
from tests import hf_oracle
from tests.hf_oracle import torch


def padded_batch(lengths, prefix_lengths, vocab, total, seed=0):
  """Right-padded single-example rows, as HF sees them (attention_mask, token_type_ids)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (len(lengths), total))
  valid = np.arange(total)[None] < np.array(lengths)[:, None]
  instruction = np.arange(total)[None] < np.array(prefix_lengths)[:, None]
  return tokens * valid, valid.astype(np.int64), instruction.astype(np.int64)


@hf_oracle.needs_hf
@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(H_cycles=1, L_cycles=2, layers=1),
    dict(H_cycles=3, L_cycles=1, layers=3, heads=4, head_dim=16, hidden=48, L_bp_cycles=(1, 1)),
])
def test_logits_match_transformers(kwargs):
  model = hf_oracle.make_hf_model(**kwargs)
  cfg, params = hf_oracle.to_hrmtext(model)
  tokens, valid, instruction = padded_batch([12, 9, 5], [4, 9, 1], cfg.vocab_size, 12)
  with torch.no_grad():
    expected = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid),
                     token_type_ids=torch.tensor(instruction)).logits.numpy()
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  batch = dict(inputs=tokens, positions=positions, segment_ids=valid, is_instruction=instruction)
  got = np.asarray(build_model(cfg).logits(params, jax.tree.map(jnp.asarray, batch)))
  scale = np.abs(expected).max()
  err = np.abs(got - expected)[valid.astype(bool)].max() / scale
  assert err <= 1e-4, err


def small_config(**kw):
  return ModelConfig(**{**dict(vocab_size=97, hidden_size=32, num_heads=2, head_dim=16,
                               intermediate_size=64, layers_per_stack=2), **kw})


def test_mask_rule():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  inst = jnp.array([[1, 1, 0, 1, 0, 0]])
  mask = np.asarray(AttentionMask.packed(seg, inst).dense()[0, 0])
  expected = np.array([
      [1, 1, 0, 0, 0, 0],  # instruction: whole instruction of its segment
      [1, 1, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],  # response: causal within its segment
      [0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],  # padding sees only padding
  ], bool)
  np.testing.assert_array_equal(mask, expected)


def test_horizon_definition():
  cfg = ModelConfig(H_cycles=2, L_cycles=3)
  h = bp_steps_horizon(cfg, 2)
  assert h.H == (False, True) and h.L == (False,) * 5 + (True,)
  assert not build_model(cfg).has_gradient(h)['embed']  # the reference quirk
  h = bp_steps_horizon(cfg, 4)
  assert h.H == (True, True) and h.L == (False,) * 4 + (True,) * 2
  assert build_model(cfg).has_gradient(h)['embed']
  h = per_cycle_horizon(cfg, (2,))  # the HF release's L_bp_cycles [2]
  assert h.H == (True, True) and h.L == (False, False, True, False, True, True)
  with pytest.raises(ValueError):
    bp_steps_horizon(cfg, 9)


def naive_logits(model, params, batch, horizon):
  """Every application in a Python loop; forward-only outputs become constants."""
  cfg = model.cfg
  z_H, rope, mask = model._inputs(params, batch)
  z_L = jnp.broadcast_to(jax.lax.stop_gradient(params['z_L_init']), z_H.shape)  # never trained
  run = lambda name, x, diff: (lambda y: y if diff else jax.lax.stop_gradient(y))(
      model.stack.apply({'params': params[name]}, x, rope, mask)[0])
  for h in range(cfg.H_cycles):
    for l in range(cfg.L_cycles):
      z_L = run('L', z_L + z_H, horizon.L[h * cfg.L_cycles + l])
    z_H = run('H', z_H + z_L, horizon.H[h])
  return model.head.apply({'params': params['lm_head']}, z_H)


def random_batch(cfg, rows=2, length=16, seed=0):
  rng = np.random.default_rng(seed)
  return dict(inputs=rng.integers(0, cfg.vocab_size, (rows, length)),
              positions=np.tile(np.arange(length), (rows, 1)),
              segment_ids=np.ones((rows, length), np.int32),
              is_instruction=np.tile(np.arange(length) < 5, (rows, 1)))


# 8 (every application differentiable) and the per-cycle horizon (the HF release's L_bp_cycles,
# here [1, 2]) run on the CI leg that runs `slow` tests.
@pytest.mark.parametrize('bp_steps', [2, 3, 5, pytest.param(8, marks=pytest.mark.slow),
                                      pytest.param('per_cycle', marks=pytest.mark.slow)])
def test_horizon_gradients_match_naive_stop_gradient(bp_steps):
  cfg = small_config()
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(2)))
  batch = random_batch(cfg, rows=1, length=8)
  horizon = (per_cycle_horizon(cfg, (1, 2)) if bp_steps == 'per_cycle' else
             bp_steps_horizon(cfg, bp_steps))
  weights = jax.random.normal(jax.random.key(3), (1, 8, cfg.vocab_size))
  loss = lambda f: lambda p: jnp.sum(f(p) * weights)
  got = jax.jit(jax.grad(loss(lambda p: model.logits(p, batch, horizon))))(params)
  want = jax.jit(jax.grad(loss(lambda p: naive_logits(model, p, batch, horizon))))(params)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  has_grad = model.has_gradient(horizon)
  for name, g in got.items():  # the static gradient map agrees with autodiff
    assert bool(np.any(jax.tree.leaves(g)[0] != 0)) == has_grad[name], name


def flops(fn, *args):
  """FLOPs of the program JAX emits, before XLA (which could only remove work): no compile."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.slow  # traces the train step once per horizon
def test_forward_only_applications_do_no_backward_work():
  """Each extra differentiable application adds exactly one application's backward cost."""
  cfg = small_config()
  model = build_model(cfg, ComputeConfig(unroll_loops=True, remat_policy='none'))
  params = nn.unbox(model.init(jax.random.key(2)))
  batch = jax.tree.map(jnp.asarray, random_batch(cfg, rows=2, length=32))
  loss = lambda p, h: jnp.sum(model.logits(p, batch, h)**2)
  step = {b: flops(jax.grad(lambda p, b=b: loss(p, bp_steps_horizon(cfg, b))), params)
          for b in range(2, 9)}
  # Backward cost of one stack application, measured on the stack alone.
  x, rope, mask = model._inputs(params, batch)
  apply = lambda p, x: jnp.sum(model.stack.apply({'params': p}, x, rope, mask)[0])
  backward = flops(jax.grad(apply, argnums=(0, 1)), params['L'], x) - flops(apply, params['L'], x)
  for b in range(4, 9):
    added = step[b] - step[b - 1]
    assert abs(added - backward) / backward < 0.03, (b, added, backward)
  # b=3 makes H0 differentiable, which also starts the embedding gradient (absent at b=2).
  assert 0 <= step[3] - step[2] - backward < 0.1 * backward
