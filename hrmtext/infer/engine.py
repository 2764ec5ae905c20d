"""Generation with a KV cache (continuous batching) and log-likelihood scoring.

The cache (hrmtext.model.cache) holds one entry per stack application and layer: `slots` rows of
`max_len` positions, in `cache_dtype` (default: the model's compute dtype). Requests waiting for a row are prefilled together (a prompt is an instruction: one bidirectional
block), which also samples their first tokens. Then all rows decode together, one token per step,
in a loop that stays on the device for up to `chunk` steps and ends early when a row finishes
while requests wait; within the loop the cache is only read (the chunk's own keys/values go to a
small buffer, stored into the cache after the chunk). The host reads the new tokens once per chunk, frees finished rows and
refills them from the queue.

Few shapes get compiled: prompts are padded to a power of two, prefill groups to a
power-of-two number of rows, and a decode chunk attends to the smallest power-of-two window of
cache positions that holds every row's past, plus the chunk's own tokens.

The engine runs on a mesh (hrmtext.parallel.mesh; default: the first device alone). Params are
placed on it once, sharded by their logical axes as in training; the cache's rows are split over
('data', 'fsdp') and its heads over 'tensor' (hrmtext.parallel.sharding's cache_* rules). Row
counts (slots, prefill groups, scored batches) are rounded up to multiples of data * fsdp.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hrmtext.errors import UserError
from hrmtext.data.layout import Index
from hrmtext.data.packing import pack_rows
from hrmtext.infer.sampling import Sampling, sample
from hrmtext.model import AttentionMask, LanguageModel
from hrmtext.model import cache as kv_cache
from hrmtext.model.config import round_up
from hrmtext.parallel import sharding
from hrmtext.parallel.mesh import inference_mesh

NO_TOKEN = -1  # an empty place in the token buffers


def bucket(n: int, minimum: int = 16) -> int:
  """Static lengths are powers of two, so a handful of shapes get compiled."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _on_mesh(method):
  """`method` run with the engine's mesh and logical rules current: the device functions trace
  (and their activations' and cache's constraints apply) for the mesh."""
  @functools.wraps(method)
  def run(self, *args, **kwargs):
    with sharding.activate(self.mesh):
      return method(self, *args, **kwargs)
  return run


