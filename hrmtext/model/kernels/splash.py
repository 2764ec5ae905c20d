"""TPU splash attention (Pallas) on packed PrefixLM rows.

Each row's boolean mask is given to splash as a *dynamic* mask. Splash then skips the blocks with no
visible key (other examples of the row) and does no masking inside fully visible blocks, so the work
follows the examples' lengths, not the row's. The mask is exactly `AttentionMask.dense()`, so any
self-attention mask gives the XLA path's result. Compiled for TPUs (the mesh's devices, see
`kernels.target_device`) it is a Mosaic kernel; for anything else it runs in the Pallas
interpreter (slow: for tests).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from hrmtext.errors import UserError
from hrmtext.model.config import round_up
from hrmtext.model.kernels import target_device

BLOCK_SIZE = 512  # q and kv tile; rows are padded to a multiple of it (of 128 if shorter)
MIN_BLOCK = 128  # TPU lane width


def splash_attention(q, k, v, mask, block_size: int = BLOCK_SIZE):
  """q/k/v [batch, len, heads, head_dim]; `mask` an AttentionMask over the same tokens."""
  length = q.shape[1]
  if k.shape[1] != length:
    raise UserError(f'splash attention needs q and kv of one length (self-attention), got '
                    f'{length} and {k.shape[1]}; cached decode uses the xla kernel')
  block = min(block_size, round_up(length, MIN_BLOCK))
  padded = round_up(length, block)
  row_mask = _pad_mask(mask, padded).dense()[:, 0]  # [batch, padded, padded]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
  q = (q.astype(jnp.float32) * q.shape[-1]**-0.5).astype(q.dtype)  # splash does not scale
  rows = functools.partial(_splash_rows, block=block)
  return _per_device(rows, pad(q), pad(k), pad(v), row_mask)[:, :length]


def _pad_mask(mask, length: int):
  """Appends tokens of their own segment (-1): they see only each other, nobody sees them."""
  batch, old = mask.q_segment_ids.shape
  if old == length:
    return mask
  tail = jnp.broadcast_to(jnp.arange(old, length), (batch, length - old))
  extend = lambda x, value: jnp.concatenate([x, jnp.full_like(tail, value, x.dtype)], axis=1)
  index = lambda x: jnp.concatenate([x, tail.astype(x.dtype)], axis=1)
  return mask.replace(
      q_segment_ids=extend(mask.q_segment_ids, -1), kv_segment_ids=extend(mask.kv_segment_ids, -1),
      q_index=index(mask.q_index), kv_index=index(mask.kv_index),
      q_is_instruction=extend(mask.q_is_instruction, False),
      kv_is_instruction=extend(mask.kv_is_instruction, False))


def _splash_rows(q, k, v, row_mask, block: int):
  """One splash call per row: q/k/v [batch, len, heads, head_dim], row_mask [batch, len, len]."""
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  interpret = target_device().platform != 'tpu'

  def one_row(q, k, v, mask):  # [heads, len, head_dim], [len, len]
    kernel = splash.make_splash_mha(mask[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    # make_splash_mha turns every MaskInfo field into an array, this flag too; the kernel's
    # __call__ branches on it in Python, which fails under jit unless it is a plain bool.
    kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
    return kernel(q, k, v)

  heads_first = lambda x: x.swapaxes(1, 2)
  out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), row_mask)
  return heads_first(out)


def _per_device(fn, q, k, v, row_mask):
  """Runs `fn` on each device's rows and heads: XLA does not partition a Pallas call itself.

  Rows and heads are split as the logical axis rules split activations ('act_batch',
  'act_heads') over the current mesh (`sharding.activate`); without a mesh, `fn` runs as is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, row_mask)
  batch, _, heads, _ = q.shape
  rows = _mesh_axes(mesh, 'act_batch', batch)
  qkv = P(rows, None, _mesh_axes(mesh, 'act_heads', heads), None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, row_mask)


def _mesh_axes(mesh, logical: str, size: int):
  """The mesh axes the rules give `logical`, or None (replicated) if they do not divide `size`."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if size % math.prod(mesh.shape[name] for name in names) == 0 else None
