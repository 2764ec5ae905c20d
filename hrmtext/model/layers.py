"""Building blocks: parameter-free RMSNorm, RoPE, gated MHA, SwiGLU, pre-norm block, stack."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hrmtext.model import attention as attention_lib
from hrmtext.model import cache as kv_cache
from hrmtext.model import lora as lora_lib
from hrmtext.model.config import ComputeConfig, ModelConfig
from hrmtext.model.lora import LoraConfig

TRUNCATION = 3.0  # init samples are cut at +-3 sigma

# config.REMAT_POLICIES by name. The save_* ones keep tensors tagged with checkpoint_name in
# Attention and Mlp (MaxText's named saves): the fused q/k/v/gate projection, the attention
# output (a flash kernel's forward is not recomputed) and the MLP's gate/up projection.
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    'none': None,
    'save_projections': _save('gqkv', 'attention', 'mlp_gate_up'),
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'save_attention': _save('gqkv', 'attention'),
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
}


def truncated_normal(std: float):
  """Lecun-style init whose *actual* std is `std` (compensating for the truncation)."""
  a = TRUNCATION
  pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
  z = math.erf(a / math.sqrt(2))  # probability mass inside [-a, a]
  truncated_std = math.sqrt(1 - 2 * a * pdf / z)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -a, a, shape, dtype) * (std / truncated_std)

  return init


def param(module: nn.Module, name: str, shape, axes, std: float):
  return module.param(name, nn.with_logical_partitioning(truncated_normal(std), axes), shape)


def lora_pair(module: nn.Module, weight: str, a_shape, a_axes, b_shape, b_axes):
  """The adapter (A, B) of `weight` (hrmtext.model.lora): A initialised as a projection from its
  first axis, B zeros, so that the adapted model starts as its base."""
  a = param(module, weight + lora_lib.SUFFIXES[0], a_shape, a_axes, a_shape[0]**-0.5)
  b = module.param(weight + lora_lib.SUFFIXES[1],
                   nn.with_logical_partitioning(nn.initializers.zeros_init(), b_axes), b_shape)
  return a, b


def lora_input(module: nn.Module, lora: LoraConfig, x):
  """x as the adapters see it: dropped out while training (when given a 'dropout' rng)."""
  if not lora.dropout or not module.has_rng('dropout'):
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1 - lora.dropout, x.shape)
  return jnp.where(keep, x / (1 - lora.dropout), 0).astype(x.dtype)


def lora_fused(module: nn.Module, lora: LoraConfig, weight: str, x, out_shape, out_axes):
  """The adapters' term of fused projection `weight` of x [batch, len, hidden], all parts
  [batch, len, parts, *out_shape] (zeros where none), or None without adapters."""
  parts = lora.parts(weight) if lora else ()
  if not parts:
    return None
  dtype, d, r = x.dtype, x.shape[-1], lora.rank
  a, b = lora_pair(module, weight, (d, len(parts), r), ('embed', None, None),
                   (len(parts), r, *out_shape), (None, None, *out_axes))
  low = jnp.einsum('btd,dpr->btpr', lora_input(module, lora, x), a.astype(dtype)) * lora.scale
  out = jnp.einsum('btpr,pr...->btp...', low, b.astype(dtype))
  return lora_lib.place_parts(out, parts, *lora_lib.FUSED_PARTS[weight])


def lora_matrix(module: nn.Module, lora: LoraConfig, weight: str, x, in_axes, out_size, out_axis):
  """The adapter's term of projection `weight` from x [batch, len, *in] (the dims `in_axes`) to
  [batch, len, out_size], or None without an adapter."""
  if not (lora and lora.adapts(weight)):
    return None
  dtype, in_shape, r = x.dtype, x.shape[2:], lora.rank
  a, b = lora_pair(module, weight, (*in_shape, r), (*in_axes, None), (r, out_size),
                   (None, out_axis))
  low = jnp.tensordot(lora_input(module, lora, x), a.astype(dtype), axes=len(in_shape))
  return jnp.einsum('btr,ro->bto', low * lora.scale, b.astype(dtype))


def add(x, term):
  return x if term is None else x + term


def rms_norm(x, eps: float):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
  """cos/sin [batch, len, head_dim] in float32 (rotate-half layout)."""
  inv_freq = 1.0 / (theta**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, rope):
  cos, sin = rope
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def constrain(x, *axes):
  return nn.with_logical_constraint(x, axes)


class Attention(nn.Module):
  """MHA with a sigmoid output gate; gate/q/k/v come from one fused projection. `lora`: adapters
  of its projections (hrmtext.model.lora)."""
  cfg: ModelConfig
  compute: ComputeConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, rope, mask, cache=None):
    cfg, dtype = self.cfg, jnp.dtype(self.compute.dtype)
    gqkv = param(self, 'gqkv', (cfg.hidden_size, 4, cfg.num_heads, cfg.head_dim),
                 ('embed', None, 'heads', 'head_dim'), cfg.hidden_size**-0.5)
    out_proj = param(self, 'o', (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                     ('heads', 'head_dim', 'embed'), cfg.hidden_size**-0.5)
    # Projection outputs keep x @ W's own order [batch, len, part, ...]: with the part first
    # ('nbthk') XLA:CPU computes the transposed product and copies it back (measured 1.3-1.5x
    # slower tiny train step on a loaded 2-core CPU; no measurable difference idle).
    parts = jnp.einsum('btd,dnhk->btnhk', x, gqkv.astype(dtype))
    parts = checkpoint_name(add(parts, lora_fused(self, self.lora, 'gqkv', x, (
        cfg.num_heads, cfg.head_dim), ('heads', 'head_dim'))), 'gqkv')
    gate, q, k, v = (parts[:, :, i] for i in range(4))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    q, k, v = (constrain(t, 'act_batch', 'act_length', 'act_heads', 'act_head_dim')
               for t in (q, k, v))
    if cache is not None:  # cached inference: the past blocks (read-only), then these tokens
      out, cache = kv_cache.attention(q, k, v, cache, mask)
    else:
      # Initialising needs only shapes, and the XLA path traces for any device (kernels check
      # theirs).
      impl = 'xla' if self.is_initializing() else self.compute.attention
      out = checkpoint_name(attention_lib.attention(q, k, v, mask, impl), 'attention')
    out = jax.nn.sigmoid(gate) * out
    y = jnp.einsum('bthk,hkd->btd', out, out_proj.astype(dtype))
    return add(y, lora_matrix(self, self.lora, 'o', out, ('heads', 'head_dim'), cfg.hidden_size,
                             'embed')), cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). `lora`: adapters of its projections."""
  cfg: ModelConfig
  compute: ComputeConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, jnp.dtype(self.compute.dtype)
    gate_up = param(self, 'gate_up', (cfg.hidden_size, 2, cfg.mlp_size), ('embed', None, 'mlp'),
                    cfg.hidden_size**-0.5)
    down = param(self, 'down', (cfg.mlp_size, cfg.hidden_size), ('mlp', 'embed'),
                 cfg.mlp_size**-0.5)
    parts = jnp.einsum('btd,dnf->btnf', x, gate_up.astype(dtype))  # see Attention
    parts = checkpoint_name(add(parts, lora_fused(self, self.lora, 'gate_up', x, (cfg.mlp_size,),
                                                  ('mlp',))), 'mlp_gate_up')
    gate, up = parts[:, :, 0], parts[:, :, 1]
    h = constrain(jax.nn.silu(gate) * up, 'act_batch', 'act_length', 'act_mlp')
    y = jnp.einsum('btf,fd->btd', h, down.astype(dtype))
    return add(y, lora_matrix(self, self.lora, 'down', h, ('mlp',), cfg.hidden_size, 'embed'))


