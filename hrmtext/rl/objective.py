"""The policy-gradient objective: GRPO's group-normalised advantages with DAPO's options.

Per sampled response of a prompt's group of G: advantage A = (r - mean_group r) / (std_group r +
eps). Per response token t, with ratio rho_t = exp(logp_t - old_logp_t) (old_logp: the policy that
sampled, in the train forward's numerics, so rho_t is exactly 1 at the first inner step):

  loss_t = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3_t
  k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (KL to a frozen reference, >= 0)
  loss   = sum_t weight_t loss_t

The weights normalise: DAPO's token level, 1 / (the batch's response tokens), or GRPO's
sequence level, 1 / (responses x the response's tokens); 0 drops a token (an overlong response,
padding). Dynamic sampling keeps the groups whose rewards are not all equal (the others give
every response A = 0: no signal).
"""
import jax
import jax.numpy as jnp
import numpy as np


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
  """[groups * G] rewards, each group's G in a row -> (r - group mean) / (group std + eps)."""
  grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
  normalised = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + eps)
  return normalised.reshape(-1).astype(np.float32)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Per group: are its rewards not all equal (DAPO's dynamic sampling keeps these)?"""
  grouped = np.asarray(rewards).reshape(-1, group_size)
  return grouped.max(1) > grouped.min(1)


def token_weights(lengths: np.ndarray, token_level: bool, keep: np.ndarray | None = None
                  ) -> np.ndarray:
  """Per response, the weight of each of its tokens: token level 1 / (all kept responses'
  tokens), sequence level 1 / (kept responses x its tokens); 0 for a response not kept."""
  lengths = np.asarray(lengths, np.float64)
  keep = np.ones(len(lengths), bool) if keep is None else np.asarray(keep, bool)
  kept = keep & (lengths > 0)
  if not kept.any():
    return np.zeros(len(lengths), np.float32)
  if token_level:
    weights = np.where(kept, 1.0 / lengths[kept].sum(), 0.0)
  else:
    weights = np.where(kept, 1.0 / (kept.sum() * np.maximum(lengths, 1)), 0.0)
  return weights.astype(np.float32)


def token_log_probs(logits, targets):
  """log p(target) per position: logits [..., vocab] (float32), targets [...] (any id where
  unused)."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def entropy(logits):
  """Per position, the entropy of the next-token distribution."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.sum(jnp.exp(log_p) * log_p, -1)


def k3(ref_logp, logp):
  """Schulman's k3 estimator of KL(policy || reference) per token: unbiased, >= 0."""
  log_ratio = ref_logp - logp
  return jnp.exp(log_ratio) - log_ratio - 1


def policy_loss(logp, old_logp, advantages, weights, *, clip_low: float = 0.2,
                clip_high: float = 0.28, kl_coef: float = 0.0, ref_logp=None):
  """(loss, sums) of the clipped surrogate over tokens; every argument per token (advantages and
  weights of the token's response), weight 0 where a token does not count. `sums`: the
  weighted clip fraction and KL (k3), for the metrics."""
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
  surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
  per_token = -surrogate
  kl = k3(ref_logp, logp) if ref_logp is not None else jnp.zeros_like(logp)
  if kl_coef:
    per_token = per_token + kl_coef * kl
  # Clipped where the clip is what min() took: the gradient of that token is 0.
  was_clipped = ((ratio < 1 - clip_low) & (advantages < 0)) | (
      (ratio > 1 + clip_high) & (advantages > 0))
  sums = {'clip_fraction': jnp.sum(weights * was_clipped), 'kl': jnp.sum(weights * kl)}
  return jnp.sum(weights * per_token), sums
