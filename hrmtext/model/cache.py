"""KV-cache layout and bookkeeping for cached inference.

The cache holds, for each stack, one entry per application of that stack (HRM-Text applies L
H_cycles * L_cycles times and H H_cycles times per token; a stack shared by L and H, as in TRM,
has its applications' entries in the order they run; `model.cache_slots()` counts them), each its
own arrays:

  {stack: [{'k': [layers, batch, heads, length, head_dim], 'v': same}, ...]}

(separate arrays per application and heads before length: the attention matmuls read the cache
as it lies, with no slice or transpose copied). A cached forward pass gets, per application, a
tuple of such past blocks (read-only; none for a prompt's prefill) and returns the keys/values of
its own tokens in the same layout, with `length` = its tokens; its mask's key axis is the blocks
in order, then its own tokens. Writing the new entries into the cache (`write`) is the caller's
job: a decode step only reads the cache.
"""
import collections
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical names of the dims of each k/v array: hrmtext.parallel.sharding maps them to the mesh.
AXES = ('cache_layers', 'cache_batch', 'cache_heads', 'cache_sequence', 'cache_kv')


def constrain(cache: dict) -> dict:
  """`cache` (or new entries in its layout) held on its logical sharding (under
  hrmtext.parallel.sharding.activate; a no-op elsewhere)."""
  return jax.tree.map(lambda c: nn.with_logical_constraint(c, AXES), cache)


def init(cfg, applications: dict[str, int], batch_size: int, length: int, dtype) -> dict:
  """A zeroed cache for `applications` = {stack: applications per forward pass}."""
  shape = (cfg.layers_per_stack, batch_size, cfg.num_heads, length, cfg.head_dim)
  return constrain({name: [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
                           for _ in range(n)] for name, n in applications.items()})


def write(cache: dict, new: dict, rows, positions) -> dict:
  """`new` (entries [layers, len(rows), heads, n, head_dim]) stored at `positions`
  ([len(rows), n]) of batch rows `rows`; out-of-range rows or positions are dropped."""
  def put(big, small):  # the two index arrays come first in the indexed result
    return big.at[:, rows[:, None], :, positions].set(
        small.transpose(1, 3, 0, 2, 4).astype(big.dtype), mode='drop')
  return constrain(jax.tree.map(put, cache, new))


def attention(q, k, v, past: tuple, mask):
  """Attention of this pass's queries to the past blocks and its own keys, as one softmax.

  q, k, v [batch, q_len, heads, head_dim]; past: blocks {'k', 'v'} [batch, heads, len, head_dim].
  Each block is multiplied as it lies (no concatenation, no copy of the cache). Returns the output
  [batch, q_len, heads, head_dim] and this pass's entries {'k', 'v'} [batch, heads, q_len,
  head_dim] (in the past's dtype; the compute dtype without a past).
  """
  dtype = q.dtype
  cache_dtype = past[0]['k'].dtype if past else dtype
  new = {name: t.transpose(0, 2, 1, 3).astype(cache_dtype) for name, t in (('k', k), ('v', v))}
  blocks = [*past, new]
  logits = jnp.concatenate(
      [jnp.einsum('bqhd,bhkd->bhqk', q, block['k'].astype(dtype),
                  preferred_element_type=jnp.float32) for block in blocks], axis=-1)
  logits = jnp.where(mask.dense(), logits * q.shape[-1]**-0.5, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  ends = list(itertools.accumulate(block['k'].shape[2] for block in blocks))[:-1]
  out = sum(jnp.einsum('bhqk,bhkd->bqhd', p, block['v'].astype(dtype))
            for p, block in zip(jnp.split(probs, ends, axis=-1), blocks))
  return out, new


def no_past(applications: dict[str, int]) -> dict:
  """The past of a pass that starts afresh (a prompt's prefill): no blocks."""
  return {name: [()] * n for name, n in applications.items()}


class Applications:
  """Hands successive applications of each stack their past blocks, in order, and collects the
  keys/values they compute. Without a cache (training, scoring) it hands out None."""

  def __init__(self, past: dict | None):
    self.past = past
    self.new = collections.defaultdict(list)

  def next(self, stack: str):
    """The past blocks of the next application of `stack` (None: no cache)."""
    if self.past is None:
      return None
    return self.past[stack][len(self.new[stack])]

  def give(self, stack: str, new) -> None:
    """The entries that application computed."""
    if self.past is not None:
      self.new[stack].append(new)

  def new_entries(self) -> dict | None:
    """Every application's new entries, in the cache's layout."""
    return None if self.past is None else dict(self.new)
