"""HRM-Text and its baselines (the reference's models/baselines) behind one functional interface.

The recurrence is a pure function of a parameter pytree; Linen modules supply the pieces.
That makes a forward-only stack application a plain call on stop-gradient'ed parameters
and inputs: JAX then stores no residuals and does no backward work for it.
"""
import collections
import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from hrmtext.errors import UserError
from hrmtext.model import cache as kv_cache
from hrmtext.model import loss
from hrmtext.model.attention import AttentionMask, PackedRuns, auto_implementation
from hrmtext.model.config import REMAT_POLICIES, ComputeConfig, ModelConfig
from hrmtext.model.horizon import Horizon, full_horizon
from hrmtext.model.layers import Embed, LMHead, Stack, rope_tables, truncated_normal
from hrmtext.model.lora import LoraConfig


class LanguageModel:
  """Shared embedding / LM head; subclasses define the stacks and `hidden_states`. With `lora`,
  the parameters hold LoRA adapters beside the weights they adapt (hrmtext.model.lora)."""
  stacks: tuple = ()

  def __init__(self, cfg: ModelConfig, compute: ComputeConfig, lora: LoraConfig | None = None):
    self.cfg, self.compute, self.lora = cfg, compute, lora
    self.embed = Embed(cfg, compute)
    self.stack = Stack(cfg, compute, cfg.layers_per_stack)
    self.adapted_stack = Stack(cfg, compute, cfg.layers_per_stack, lora) if lora else None
    self.head = LMHead(cfg, compute, lora)

  def stack_module(self, name: str) -> Stack:
    """The module of stack `name`: with adapters where the LoRA config adapts it."""
    return self.adapted_stack if self.lora and self.lora.adapts_stack(name) else self.stack

  def init(self, rng, z_L_init: str = 'truncated_normal') -> dict:
    """Parameters, boxed with their logical axes (`nn.unbox` to get plain arrays). `z_L_init`:
    how the recurrent models' fixed z_L vector starts ('truncated_normal' or 'zeros')."""
    del z_L_init  # no recurrence here
    cfg = self.cfg
    tokens = jnp.zeros((1, 1), jnp.int32)
    x = jnp.zeros((1, 1, cfg.hidden_size), self.compute.dtype)
    mask = AttentionMask.packed(jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), bool))
    rope = rope_tables(jnp.zeros((1, 1), jnp.int32), cfg.head_dim, cfg.rope_theta)
    rng_embed, rng_head, *rng_stacks = jax.random.split(rng, 2 + len(self.stacks))
    params = {
        'embed': self.embed.init(rng_embed, tokens)['params'],
        'lm_head': self.head.init(rng_head, x)['params'],
    }
    for name, key in zip(self.stacks, rng_stacks):
      params[name] = self.stack_module(name).init(key, x, rope, mask)['params']
    return params

  def has_gradient(self, horizon: Horizon) -> dict:
    """Per top-level parameter group: does the horizon give it a gradient?"""
    return {name: True for name in ('embed', 'lm_head') + self.stacks}

  def _apply_stack(self, name, params, x, rope, mask, past, rng=None):
    """One application of stack `name` (its parameters `params`): (output, its keys/values).
    `rng`: the adapters' dropout (training a LoRA model)."""
    return self.stack_module(name).apply(
        {'params': params}, x, rope, mask, past, final_norm=self.cfg.has_final_norm(name),
        rngs={} if rng is None else {'dropout': rng})

  def head_logits(self, params, hidden):
    """float32 logits [batch, len, vocab] of final hidden states."""
    return self.head.apply({'params': params['lm_head']}, hidden)

  def logits(self, params, batch, horizon: Horizon | None = None):
    hidden, _ = self.hidden_states(params, batch, horizon)
    return self.head_logits(params, hidden)

  def loss_sums(self, params, batch, horizon: Horizon | None = None, loss_chunk_len: int = 0,
                rng=None):
    """Summed loss/accuracy counts (`loss.loss_and_metrics`) of a packed batch. With
    `loss_chunk_len`, logits are computed that many positions at a time (same values, a chunk's
    logits live instead of the whole batch's: `loss.chunked_token_stats`). `rng`: the LoRA
    adapters' dropout."""
    hidden, _ = self.hidden_states(params, batch, horizon, rng=rng)
    labels = batch['labels']
    logits_fn = functools.partial(self.head_logits, params)
    if 0 < loss_chunk_len < labels.shape[1]:
      stats = loss.chunked_token_stats(logits_fn, hidden, labels, loss_chunk_len)
    else:
      stats = loss.token_stats(logits_fn(hidden), labels)
    return loss.sums_from_token_stats(*stats, labels, batch['segment_ids'])

  def frozen_base(self, base):
    """A LoRA model's frozen base as training holds it: the stacks and LM head in
    lora.base_dtype (default: the compute dtype, which the forward casts them to anyway)."""
    dtype = jnp.dtype(self.lora.base_dtype or self.compute.dtype)
    return {name: jax.tree.map(lambda p: p.astype(dtype), sub)
            if name in self.stacks + ('lm_head',) else sub for name, sub in base.items()}

  def _stacks_in_compute_dtype(self, params):
    """The stacks' weights cast to the compute dtype once per forward pass, outside the layer and
    recurrence loops, rather than in every application (a no-op in float32)."""
    dtype = jnp.dtype(self.compute.dtype)
    return {name: jax.tree.map(lambda p: p.astype(dtype), sub) if name in self.stacks else sub
            for name, sub in params.items()}

  def _inputs(self, params, batch):
    cfg = self.cfg
    mask = batch.get('mask')
    if mask is None:
      mask = AttentionMask.packed(batch['segment_ids'], batch['is_instruction'],
                                  PackedRuns.from_batch(batch))
    rope = rope_tables(batch['positions'], cfg.head_dim, cfg.rope_theta)
    if cfg.attn_type == 'causal':  # no bidirectional instruction block: causal everywhere
      mask = mask.replace(q_is_instruction=jnp.zeros_like(mask.q_is_instruction),
                          kv_is_instruction=jnp.zeros_like(mask.kv_is_instruction), runs=None)
    x = self.embed.apply({'params': params['embed']}, batch['inputs'])
    return x, rope, mask

  def init_cache(self, batch_size: int, length: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache: one slot per stack application and layer (see hrmtext.model.cache)."""
    return kv_cache.init(self.cfg, self.cache_slots(), batch_size, length, dtype)


class Transformer(LanguageModel):
  """Baseline: one stack of `layers_per_stack` blocks (with the final MagicNorm)."""
  stacks = ('stack',)

  def cache_slots(self):
    return {'stack': 1}

  def hidden_states(self, params, batch, horizon=None, cache=None, rng=None):
    params = self._stacks_in_compute_dtype(params)
    x, rope, mask = self._inputs(params, batch)
    applications = kv_cache.Applications(cache)
    x, new = self._apply_stack('stack', params['stack'], x, rope, mask,
                               applications.next('stack'), rng)
    applications.give('stack', new)
    return x, applications.new_entries()


class Recurrent(LanguageModel):
  """The recurrent models, one loop over stack applications (subclasses name the stacks):

    z_H = scaled_embedding(tokens); z_L = z_L_init
    for i in range(H_cycles):
      for j in range(L_cycles):  z_L = L(z_L + z_H)
      z_H = H(z_H + z_L)    # RINS: H(z_L), no injection; UT: no H, the output is z_L
    output z_H

  Each application is differentiable or forward-only as the credit horizon says.
  """
  L_stack, H_stack = 'L', 'H'  # the stacks playing L and H (H None: no H updates)
  inject_H = True  # H's input is z_H + z_L (else z_L)

  def init(self, rng, z_L_init: str = 'truncated_normal') -> dict:
    rng, rng_z = jax.random.split(rng)
    params = super().init(rng)
    shape = (self.cfg.hidden_size,)
    z = jnp.zeros(shape) if z_L_init == 'zeros' else truncated_normal(1.0)(rng_z, shape)
    params['z_L_init'] = nn.LogicallyPartitioned(z, ('embed',))
    return params

  def cache_slots(self):
    n_L, n_H = self.cfg.applications
    slots = collections.Counter({self.L_stack: n_L})
    if self.H_stack:
      slots[self.H_stack] += n_H
    return dict(slots)

  def _recurrence(self, horizon: Horizon, z_H, z_L, L_run, H_step):
    """The loop above, on any kind of state: `L_run(z_L, z_H, differentiable, n)` applies L n
    times, `H_step(z_H, z_L, differentiable)` applies H once."""
    cfg = self.cfg
    for h in range(cfg.H_cycles):
      for differentiable, n in _forward_only_then_differentiable(
          horizon.L[h * cfg.L_cycles:(h + 1) * cfg.L_cycles]):
        z_L = L_run(z_L, z_H, differentiable, n)
      if self.H_stack:
        z_H = H_step(z_H, z_L, horizon.H[h])
    return z_H if self.H_stack else z_L

  def has_gradient(self, horizon: Horizon) -> dict:
    """Runs the loop on sets: each state becomes the parameter groups it depends on
    differentiably (a forward-only application's output on none)."""
    def apply(name, differentiable, *inputs):
      return frozenset({name}).union(*inputs) if differentiable else frozenset()

    reached = self._recurrence(
        horizon, frozenset({'embed'}), frozenset(),
        lambda z_L, z_H, differentiable, n: apply(self.L_stack, differentiable, z_L, z_H),
        lambda z_H, z_L, differentiable: apply(self.H_stack, differentiable, z_L,
                                               *((z_H,) if self.inject_H else ())))
    return {'lm_head': True, 'z_L_init': False,  # z_L_init is a fixed, untrained state
            **{name: name in reached for name in ('embed',) + self.stacks}}

  def hidden_states(self, params, batch, horizon=None, cache=None, rng=None):
    """Final hidden states [batch, len, hidden] and, with a `cache` (the past keys/values of every
    stack application, read-only), the keys/values of these tokens (hrmtext.model.cache). `rng`:
    the LoRA adapters' dropout, a key of its own for each application."""
    cfg = self.cfg
    horizon = horizon or full_horizon(cfg)
    params = self._stacks_in_compute_dtype(params)
    x, rope, mask = self._inputs(params, batch)
    z_L = jnp.broadcast_to(jax.lax.stop_gradient(params['z_L_init']).astype(x.dtype), x.shape)
    frozen = jax.lax.stop_gradient(params)
    applications = kv_cache.Applications(cache)
    calls = itertools.count()

    def keys(n):
      """Dropout keys of the next call's n applications (None without dropout)."""
      return None if rng is None else jax.random.split(jax.random.fold_in(rng, next(calls)), n)

    def apply_stack(name, differentiable, x, past, key=None):
      """One application; forward-only ones see constant parameters and inputs."""
      p = params[name] if differentiable else frozen[name]
      x = x if differentiable else jax.lax.stop_gradient(x)
      return self._apply_stack(name, p, x, rope, mask, past, key)

    def L_run(z_L, z_H, differentiable, n):
      """n applications of L on z_L + z_H: one jax.lax.scan, or, with a cache (each application
      has its own), a Python loop."""
      step = lambda z_L, past, key=None: apply_stack(self.L_stack, differentiable, z_L + z_H,
                                                     past, key)
      if cache is None:
        return jax.lax.scan(lambda z_L, key: step(z_L, None, key), z_L, keys(n), length=n,
                            unroll=self.compute.unroll_loops)[0]
      for _ in range(n):
        z_L, new = step(z_L, applications.next(self.L_stack))
        applications.give(self.L_stack, new)
      return z_L

    def H_step(z_H, z_L, differentiable):
      key = None if rng is None else keys(1)[0]
      z_H, new = apply_stack(self.H_stack, differentiable, z_H + z_L if self.inject_H else z_L,
                             applications.next(self.H_stack), key)
      applications.give(self.H_stack, new)
      return z_H

    return self._recurrence(horizon, x, z_L, L_run, H_step), applications.new_entries()


class HrmText(Recurrent):
  """HRM-Text: L runs L_cycles times per H cycle on z_L + z_H, then H on z_H + z_L."""
  stacks = ('L', 'H')


class TinyRecursive(Recurrent):
  """TRM (and TRM-match): HRM's loop with one shared stack as both L and H."""
  stacks = ('stack',)
  L_stack = H_stack = 'stack'


class UniversalTransformer(Recurrent):
  """UT: one shared stack, z = stack(z + embedding) L_cycles times from z = z_L_init."""
  stacks = ('stack',)
  L_stack, H_stack = 'stack', None


class Rins(Recurrent):
  """RINS: L_cycles applications of L on z_L + embedding, then one of H on z_L alone."""
  stacks = ('L', 'H')
  inject_H = False


def _forward_only_then_differentiable(flags) -> list[tuple[bool, int]]:
  """An H cycle's L steps as (differentiable, count) runs: the credit horizon makes them a
  forward-only run followed by a differentiable one (either may be empty)."""
  n_frozen = flags.index(True) if True in flags else len(flags)
  return [(d, n) for d, n in ((False, n_frozen), (True, len(flags) - n_frozen)) if n]


MODELS = {'hrm': HrmText, 'transformer': Transformer, 'ut': UniversalTransformer,
          'trm': TinyRecursive, 'trm_match': TinyRecursive, 'rins': Rins}


def build_model(cfg: ModelConfig, compute: ComputeConfig = ComputeConfig(),
                device=None, lora: LoraConfig | None = None) -> LanguageModel:
  """The model of `cfg` run as `compute` says, on `device` (default: this host's first): an
  'auto' attention kernel is resolved here, once, for that device (a compile-only target's too),
  so `model.compute` says which kernel runs. An 'auto' remat policy not fitted to memory
  (training.fit) is the most frugal one. `lora` (rank > 0): with LoRA adapters."""
  lora = lora if lora and lora.rank else None
  if lora and cfg.single_stack and lora.stacks != 'both':
    raise UserError(f'lora.stacks {lora.stacks!r}: {cfg.architecture} has one stack (use both)')
  if compute.attention == 'auto':
    kernel = auto_implementation(device or jax.devices()[0], compute.dtype)
    compute = dataclasses.replace(compute, attention=kernel)
  if compute.remat_policy == 'auto':
    compute = dataclasses.replace(compute, remat_policy=REMAT_POLICIES[-1])
  return MODELS[cfg.architecture](cfg, compute, lora)