class Block(nn.Module):
  """Pre-norm: x += attn(rms(x)); x += mlp(rms(x)). Post-norm (the reference's norm_type post):
  x = rms(x + attn(x)); x = rms(x + mlp(x))."""
  cfg: ModelConfig
  compute: ComputeConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, rope, mask, cache):
    eps = self.cfg.rms_norm_eps
    attn = Attention(self.cfg, self.compute, self.lora, name='attn')
    mlp = Mlp(self.cfg, self.compute, self.lora, name='mlp')
    if self.cfg.norm_type == 'post':
      h, cache = attn(x, rope, mask, cache)
      x = rms_norm(x + h, eps)
      x = rms_norm(x + mlp(x), eps)
    else:
      h, cache = attn(rms_norm(x, eps), rope, mask, cache)
      x = x + h
      x = x + mlp(rms_norm(x, eps))
    return constrain(x, 'act_batch', 'act_length', 'act_embed'), cache


class Stack(nn.Module):
  """`num_layers` blocks under nn.scan (+ remat), then (`final_norm`) MagicNorm's RMSNorm.
  `lora`: adapters of the blocks' projections; each layer draws its own dropout."""
  cfg: ModelConfig
  compute: ComputeConfig
  num_layers: int
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, rope, mask, cache=None, final_norm=True):
    block = Block
    if self.compute.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[self.compute.remat_policy], prevent_cse=False)
    layers = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=self.num_layers,
        unroll=self.num_layers if self.compute.unroll_loops else 1,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )(self.cfg, self.compute, self.lora, name='layers')
    x, cache = layers(x, rope, mask, cache)
    return (rms_norm(x, self.cfg.rms_norm_eps) if final_norm else x), cache


class Embed(nn.Module):
  """Token embedding; rows are multiplied by 1/init_std (`embedding_scale`)."""
  cfg: ModelConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    table = param(self, 'embedding', (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'),
                  cfg.hidden_size**-0.5)
    x = jnp.take(table, tokens, axis=0) * cfg.scale
    return constrain(x.astype(self.compute.dtype), 'act_batch', 'act_length', 'act_embed')


class LMHead(nn.Module):
  """Untied output projection; logits in float32, from a GEMM in the compute dtype.

  The GEMM writes compute-dtype logits (accumulated in float32), cast to float32 after, as the
  reference's lm_head under bf16 autocast does: with float32 logits straight out of the GEMM,
  their float32 gradient would make both backward GEMMs of the head float32 ones. `lora`: an
  adapter of the kernel where it targets lm_head."""
  cfg: ModelConfig
  compute: ComputeConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = param(self, 'kernel', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'),
                   cfg.hidden_size**-0.5)
    logits = jnp.einsum('btd,dv->btv', x, kernel.astype(self.compute.dtype))
    logits = add(logits, lora_matrix(self, self.lora, 'kernel', x, ('embed',), cfg.vocab_size,
                                     'vocab'))
    return constrain(logits.astype(jnp.float32), 'act_batch', 'act_length', 'act_vocab')
