"""One attention API for packed PrefixLM rows, prefill and cached decode.

A query may attend to a key iff both belong to the same segment AND (the key is not after
the query OR both are instruction tokens). Kernels receive the mask in this factored form
(segments, indices, instruction flags) so fast implementations can skip blocks; the XLA
path materialises it.
"""
import flax.struct
import jax
import jax.numpy as jnp

from hrmtext.errors import UserError
from hrmtext.model.kernels import PackedRuns, compute_capability, cudnn, splash


@flax.struct.dataclass
class AttentionMask:
  q_segment_ids: jax.Array  # [batch, q_len]; 0 = padding / empty cache slot
  kv_segment_ids: jax.Array  # [batch, kv_len]
  q_index: jax.Array  # [batch, q_len] index of each query in the key sequence
  kv_index: jax.Array  # [batch, kv_len]
  q_is_instruction: jax.Array  # [batch, q_len] bool
  kv_is_instruction: jax.Array  # [batch, kv_len] bool
  runs: PackedRuns | None = None  # packed self-attention: the same mask as runs, for cuDNN

  @classmethod
  def packed(cls, segment_ids, is_instruction, runs: PackedRuns | None = None
             ) -> 'AttentionMask':
    """Self-attention within packed rows (training, scoring, prefill)."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    is_instruction = is_instruction.astype(bool)
    return cls(segment_ids, segment_ids, index, index, is_instruction, is_instruction, runs)

  def dense(self) -> jax.Array:
    """Boolean mask [batch, 1, q_len, kv_len]."""
    same_segment = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
    causal = self.kv_index[:, None, :] <= self.q_index[:, :, None]
    prefix = self.q_is_instruction[:, :, None] & self.kv_is_instruction[:, None, :]
    return (same_segment & (causal | prefix))[:, None]


# XLA attention over rows longer than this runs this many queries at a time (see xla_attention).
QUERY_BLOCK = 512


def xla_attention(q, k, v, mask: AttentionMask):
  """q [batch, q_len, heads, head_dim], k/v [batch, kv_len, heads, head_dim].

  Rows of more than QUERY_BLOCK queries (a multiple of it) are computed QUERY_BLOCK queries at a
  time, each block recomputed in the backward pass: only one block's float32 scores [batch,
  heads, QUERY_BLOCK, kv_len] are ever live, not the whole row's (a 4096-token row's are 8x
  larger), for the same values.
  """
  q_len = q.shape[1]
  if q_len <= QUERY_BLOCK or q_len % QUERY_BLOCK:
    return dense_attention(q, k, v, mask)
  blocks = q_len // QUERY_BLOCK
  # [blocks, batch, QUERY_BLOCK, ...]: lax.map runs over blocks, rows stay sharded as they are.
  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], blocks, QUERY_BLOCK, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def query_block(q_block, segment_ids, index, is_instruction):
    block_mask = mask.replace(q_segment_ids=segment_ids, q_index=index,
                              q_is_instruction=is_instruction)
    return dense_attention(q_block, k, v, block_mask)

  out = jax.lax.map(lambda xs: query_block(*xs), tuple(map(split, (
      q, mask.q_segment_ids, mask.q_index, mask.q_is_instruction))))
  return jnp.moveaxis(out, 0, 1).reshape(q.shape[:3] + v.shape[3:])


def dense_attention(q, k, v, mask: AttentionMask):
  """xla_attention with the whole [batch, heads, q_len, kv_len] score matrix at once."""
  scale = q.shape[-1]**-0.5
  # Heads before positions, as the batched dots want them: XLA:CPU would otherwise emit the
  # probs @ v product transposed and copy it back (~8% of a tiny train step on a loaded CPU).
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  # Padding queries see at least themselves (same segment 0, causal), so no row is empty.
  logits = jnp.where(mask.dense(), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', probs, v), 1, 2)


# 'splash': TPU Pallas kernel (Pallas interpreter elsewhere); 'cudnn': GPU (Hopper+, bf16/fp16).
# Both are for packed self-attention; see hrmtext/model/kernels. 'auto': see `auto_implementation`.
IMPLEMENTATIONS = {'xla': xla_attention, 'splash': splash.splash_attention,
                   'cudnn': cudnn.cudnn_attention}


def auto_implementation(device, dtype) -> str:
  """The kernel for `device` (see kernels.target_device) and activations of `dtype`: splash on
  TPUs, cuDNN on Hopper-or-newer CUDA GPUs in bfloat16/float16, XLA elsewhere."""
  if device.platform == 'tpu':
    return 'splash'
  capability = compute_capability(device)
  if (device.platform == 'gpu' and capability is not None and capability >= (9, 0)
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return 'cudnn'
  return 'xla'


def attention(q, k, v, mask: AttentionMask, implementation: str = 'xla'):
  """PrefixLM attention; `implementation` picks the kernel (all compute the same function; 'auto'
  is resolved before, when the model is built: models.build_model)."""
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f'unknown attention implementation {implementation!r}; '
                    f'have {sorted(IMPLEMENTATIONS)}')
  return IMPLEMENTATIONS[implementation](q, k, v, mask)
