"""One attention API for packed PrefixLM rows, prefill and cached decode.

A query may attend to a key iff both belong to the same segment AND (the key is not after
the query OR both are instruction tokens). Kernels receive the mask in this factored form
(segments, indices, instruction flags) so fast implementations can skip blocks; the XLA
path materialises it.
"""
import flax.struct
import jax
import jax.numpy as jnp

from hrmtext.model.kernels import compute_capability, cudnn, splash, target_device


@flax.struct.dataclass
class AttentionMask:
  q_segment_ids: jax.Array  # [batch, q_len]; 0 = padding / empty cache slot
  kv_segment_ids: jax.Array  # [batch, kv_len]
  q_index: jax.Array  # [batch, q_len] index of each query in the key sequence
  kv_index: jax.Array  # [batch, kv_len]
  q_is_instruction: jax.Array  # [batch, q_len] bool
  kv_is_instruction: jax.Array  # [batch, kv_len] bool

  @classmethod
  def packed(cls, segment_ids, is_instruction) -> 'AttentionMask':
    """Self-attention within packed rows (training, scoring, prefill)."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    is_instruction = is_instruction.astype(bool)
    return cls(segment_ids, segment_ids, index, index, is_instruction, is_instruction)

  def dense(self) -> jax.Array:
    """Boolean mask [batch, 1, q_len, kv_len]."""
    same_segment = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
    causal = self.kv_index[:, None, :] <= self.q_index[:, :, None]
    prefix = self.q_is_instruction[:, :, None] & self.kv_is_instruction[:, None, :]
    return (same_segment & (causal | prefix))[:, None]


def xla_attention(q, k, v, mask: AttentionMask):
  """q [batch, q_len, heads, head_dim], k/v [batch, kv_len, heads, head_dim]."""
  scale = q.shape[-1]**-0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  # Padding queries see at least themselves (same segment 0, causal), so no row is empty.
  logits = jnp.where(mask.dense(), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


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
  """PrefixLM attention; `implementation` picks the kernel (all compute the same function), 'auto'
  the one for the devices the computation is compiled for."""
  if implementation == 'auto':
    implementation = auto_implementation(target_device(), q.dtype)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {implementation!r}; '
                     f"have {sorted(IMPLEMENTATIONS)} and 'auto'")
  return IMPLEMENTATIONS[implementation](q, k, v, mask)
