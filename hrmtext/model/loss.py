"""Token cross-entropy and accuracy metrics on packed PrefixLM rows."""
import jax
import jax.numpy as jnp

IGNORE_LABEL = -100


def loss_and_metrics(logits, labels, segment_ids):
  """Sums over the batch (divide by `tokens` globally): loss, correct tokens, exact examples.

  logits [batch, len, vocab] (float32), labels [batch, len] with IGNORE_LABEL where unlabelled.
  """
  labelled = labels != IGNORE_LABEL
  targets = jnp.where(labelled, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = jnp.where(labelled, log_z - target_logit, 0.0)
  correct = labelled & (jnp.argmax(logits, axis=-1) == targets)
  # An example is exact iff none of its labelled tokens is wrong.
  num_segments = labels.shape[1] + 1
  per_segment = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments))
  wrong = per_segment((labelled & ~correct).astype(jnp.int32), segment_ids)
  count = per_segment(labelled.astype(jnp.int32), segment_ids)
  return {
      'loss_sum': token_loss.sum(),
      'tokens': labelled.sum(dtype=jnp.int32),
      'correct': correct.sum(dtype=jnp.int32),
      'sequences': (count > 0).sum(dtype=jnp.int32),
      'exact': ((count > 0) & (wrong == 0)).sum(dtype=jnp.int32),
  }


def zero_sums() -> dict:
  """Accumulator matching `loss_and_metrics`."""
  return {'loss_sum': jnp.zeros((), jnp.float32),
          **{k: jnp.zeros((), jnp.int32) for k in ('tokens', 'correct', 'sequences', 'exact')}}


def summarize(sums) -> dict:
  """Sums (possibly accumulated over micro-batches and devices) -> means."""
  tokens = jnp.maximum(sums['tokens'], 1)
  return {
      'loss': sums['loss_sum'] / tokens,
      'token_accuracy': sums['correct'] / tokens,
      'exact_accuracy': sums['exact'] / jnp.maximum(sums['sequences'], 1),
  }
