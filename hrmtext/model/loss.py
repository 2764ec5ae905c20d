"""Token cross-entropy and accuracy metrics on packed PrefixLM rows."""
import jax
import jax.numpy as jnp

from hrmtext.data.packing import IGNORE_LABEL  # the packed rows' "no label" (DESIGN §2)


def token_stats(logits, labels):
  """(cross-entropy, correct) per token [batch, len]; zero / False where unlabelled."""
  labelled = labels != IGNORE_LABEL
  targets = jnp.where(labelled, labels, 0)
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = jnp.where(labelled, log_z - target_logit, 0.0)
  correct = labelled & (jnp.argmax(logits, axis=-1) == targets)
  return token_loss, correct


def chunked_token_stats(logits_fn, hidden, labels, chunk_len: int, stats=token_stats):
  """stats(logits_fn(hidden), labels) (per-token arrays [batch, len]), computing the logits
  `chunk_len` positions at a time.

  Each chunk's logits are rematerialised in the backward pass, so only one chunk's float32
  logits [batch, chunk_len, vocab] (and their gradient) are ever live, not the whole row's.
  """
  batch, length = labels.shape
  chunks = -(-length // chunk_len)
  pad = chunks * chunk_len - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_LABEL)
  # [chunks, batch, chunk_len, ...]: the scan runs over chunks, rows stay sharded as they are.
  to_chunks = lambda x: jnp.moveaxis(x.reshape(batch, chunks, chunk_len, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_stats(hidden_chunk, labels_chunk):
    return stats(logits_fn(hidden_chunk), labels_chunk)

  _, per_token = jax.lax.scan(
      lambda carry, xs: (carry, chunk_stats(*xs)), None, (to_chunks(hidden), to_chunks(labels)))
  from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, -1)[:, :length]
  return jax.tree.map(from_chunks, per_token)


def sums_from_token_stats(token_loss, correct, labels, segment_ids):
  """Sums over the batch (divide by `tokens` globally): loss, correct tokens, exact examples."""
  labelled = labels != IGNORE_LABEL
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


def loss_and_metrics(logits, labels, segment_ids):
  """Summed loss/accuracy counts of logits [batch, len, vocab] against labels [batch, len]
  (IGNORE_LABEL where unlabelled)."""
  return sums_from_token_stats(*token_stats(logits, labels), labels, segment_ids)


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
