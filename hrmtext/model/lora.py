"""LoRA (Hu et al., 2021) as PEFT defines it: a targeted projection y = W x becomes
y = W x + (alpha / rank) * B A dropout(x), with A [rank, in] (random) and B [out, rank] (zeros: the
adapted model starts as its base), W frozen.

Adapters are parameters of the layers they adapt (hrmtext.model.layers), named after the weight:
`gqkv_lora_a` / `gqkv_lora_b` beside `gqkv`, with its logical axes (the rank axis replicated) and,
in a stack, its 'layers' axis, so they shard as their weight does. hrmtext fuses the attention's
gate/q/k/v projections (`gqkv` [hidden, 4, heads, head_dim]) and the MLP's gate/up ones
(`gate_up` [hidden, 2, mlp]) where transformers (and so PEFT) has one module each: a fused
weight's adapter holds one A and one B per targeted part (`gqkv_lora_a` [hidden, parts, rank],
`gqkv_lora_b` [parts, rank, heads, head_dim]), part p exactly PEFT's adapter of that module.

Training applies them inside the layers, x @ A @ B beside x @ W: the frozen W then needs no
weight gradient (the full-size dW GEMMs, a third of a step's FLOPs, are not done, and no
full-size gradient buffer exists), dropout acts on x as PEFT's does, and the extra work is
rank * (in + out) per token against in * out. Inference and export use `merge` (W + scale A B,
once), so a LoRA run serves at the base model's cost.

The tree transforms here (`split`, `combine`, `merge`) work on nested dicts of any leaves
(arrays, shapes, shardings).
"""
import dataclasses

import jax
import jax.numpy as jnp

from hrmtext.errors import UserError

SUFFIXES = ('_lora_a', '_lora_b')

# Target name -> (hrmtext weight, part of a fused weight or None). Fused parts are in the weight's
# own order: gqkv (gate, q, k, v), gate_up (gate, up).
TARGETS = {
    'attn.gate': ('gqkv', 0), 'attn.q': ('gqkv', 1), 'attn.k': ('gqkv', 2), 'attn.v': ('gqkv', 3),
    'attn.o': ('o', None),
    'mlp.gate': ('gate_up', 0), 'mlp.up': ('gate_up', 1), 'mlp.down': ('down', None),
    'lm_head': ('kernel', None),
}
GROUPS = {'attn': [t for t in TARGETS if t.startswith('attn.')],
          'mlp': [t for t in TARGETS if t.startswith('mlp.')], 'all': list(TARGETS)}
# Fused weights: (parts, the parts' axis counted from the end).
FUSED_PARTS = {'gqkv': (4, -3), 'gate_up': (2, -2)}
DTYPES = ('', 'float32', 'bfloat16')

