"""The policy-gradient train step: per-token log-probs of the sampled responses under the train
forward (the credit horizon applies), the clipped surrogate of rl.objective, then the optimizer
update and EMA exactly as supervised training does them. A LoRA model's state trains its adapters
(`params`) on its frozen `base`, as training.step's."""
import functools

import jax
import jax.numpy as jnp
import optax

from hrmtext.data.packing import IGNORE_LABEL
from hrmtext.model import Horizon, LanguageModel, lora
from hrmtext.model.loss import chunked_token_stats
from hrmtext.rl import objective
from hrmtext.training import optimizer
from hrmtext.training.step import TrainState, grad_mask


def _logp_and_entropy(logits, labels):
  targets = jnp.where(labels == IGNORE_LABEL, 0, labels)
  return objective.token_log_probs(logits, targets), objective.entropy(logits)


def response_stats(model: LanguageModel, params, batch, horizon: Horizon, chunk_len: int = 0):
  """(log p of each label, the entropy at its position), [rows, len], as the train forward
  computes them (the LM head `chunk_len` positions at a time where set)."""
  hidden, _ = model.hidden_states(params, batch, horizon)
  logits_fn = functools.partial(model.head_logits, params)
  labels = batch['labels']
  if 0 < chunk_len < labels.shape[1]:
    return chunked_token_stats(logits_fn, hidden, labels, chunk_len, _logp_and_entropy)
  return _logp_and_entropy(logits_fn(hidden), labels)


def make_rl_step(model: LanguageModel, tx, horizon: Horizon, ema_decay: float, *,
                 chunk_len: int = 0, clip_low: float = 0.2, clip_high: float = 0.28,
                 kl_coef: float = 0.0):
  """(state, batch) -> (state, metrics, logp). Batch leaves are [micro_batches, rows, len]: the
  packed responses with `advantages` and `weights` (summing to 1 over the whole batch), `ref_logp`
  with kl_coef, and `old_logp` after the first inner step. Without `old_logp` (the first inner
  step) the old policy is the current one, in this very forward: the ratio is exactly 1; `logp`
  (the log-probs before the update) is what the later inner steps take as `old_logp`. The
  micro-batches' losses add up to the batch's."""

  def loss_fn(params, base, batch):
    logp, ent = response_stats(model, lora.combine(base, params), batch, horizon, chunk_len)
    old_logp = batch['old_logp'] if 'old_logp' in batch else jax.lax.stop_gradient(logp)
    loss, sums = objective.policy_loss(
        logp, old_logp, batch['advantages'], batch['weights'], clip_low=clip_low,
        clip_high=clip_high, kl_coef=kl_coef, ref_logp=batch.get('ref_logp'))
    sums = {**sums, 'loss': loss, 'entropy': jnp.sum(batch['weights'] * ent)}
    return loss, (sums, jax.lax.stop_gradient(logp))

  def micro_step(params, base, carry, micro_batch):
    grads, (sums, logp) = jax.grad(loss_fn, has_aux=True)(params, base, micro_batch)
    return jax.tree.map(jnp.add, carry, (grads, sums)), logp

  def rl_step(state: TrainState, batch):
    zero_sums = dict.fromkeys(('clip_fraction', 'kl', 'loss', 'entropy'), jnp.zeros(()))
    zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums)
    (grads, sums), logp = jax.lax.scan(lambda c, b: micro_step(state.params, state.base, c, b),
                                       zeros, batch)
    mask = grad_mask(model, horizon, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_mask=mask)
    params = optax.apply_updates(state.params, updates)
    ema = optimizer.ema_update(state.ema, params, ema_decay, mask)
    metrics = {**sums, 'grad_norm': optax.global_norm(grads)}
    state = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
    return state, metrics, logp

  return rl_step


def make_logp(model: LanguageModel, horizon: Horizon, chunk_len: int = 0):
  """(params, batch [rows, len]) -> log p of each label (the frozen reference's, for the KL), in
  the numerics of the train step's forward."""
  return lambda params, batch: response_stats(model, params, batch, horizon, chunk_len)[0]
