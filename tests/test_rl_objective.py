"""The RL objective (hrmtext.rl.objective) against values worked out by hand, and its gradient
against the explicit policy-gradient sum on a toy model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrmtext.rl import objective


def test_group_advantages():
  # Group 1: rewards 1, 0, 0, 1 -> mean 0.5, std 0.5 -> +-1; group 2 all equal -> 0.
  got = objective.group_advantages(np.array([1, 0, 0, 1, 3, 3, 3, 3.]), group_size=4, eps=1e-12)
  np.testing.assert_allclose(got, [1, -1, -1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(objective.group_advantages([3, 3, 3, 3.], 4), [0, 0, 0, 0])
  # Rewards 0, 1, 2: mean 1, population std sqrt(2/3).
  np.testing.assert_allclose(objective.group_advantages([0, 1, 2.], 3, eps=0),
                             np.array([-1, 0, 1]) / np.sqrt(2 / 3), rtol=1e-6)


def test_informative_groups_are_those_with_different_rewards():
  rewards = np.array([1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(objective.informative_groups(rewards, 2),
                                [False, False, False, True, False, False])
  np.testing.assert_array_equal(objective.informative_groups(rewards, 4), [True, True, False])


def test_token_weights_token_and_sequence_level():
  lengths = np.array([2, 6, 0, 4])  # the third: no tokens (e.g. dropped as overlong)
  token = objective.token_weights(lengths, token_level=True)
  np.testing.assert_allclose(token, [1 / 12, 1 / 12, 0, 1 / 12])
  assert np.sum(token * lengths) == pytest.approx(1)  # a weighted mean over tokens
  sequence = objective.token_weights(lengths, token_level=False)
  np.testing.assert_allclose(sequence, [1 / 6, 1 / 18, 0, 1 / 12])
  assert np.sum(sequence * lengths) == pytest.approx(1)  # a mean over 3 responses
  kept = objective.token_weights(lengths, True, keep=np.array([True, False, True, True]))
  np.testing.assert_allclose(kept, [1 / 6, 0, 0, 1 / 6])


def test_clipping_is_asymmetric_and_only_where_it_binds():
  """DAPO's clip: ratio 1.25 with A > 0 is inside [0.8, 1.28]; 1.5 is clipped to 1.28; ratio 0.5
  with A < 0 is clipped to 0.8; ratio 0.5 with A > 0 is not (min takes the unclipped term)."""
  ratio = jnp.array([1.25, 1.5, 0.5, 0.5])
  advantage = jnp.array([1.0, 1.0, -1.0, 1.0])
  weights = jnp.full(4, 0.25)
  loss, sums = objective.policy_loss(jnp.log(ratio), jnp.zeros(4), advantage, weights)
  want = -(1.25 * 1 + 1.28 * 1 + 0.8 * -1 + 0.5 * 1) / 4
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(sums['clip_fraction']) == pytest.approx(0.5)  # the 2nd and 3rd tokens
  # The clipped tokens get no gradient; the others d(-rho A)/d logp = -rho A * weight.
  grad = jax.grad(lambda logp: objective.policy_loss(logp, jnp.zeros(4), advantage, weights)[0])(
      jnp.log(ratio))
  np.testing.assert_allclose(grad, [-1.25 * 0.25, 0, 0, -0.5 * 0.25], rtol=1e-6)


def test_k3_is_the_kl_estimator():
  """k3 = r - log r - 1 with r = p_ref / p: 0 where equal, positive otherwise; its mean under
  samples of p is KL(p || p_ref)."""
  assert float(objective.k3(jnp.log(0.3), jnp.log(0.3))) == 0
  r = 0.5
  assert float(objective.k3(jnp.log(r * 0.4), jnp.log(0.4))) == pytest.approx(r - np.log(r) - 1)
  p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
  exact = float(np.sum(p * np.log(p / q)))
  expectation = float(np.sum(p * objective.k3(jnp.log(q), jnp.log(p))))
  assert expectation == pytest.approx(exact, rel=1e-5)
  weights = jnp.array([0.5, 0.5])
  loss, sums = objective.policy_loss(jnp.log(jnp.array([0.4, 0.4])), jnp.log(jnp.array([0.4, 0.4])),
                                     jnp.zeros(2), weights, kl_coef=0.1,
                                     ref_logp=jnp.log(jnp.array([0.2, 0.4])))
  kl = 0.5 * (0.5 - np.log(0.5) - 1)
  assert float(sums['kl']) == pytest.approx(kl, rel=1e-6)
  assert float(loss) == pytest.approx(0.1 * kl, rel=1e-6)  # A = 0: only the KL term


def test_ratio_is_one_and_gradient_is_the_policy_gradient_on_a_toy_model():
  """At the first inner step the policy is the one that sampled: rho = 1, and the loss's
  gradient is the explicit sum -sum_t w_t A_t grad log p(y_t | x_t) (no clipping at rho = 1)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)  # 6 tokens' features
  targets = jnp.asarray(rng.integers(0, 7, 6))
  advantages = jnp.asarray(rng.normal(size=6), jnp.float32)
  weights = jnp.asarray(objective.token_weights(np.array([2, 4]), token_level=True)[
      np.array([0, 0, 1, 1, 1, 1])])
  w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  logp_of = lambda w: objective.token_log_probs(x @ w, targets)
  old = jax.lax.stop_gradient(logp_of(w))
  assert np.all(np.exp(np.asarray(logp_of(w) - old)) == 1)
  grad = jax.grad(lambda w: objective.policy_loss(logp_of(w), old, advantages, weights)[0])(w)
  per_token = jax.jacobian(logp_of)(w)  # [6, 5, 7]
  explicit = -jnp.einsum('t,t,tij->ij', weights, advantages, per_token)
  np.testing.assert_allclose(grad, explicit, rtol=1e-5, atol=1e-6)