# A @ B of each adapted weight in the weight's own layout ('...': a stack's layers axis).
_PRODUCT = {
    'gqkv': '...dpr,...prhk->...dphk',
    'gate_up': '...dpr,...prf->...dpf',
    'o': '...hkr,...rd->...hkd',
    'down': '...fr,...rd->...fd',
    'kernel': '...dr,...rv->...dv',
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The `lora` config section. rank 0: no adapters (full fine-tuning).

  targets: comma-separated names of TARGETS (attn.q, attn.k, attn.v, attn.gate, attn.o,
  mlp.gate, mlp.up, mlp.down, lm_head) or groups (attn, mlp, all). stacks: 'both', 'H' or 'L'
  (single-stack architectures: 'both'). dropout: on the adapters' input in the stacks while
  training, one mask per fused projection (PEFT draws one per module); the LM head's adapter has
  none (its logits run in loss chunks). base_dtype: the frozen stacks and LM head as held in
  training ('': the compute dtype, which the forward casts them to anyway, so lossless)."""
  rank: int = 0
  alpha: float = 32.0
  dropout: float = 0.0
  targets: str = 'attn,mlp,lm_head'
  stacks: str = 'both'
  base_dtype: str = ''

  def __post_init__(self):
    if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
      raise UserError(f'lora needs rank >= 0, alpha > 0 and dropout in [0, 1); got rank '
                      f'{self.rank}, alpha {self.alpha}, dropout {self.dropout}')
    if self.stacks not in ('both', 'H', 'L'):
      raise UserError(f"lora.stacks {self.stacks!r} is not one of 'both', 'H', 'L'")
    if self.base_dtype not in DTYPES:
      raise UserError(f'lora.base_dtype {self.base_dtype!r} is not one of {DTYPES}')
    self.target_names  # pylint: disable=pointless-statement (checks the names)

  @property
  def target_names(self) -> tuple[str, ...]:
    names = set()
    for name in (n.strip() for n in self.targets.split(',') if n.strip()):
      if name not in TARGETS and name not in GROUPS:
        raise UserError(f'lora.targets: unknown {name!r}; have {", ".join(TARGETS)} and the '
                        f'groups {", ".join(GROUPS)}')
      names.update(GROUPS.get(name, [name]))
    if not names:
      raise UserError('lora.targets is empty')
    return tuple(t for t in TARGETS if t in names)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def parts(self, weight: str) -> tuple[int, ...]:
    """The targeted parts of fused `weight` ('gqkv', 'gate_up'), ascending."""
    return tuple(sorted(part for w, part in map(TARGETS.get, self.target_names) if w == weight))

  def adapts(self, weight: str) -> bool:
    """Does an adapter target `weight` (any part of it)?"""
    return any(w == weight for w, _ in map(TARGETS.get, self.target_names))

  def adapts_stack(self, name: str) -> bool:
    return self.stacks in ('both', name)

  @classmethod
  def from_dict(cls, d) -> 'LoraConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d or {}).items() if k in names and v is not None})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters) of a tree holding both; each keeps the nesting of its leaves."""
  base, adapters = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      value_base, value_adapters = split(value)
      if value_base:
        base[key] = value_base
      if value_adapters:
        adapters[key] = value_adapters
    elif is_adapter(key):
      adapters[key] = value
    else:
      base[key] = value
  return base, adapters


def combine(base: dict | None, adapters: dict) -> dict:
  """The tree holding both (`split`'s inverse); `adapters` alone without a base."""
  if base is None:
    return adapters
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(out[key], value) if isinstance(value, dict) else value
  return out


def place_parts(delta, parts: tuple[int, ...], count: int, axis: int):
  """`delta` with its `axis` holding the `parts` of a fused weight, spread to all `count` parts
  (zeros where no adapter)."""
  if parts == tuple(range(count)):
    return delta
  zeros = jnp.zeros_like(jnp.take(delta, 0, axis=axis))
  return jnp.stack([jnp.take(delta, parts.index(i), axis=axis) if i in parts else zeros
                    for i in range(count)], axis=axis)


def delta(weight: str, a, b, lora: LoraConfig):
  """scale * A @ B of `weight`'s adapter in the weight's layout and float32."""
  product = jnp.einsum(_PRODUCT[weight], a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * lora.scale
  if weight in FUSED_PARTS:
    product = place_parts(product, lora.parts(weight), *FUSED_PARTS[weight])
  return product


def merge(params: dict, lora: LoraConfig) -> dict:
  """The plain weights of a tree holding base and adapters: W + scale * A @ B for each adapted
  W (in W's dtype), the adapters gone."""
  out = {}
  for key, value in params.items():
    if is_adapter(key):
      continue
    if isinstance(value, dict):
      out[key] = merge(value, lora)
    elif key + SUFFIXES[0] in params:
      a, b = (params[key + suffix] for suffix in SUFFIXES)
      out[key] = (value.astype(jnp.float32) + delta(key, a, b, lora)).astype(value.dtype)
    else:
      out[key] = value
  return out


def count(adapters: dict) -> int:
  """Parameters in an adapter tree."""
  return sum(x.size for x in jax.tree.leaves(adapters))
