"""Generation with a KV cache (continuous batching) and log-likelihood scoring.

The cache holds one slot per stack application and layer. A request is prefilled alone
into a free batch slot (its prompt is the instruction: one bidirectional block), then all
slots decode together one token per step; a finished slot is refilled from the queue.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hrmtext.data.layout import Index
from hrmtext.data.packing import pack_rows
from hrmtext.infer.sampling import Sampling, sample
from hrmtext.model import AttentionMask, LanguageModel


def bucket(n: int, minimum: int = 16) -> int:
  """Static lengths are powers of two, so a handful of shapes get compiled."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class Engine:

  def __init__(self, model: LanguageModel, params, *, eoa: int, slots: int = 8,
               max_len: int = 1024):
    self.model, self.params, self.eoa = model, params, eoa
    self.slots, self.max_len = slots, max_len

  # ---- device functions -------------------------------------------------------------------

  def _project(self, params, hidden):
    return self.model.head.apply({'params': params['lm_head']}, hidden)

  @functools.partial(jax.jit, static_argnums=(0,))
  def _prefill(self, params, state, tokens, length, slot):
    """Runs one prompt [1, P] into batch row `slot`; returns the state and last logits."""
    prompt_len, cache_len = tokens.shape[1], self.max_len
    in_prompt = jnp.arange(cache_len) < length
    mask = AttentionMask(
        q_segment_ids=in_prompt[None, :prompt_len].astype(jnp.int32),
        kv_segment_ids=in_prompt[None].astype(jnp.int32),
        q_index=jnp.arange(prompt_len)[None], kv_index=jnp.arange(cache_len)[None],
        q_is_instruction=in_prompt[None, :prompt_len], kv_is_instruction=in_prompt[None])
    batch = {'inputs': tokens, 'positions': jnp.arange(prompt_len)[None], 'mask': mask}
    fresh = self.model.init_cache(1, cache_len)
    hidden, row_cache = self.model.hidden_states(params, batch, cache=fresh)
    logits = self._project(params, jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1))
    insert = lambda big, row: jax.lax.dynamic_update_slice_in_dim(big, row, slot, axis=2)
    state = {
        'cache': jax.tree.map(insert, state['cache'], row_cache),
        'segment_ids': state['segment_ids'].at[slot].set(in_prompt.astype(jnp.int32)),
        'is_instruction': state['is_instruction'].at[slot].set(in_prompt),
    }
    return state, logits[:, 0]

  @functools.partial(jax.jit, static_argnums=(0, 6))
  def _decode(self, params, state, tokens, lengths, active, sampling, rng):
    """Feeds one token per slot at index `lengths`; returns the state and the next tokens."""
    rows = jnp.arange(tokens.shape[0])
    segment_ids = state['segment_ids'].at[rows, lengths].set(active.astype(jnp.int32))
    mask = AttentionMask(
        q_segment_ids=active[:, None].astype(jnp.int32), kv_segment_ids=segment_ids,
        q_index=lengths[:, None],
        kv_index=jnp.broadcast_to(jnp.arange(self.max_len), segment_ids.shape),
        q_is_instruction=jnp.zeros_like(active)[:, None], kv_is_instruction=state['is_instruction'])
    batch = {'inputs': tokens[:, None], 'positions': lengths[:, None], 'mask': mask}
    hidden, cache = self.model.hidden_states(params, batch, cache=state['cache'])
    next_tokens = sample(self._project(params, hidden)[:, 0], rng, sampling)
    return dict(state, cache=cache, segment_ids=segment_ids), next_tokens

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def _sample(self, logits, rng, sampling):
    return sample(logits, rng, sampling)

  # ---- host loop --------------------------------------------------------------------------

  def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 256,
               sampling: Sampling = Sampling(), seed: int = 0, progress=None) -> list[list[int]]:
    """Response token ids (EOA excluded) for each prompt (instruction ids)."""
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    for p in prompts:
      if not 0 < len(p) < self.max_len:
        raise ValueError(f'prompt of {len(p)} tokens does not fit max_len {self.max_len}')
    state = {'cache': self.model.init_cache(self.slots, self.max_len),
             'segment_ids': jnp.zeros((self.slots, self.max_len), jnp.int32),
             'is_instruction': jnp.zeros((self.slots, self.max_len), bool)}
    outputs = [[] for _ in prompts]
    owner = [None] * self.slots  # request index per slot
    lengths = np.zeros(self.slots, np.int32)
    last = np.zeros(self.slots, np.int32)
    queue = list(range(len(prompts)))[::-1]
    rng = jax.random.key(seed)

    def accept(slot, token):
      """Records a sampled token; frees the slot when the request is finished."""
      request = owner[slot]
      if token == self.eoa or lengths[slot] + 1 >= self.max_len:
        owner[slot] = None
      else:
        outputs[request].append(token)
        last[slot] = token
        if len(outputs[request]) >= limits[request]:
          owner[slot] = None
      if owner[slot] is None and progress:
        progress(1)

    while queue or any(o is not None for o in owner):
      for slot in range(self.slots):
        if owner[slot] is None and queue:
          request = queue.pop()
          prompt = prompts[request]
          tokens = np.zeros((1, bucket(len(prompt))), np.int32)
          tokens[0, :len(prompt)] = prompt
          state, logits = self._prefill(self.params, state, tokens, len(prompt), slot)
          rng, key = jax.random.split(rng)
          owner[slot], lengths[slot] = request, len(prompt)
          if limits[request] <= 0:
            owner[slot] = None
            continue
          accept(slot, int(self._sample(logits, key, sampling)[0]))
      active = np.array([o is not None for o in owner])
      if not active.any():
        continue
      rng, key = jax.random.split(rng)
      state, next_tokens = self._decode(self.params, state, last.copy(), lengths.copy(),
                                        active, sampling, key)
      lengths += active
      for slot in np.flatnonzero(active):
        accept(slot, int(next_tokens[slot]))
    return outputs

  def score(self, examples: list[tuple[list[int], list[int]]], batch_size: int = 16):
    """Per (instruction ids, response ids): (summed log-prob of the response, its token count,
    whether greedy decoding reproduces it token for token)."""
    results = []
    for start in range(0, len(examples), batch_size):
      chunk = examples[start:start + batch_size]
      tokens = np.concatenate([np.concatenate([i, r]) for i, r in chunk]).astype(np.int64)
      inst_len = np.array([len(i) for i, _ in chunk], np.int64)
      resp_len = np.array([len(r) for _, r in chunk], np.int64)
      total = inst_len + resp_len
      inst_start = np.cumsum(total) - total
      index = Index(inst_start, inst_len, inst_start + inst_len, resp_len)
      lengths = total - 1
      row_len = bucket(int(lengths.max()))
      rows = [np.array([i]) for i in range(len(chunk))]
      rows += [np.zeros(0, np.int64)] * (batch_size - len(chunk))  # one shape per row length
      batch = pack_rows(tokens, index, lengths, rows, row_len)
      logprob, count, greedy = self._score_rows(self.params, batch)
      results += [(float(l), int(c), bool(g)) for l, c, g in
                  zip(*jax.device_get((logprob, count, greedy)))][:len(chunk)]
    return results

  @functools.partial(jax.jit, static_argnums=(0,))
  def _score_rows(self, params, batch):
    logits = self.model.logits(params, batch)
    labelled = batch['labels'] >= 0
    targets = jnp.where(labelled, batch['labels'], 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == targets) | ~labelled
    return (jnp.where(labelled, logp, 0).sum(-1), labelled.sum(-1), hit.all(-1))