class Engine:
  """`max_len`: prompt + response tokens per row. `vocab_size` (default: the model's) masks padded
  vocabulary rows out of token choices. `cache_dtype` (default: the model's compute dtype) is
  the KV cache's. `mesh` (axes hrmtext.parallel.mesh.MESH_AXES; default: the first device) is
  where params, cache and computation live; `slots` is rounded up to a multiple of its
  data * fsdp. `params` may be None until set (`engine.params = ...`)."""

  def __init__(self, model: LanguageModel, params, *, eoa: int, slots: int = 8,
               max_len: int = 1024, chunk: int = 32, min_window: int = 64,
               vocab_size: int | None = None, cache_dtype=None,
               mesh: jax.sharding.Mesh | None = None):
    self.model, self.eoa, self.mesh = model, eoa, mesh or inference_mesh()
    self.batch_shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    self.slots = round_up(slots, self.batch_shards)
    self.max_len, self.chunk, self.min_window = max_len, chunk, min_window
    self.vocab_size = vocab_size or model.cfg.vocab_size
    self.cache_dtype = jnp.dtype(cache_dtype or model.compute.dtype)
    self.param_shardings = sharding.param_shardings(
        jax.eval_shape(model.init, jax.random.key(0)), self.mesh)
    self.params = params
    self._compile_for_mesh()

  @property
  def params(self):
    """The weights, on the mesh with their shardings. Setting them places them there once (arrays
    already placed so, such as the training state's, are kept: no copy); calls never copy them."""
    return self._params

  @params.setter
  def params(self, params):
    self._params = None if params is None else jax.device_put(params, self.param_shardings)

  def _compile_for_mesh(self):
    """The jitted device functions: params and state stay on their shardings, host inputs and
    sampled tokens are replicated."""
    params, state, replicated = (self.param_shardings, self._state_shardings(),
                                 sharding.replicated(self.mesh))
    self._init_state = jax.jit(self._zero_state, out_shardings=state)
    self._prefill = jax.jit(self._prefill_group, static_argnums=(6,), donate_argnums=(1,),
                            in_shardings=(params, state) + (replicated,) * 6,
                            out_shardings=(state, replicated))
    # `stop_when_free` is traced, not static: one compiled program serves both (each is seconds).
    self._decode = jax.jit(self._decode_chunk, static_argnums=(2, 3), donate_argnums=(1,),
                           in_shardings=(params, state, replicated),
                           out_shardings=(state, replicated))
    self._score_rows = jax.jit(self._score_batch,
                               in_shardings=(params, sharding.batch_sharding(self.mesh)),
                               out_shardings=replicated)

  def _state_shardings(self) -> dict:
    """A row's cache entries and bookkeeping on that row's devices (the entries' heads split)."""
    shapes = jax.eval_shape(self._zero_state)
    state = jax.tree.map(lambda _: sharding.logical_sharding(self.mesh, ('cache_batch',)), shapes)
    entries = sharding.logical_sharding(self.mesh, kv_cache.AXES)
    state['cache'] = jax.tree.map(lambda _: entries, shapes['cache'])
    return state

  # ---- device functions -------------------------------------------------------------------

  def _logits(self, params, hidden):
    """float32 logits with the padded vocabulary rows (if any) at -inf."""
    return self._without_padding(self.model.head_logits(params, hidden))

  def _without_padding(self, logits):
    """`logits` with the padded vocabulary rows (if any) at -inf: never chosen."""
    if self.vocab_size < logits.shape[-1]:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_size, logits, -jnp.inf)
    return logits

  def _accept(self, rows, tokens, lengths, budget):
    """Which sampled tokens (placed at index `lengths`) join the response, and which rows stay
    active (budget: response tokens still allowed before this one). A row holds at most
    `max_len` tokens; its last token is never fed back, so it needs no cache position."""
    kept = (tokens != self.eoa) & (lengths < self.max_len) & (budget > 0) & rows
    return kept, kept & (budget > 1) & (lengths + 1 < self.max_len)

  def _sample(self, params, hidden, keys, lengths, sampling):
    """The token at index `lengths` of each row (hidden [rows, 1, hidden]), drawn with that row's
    key folded with the index."""
    keys = jax.vmap(jax.random.fold_in)(keys, lengths)
    return sample(self._logits(params, hidden)[:, 0], keys, sampling)

  def _zero_state(self):
    s, n = self.slots, self.max_len
    zeros = lambda dtype: jnp.zeros((s,), dtype)
    return {'cache': self.model.init_cache(s, n, self.cache_dtype),
            'keys': jax.random.split(jax.random.key(0), s),  # each row's random stream
            'segment_ids': jnp.zeros((s, n), jnp.int32),  # 1 where a row holds a token
            'is_instruction': jnp.zeros((s, n), bool),
            'last': zeros(jnp.int32),  # token to feed next, at index `lengths`
            'lengths': zeros(jnp.int32),
            'budget': zeros(jnp.int32),  # response tokens still allowed
            'active': zeros(bool)}

  def _prefill_group(self, params, state, tokens, prompt_lens, rows, limits, sampling, rng, seeds):
    """Prompts [group, P] into batch rows `rows` (out-of-range rows are padding); samples the
    first token of each from its request's stream (`rng` folded with `seeds`). Returns the state
    and the first tokens (NO_TOKEN where not kept)."""
    group, prompt_len = tokens.shape
    in_prompt = jnp.arange(prompt_len)[None] < prompt_lens[:, None]
    batch = {'inputs': tokens, 'positions': jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape),
             'mask': AttentionMask.packed(in_prompt.astype(jnp.int32), in_prompt)}
    hidden, new = self.model.hidden_states(  # no past: the prompt attends to itself
        params, batch, cache=kv_cache.no_past(self.model.cache_slots()))
    last_hidden = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, seeds)
    first = self._sample(params, last_hidden, keys, prompt_lens, sampling)
    kept, active = self._accept(rows < self.slots, first, prompt_lens, limits)
    prompt_mask = jnp.arange(self.max_len)[None] < prompt_lens[:, None]
    put = lambda big, new: big.at[rows].set(new, mode='drop')
    state = dict(
        state,
        cache=kv_cache.write(state['cache'], new, rows, batch['positions']),
        segment_ids=put(state['segment_ids'], prompt_mask.astype(jnp.int32)),
        is_instruction=put(state['is_instruction'], prompt_mask),
        keys=put(state['keys'], keys),
        last=put(state['last'], first), lengths=put(state['lengths'], prompt_lens),
        budget=put(state['budget'], limits - kept), active=put(state['active'], active))
    return state, jnp.where(kept, first, NO_TOKEN)

  def _decode_chunk(self, params, state, sampling, window, stop_when_free):
    """Up to `chunk` steps of all active rows; stops after a step that leaves a row free if
    `stop_when_free` (a bool scalar). Returns the state and the tokens [chunk, slots] (NO_TOKEN:
    none).

    Keys: the first `window` cache positions (the past at the chunk's start: read-only during
    the chunk, so nothing copies it per step), then this chunk's tokens so far (a [chunk]-long
    buffer, step i in column i), then the step's own token. The buffer is stored into the cache
    once, after the chunk."""
    rows = jnp.arange(self.slots)
    in_window = lambda x: jax.lax.slice_in_dim(x, 0, window, axis=1)
    past = jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, window, axis=3), state['cache'])
    past_segment_ids, past_is_instruction = (in_window(state[k])
                                             for k in ('segment_ids', 'is_instruction'))
    past_index = jnp.broadcast_to(jnp.arange(window), past_segment_ids.shape)
    column = lambda x: x[:, None]
    no = jnp.zeros((self.slots, self.chunk + 1), bool)  # chunk tokens are response tokens

    def step(carry):
      i, recent, recent_segment_ids, recent_index, slot, out = carry
      active, lengths = slot['active'], slot['lengths']
      segment = active.astype(jnp.int32)  # an inactive row (segment 0) sees only its own token
      mask = AttentionMask(
          q_segment_ids=column(segment),
          kv_segment_ids=jnp.concatenate([past_segment_ids, recent_segment_ids, column(segment)],
                                         axis=1),
          q_index=column(lengths),
          kv_index=jnp.concatenate([past_index, recent_index, column(lengths)], axis=1),
          q_is_instruction=column(jnp.zeros_like(active)),
          kv_is_instruction=jnp.concatenate([past_is_instruction, no], axis=1))
      batch = {'inputs': column(slot['last']), 'positions': column(lengths), 'mask': mask}
      cache = {name: [(p, r) for p, r in zip(past[name], recent[name])] for name in past}
      hidden, new = self.model.hidden_states(params, batch, cache=cache)
      recent = jax.tree.map(lambda r, n: jax.lax.dynamic_update_slice_in_dim(r, n, i, axis=3),
                            recent, new)
      recent_segment_ids = recent_segment_ids.at[:, i].set(segment)
      recent_index = recent_index.at[:, i].set(lengths)
      lengths = lengths + active
      tokens = self._sample(params, hidden, state['keys'], lengths, sampling)
      kept, still_active = self._accept(active, tokens, lengths, slot['budget'])
      slot = dict(last=jnp.where(kept, tokens, slot['last']), lengths=lengths,
                  budget=slot['budget'] - kept, active=still_active)
      out = out.at[i].set(jnp.where(kept, tokens, NO_TOKEN))
      return i + 1, recent, recent_segment_ids, recent_index, slot, out

    def go_on(carry):
      i, *_, slot, _ = carry
      active = slot['active']
      return (i < self.chunk) & active.any() & ~(stop_when_free & ~active.all())

    recent = kv_cache.constrain(jax.tree.map(
        lambda c: jnp.zeros(c.shape[:3] + (self.chunk,) + c.shape[4:], c.dtype), past))
    chunk_ids = jnp.zeros((self.slots, self.chunk), jnp.int32)
    slot = {key: state[key] for key in ('last', 'lengths', 'budget', 'active')}
    out = jnp.full((self.chunk, self.slots), NO_TOKEN, jnp.int32)
    _, recent, recent_segment_ids, recent_index, slot, out = jax.lax.while_loop(
        go_on, step, (jnp.int32(0), recent, chunk_ids, chunk_ids, slot, out))
    # The chunk's tokens into the cache at their positions (columns no row filled are dropped).
    positions = jnp.where(recent_segment_ids > 0, recent_index, self.max_len)
    state = dict(state, **slot, cache=kv_cache.write(state['cache'], recent, rows, positions),
                 segment_ids=state['segment_ids'].at[rows[:, None], positions].set(1, mode='drop'))
    return state, out

  # ---- host loop --------------------------------------------------------------------------

  @_on_mesh
  def lower(self, sampling: Sampling, *, prompt_len: int, window: int | None = None,
            params=None) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
    """(prefill, decode) as generate() runs them, lowered for inspection or compile-only memory:
    a prefill of every slot with `prompt_len`-token prompts and a decode chunk over `window`
    cache positions (default max_len). `params` (default: the engine's) may be abstract
    (ShapeDtypeStructs with shardings), for devices that are not here."""
    params = self.params if params is None else params
    s, window = self.slots, window or self.max_len
    state = jax.eval_shape(self._zero_state)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32)
    prefill = self._prefill.lower(
        params, state, ints(s, prompt_len), ints(s), ints(s), ints(s), sampling,
        jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((s,), np.uint32))
    decode = self._decode.lower(params, state, sampling, window, np.bool_(False))
    return prefill, decode

  @_on_mesh
  def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 256,
               sampling: Sampling = Sampling(), seed: int = 0, progress=None,
               request_seeds: list[int] | None = None) -> list[list[int]]:
    """Response token ids (EOA excluded) for each prompt (instruction ids). Request r samples
    from its own stream, `seed` folded with `request_seeds[r]` (default r): its tokens do not
    depend on the other requests, the slots or the refill order."""
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    for p in prompts:
      if not 0 < len(p) < self.max_len:
        raise UserError(f'prompt of {len(p)} tokens does not fit max_len {self.max_len}')
    outputs = [[] for _ in prompts]
    queue = [r for r in range(len(prompts)) if limits[r] > 0][::-1]
    if progress and len(queue) < len(prompts):
      progress(len(prompts) - len(queue))
    owner = [None] * self.slots  # request index per row
    lengths = np.zeros(self.slots, np.int32)  # the host's copy of state['lengths']
    request_seeds = list(range(len(prompts))) if request_seeds is None else list(request_seeds)
    if len(request_seeds) != len(prompts):
      raise ValueError(f'{len(request_seeds)} request seeds for {len(prompts)} prompts')
    state, rng = self._init_state(), jax.random.key(seed)

    while queue or any(o is not None for o in owner):
      free = [slot for slot in range(self.slots) if owner[slot] is None]
      group = [(slot, queue.pop()) for slot in free[:len(queue)]]
      first = None
      if group:
        size = round_up(bucket(len(group), 1), self.batch_shards)
        length = min(bucket(max(len(prompts[r]) for _, r in group)), self.max_len)
        tokens = np.zeros((size, length), np.int32)
        prompt_lens = np.ones(size, np.int32)
        rows = np.full(size, self.slots, np.int32)  # padding rows are dropped
        group_limits, group_seeds = np.zeros(size, np.int32), np.zeros(size, np.uint32)
        for i, (slot, request) in enumerate(group):
          prompt = prompts[request]
          tokens[i, :len(prompt)], prompt_lens[i], rows[i] = prompt, len(prompt), slot
          group_limits[i], group_seeds[i] = limits[request], request_seeds[request]
          owner[slot], lengths[slot] = request, len(prompt)
        state, first = self._prefill(self.params, state, tokens, prompt_lens, rows, group_limits,
                                     sampling, rng, group_seeds)
      longest = max(int(lengths[slot]) for slot in range(self.slots) if owner[slot] is not None)
      window = min(bucket(longest, self.min_window), self.max_len)
      state, out = self._decode(self.params, state, sampling, window, np.bool_(bool(queue)))
      first, out, active, lengths = jax.device_get(
          (first, out, state['active'], state['lengths']))
      lengths = np.array(lengths)
      for i, (slot, _) in enumerate(group):
        if first[i] != NO_TOKEN:
          outputs[owner[slot]].append(int(first[i]))
      for slot in range(self.slots):
        if owner[slot] is None:
          continue
        outputs[owner[slot]].extend(int(t) for t in out[:, slot] if t != NO_TOKEN)
        if not active[slot]:
          owner[slot] = None
          if progress:
            progress(1)
    return outputs

  @_on_mesh
  def score(self, examples: list[tuple[list[int], list[int]]], batch_size: int = 16,
            progress=None):
    """Per (instruction ids, response ids): (summed log-prob of the response, its token count,
    whether greedy decoding reproduces it token for token). `batch_size` is rounded up to a
    multiple of the mesh's data * fsdp."""
    results, batch_rows = [], round_up(batch_size, self.batch_shards)
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
      rows += [np.zeros(0, np.int64)] * (batch_rows - len(chunk))  # one shape per row length
      batch = pack_rows(tokens, index, lengths, rows, row_len)
      logprob, count, greedy = self._score_rows(self.params, batch)
      results += [(float(l), int(c), bool(g)) for l, c, g in
                  zip(*jax.device_get((logprob, count, greedy)))][:len(chunk)]
      if progress:
        progress(len(chunk))
    return results

  def _score_batch(self, params, batch):
    logits = self.model.logits(params, batch)
    labelled = batch['labels'] >= 0
    targets = jnp.where(labelled, batch['labels'], 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    hit = (jnp.argmax(self._without_padding(logits), -1) == targets) | ~labelled
    return (jnp.where(labelled, logp, 0).sum(-1), labelled.sum(-1), hit.all(-1))
