"""Building blocks: parameter-free RMSNorm, RoPE, gated MHA, SwiGLU, pre-norm block, stack."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from hrmtext.model import attention as attention_lib
from hrmtext.model import cache as kv_cache
from hrmtext.model.config import ComputeConfig, ModelConfig

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
  """MHA with a sigmoid output gate; gate/q/k/v come from one fused projection."""
  cfg: ModelConfig
  compute: ComputeConfig

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
    parts = checkpoint_name(jnp.einsum('btd,dnhk->btnhk', x, gqkv.astype(dtype)), 'gqkv')
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
    return jnp.einsum('bthk,hkd->btd', out, out_proj.astype(dtype)), cache


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, jnp.dtype(self.compute.dtype)
    gate_up = param(self, 'gate_up', (cfg.hidden_size, 2, cfg.mlp_size), ('embed', None, 'mlp'),
                    cfg.hidden_size**-0.5)
    down = param(self, 'down', (cfg.mlp_size, cfg.hidden_size), ('mlp', 'embed'),
                 cfg.mlp_size**-0.5)
    parts = checkpoint_name(jnp.einsum('btd,dnf->btnf', x, gate_up.astype(dtype)),  # see Attention
                            'mlp_gate_up')
    gate, up = parts[:, :, 0], parts[:, :, 1]
    h = constrain(jax.nn.silu(gate) * up, 'act_batch', 'act_length', 'act_mlp')
    return jnp.einsum('btf,fd->btd', h, down.astype(dtype))


class Block(nn.Module):
  """Pre-norm: x += attn(rms(x)); x += mlp(rms(x)). Post-norm (the reference's norm_type post):
  x = rms(x + attn(x)); x = rms(x + mlp(x))."""
  cfg: ModelConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache):
    eps = self.cfg.rms_norm_eps
    attn = Attention(self.cfg, self.compute, name='attn')
    mlp = Mlp(self.cfg, self.compute, name='mlp')
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
  """`num_layers` blocks under nn.scan (+ remat), then (`final_norm`) MagicNorm's RMSNorm."""
  cfg: ModelConfig
  compute: ComputeConfig
  num_layers: int

  @nn.compact
  def __call__(self, x, rope, mask, cache=None, final_norm=True):
    block = Block
    if self.compute.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[self.compute.remat_policy], prevent_cse=False)
    layers = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=self.num_layers,
        unroll=self.num_layers if self.compute.unroll_loops else 1,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )(self.cfg, self.compute, name='layers')
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
  their float32 gradient would make both backward GEMMs of the head float32 ones."""
  cfg: ModelConfig
  compute: ComputeConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = param(self, 'kernel', (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'),
                   cfg.hidden_size**-0.5)
    logits = jnp.einsum('btd,dv->btv', x, kernel.astype(self.compute.dtype))
    return constrain(logits.astype(jnp.float32), 'act_batch', 'act_length', 'act_vocab')
