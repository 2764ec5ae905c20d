"""HF transformers `hrm_text` checkpoint directory <-> hrmtext checkpoint.

Weights: PyTorch Linear `[out, in]`; fused `gqkv_proj` rows are (gate, q, k, v) and
`gate_up_proj` rows are (gate, up) -- the same order as our fused kernels.
Everything of the HF directory we do not model (extra config fields, tokenizer files,
generation config, tensor dtype) is carried in the checkpoint so the export is identical.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import load_file, save_file

from hrmtext.model import ModelConfig
from hrmtext.train import checkpoint

SIDE_FILES = 'hf_files'  # non-weight files of the HF directory, kept verbatim
WEIGHTS = 'model.safetensors'


def is_hf_dir(path: str) -> bool:
  config = os.path.join(path, 'config.json')
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    return json.load(f).get('model_type') == 'hrm_text'


def config_from_hf(hf: dict) -> ModelConfig:
  unsupported = {'attention_bias': True, 'mlp_bias': True, 'tie_word_embeddings': True,
                 'prefix_lm': False}
  for key, bad in unsupported.items():
    if hf.get(key) == bad:
      raise ValueError(f'HF config {key}={bad} is not supported by hrmtext')
  rope = hf.get('rope_parameters') or {}
  if rope.get('rope_type', 'default') != 'default' or hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError('only default RoPE and silu MLPs are supported')
  return ModelConfig(
      architecture='hrm', vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_heads=hf['num_attention_heads'], head_dim=hf['head_dim'],
      intermediate_size=hf['intermediate_size'], layers_per_stack=hf['num_layers_per_stack'],
      H_cycles=hf['H_cycles'], L_cycles=hf['L_cycles'], L_bp_cycles=tuple(hf['L_bp_cycles']),
      rope_theta=float(rope.get('rope_theta', 10000.0)), rms_norm_eps=hf['rms_norm_eps'],
      embedding_scale=hf['embedding_scale'], z_L_init='zeros')


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
  if cfg.architecture != 'hrm':
    raise ValueError('only HRM models have a transformers counterpart')
  hf = dict(base or {'architectures': ['HrmTextForCausalLM'], 'model_type': 'hrm_text',
                     'dtype': 'float32', 'hidden_act': 'silu', 'tie_word_embeddings': False,
                     'prefix_lm': True, 'attention_bias': False, 'mlp_bias': False,
                     'initializer_range': cfg.hidden_size**-0.5,
                     'max_position_embeddings': 4096, 'use_cache': True})
  hf.update(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.mlp_size,
      num_layers_per_stack=cfg.layers_per_stack,
      num_hidden_layers=cfg.layers_per_stack * cfg.H_cycles * (cfg.L_cycles + 1),
      H_cycles=cfg.H_cycles, L_cycles=cfg.L_cycles,
      L_bp_cycles=list(cfg.L_bp_cycles) or [2],  # HF's default; a no-op at inference
      rope_parameters={'rope_theta': cfg.rope_theta, 'rope_type': 'default'},
      rms_norm_eps=cfg.rms_norm_eps, embedding_scale=cfg.scale)
  if base is None or 'num_key_value_heads' not in base:
    hf.pop('num_key_value_heads')
  return hf


def params_from_hf(tensors: dict, cfg: ModelConfig) -> dict:
  d, h, k, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_size
  f32 = lambda name: np.asarray(tensors[name].astype(jnp.float32))

  def stack(name):
    layer = lambda i, w: f32(f'model.{name}_module.layers.{i}.{w}.weight')
    layers = range(cfg.layers_per_stack)
    return {'layers': {
        'attn': {
            'gqkv': np.stack([layer(i, 'attn.gqkv_proj').reshape(4, h, k, d).transpose(3, 0, 1, 2)
                              for i in layers]),
            'o': np.stack([layer(i, 'attn.o_proj').reshape(d, h, k).transpose(1, 2, 0)
                           for i in layers])},
        'mlp': {
            'gate_up': np.stack([layer(i, 'mlp.gate_up_proj').reshape(2, f, d).transpose(2, 0, 1)
                                 for i in layers]),
            'down': np.stack([layer(i, 'mlp.down_proj').T for i in layers])}}}

  return {'embed': {'embedding': f32('model.embed_tokens.weight')},
          'lm_head': {'kernel': f32('lm_head.weight').T},
          'L': stack('L'), 'H': stack('H'), 'z_L_init': f32('model.z_L_init')}


def params_to_hf(params: dict, cfg: ModelConfig, dtype) -> dict:
  d = cfg.hidden_size
  p = jax.tree.map(np.asarray, params)
  out = {'model.embed_tokens.weight': p['embed']['embedding'],
         'lm_head.weight': p['lm_head']['kernel'].T, 'model.z_L_init': p['z_L_init']}
  for name in ('L', 'H'):
    layers = p[name]['layers']
    for i in range(cfg.layers_per_stack):
      prefix = f'model.{name}_module.layers.{i}'
      out[f'{prefix}.attn.gqkv_proj.weight'] = layers['attn']['gqkv'][i].transpose(1, 2, 3, 0).reshape(-1, d)
      out[f'{prefix}.attn.o_proj.weight'] = layers['attn']['o'][i].transpose(2, 0, 1).reshape(d, -1)
      out[f'{prefix}.mlp.gate_up_proj.weight'] = layers['mlp']['gate_up'][i].transpose(1, 2, 0).reshape(-1, d)
      out[f'{prefix}.mlp.down_proj.weight'] = layers['mlp']['down'][i].T
  return {name: jnp.asarray(np.ascontiguousarray(w)).astype(dtype) for name, w in out.items()}


def _read_hf_tensors(src: str) -> dict:
  index = os.path.join(src, WEIGHTS + '.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = [WEIGHTS]
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(src, name)))
  return tensors


def hf_to_hrmtext(src: str, dst: str) -> None:
  with open(os.path.join(src, 'config.json')) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf)
  params = params_from_hf(_read_hf_tensors(src), cfg)
  os.makedirs(dst, exist_ok=True)
  mngr = checkpoint.manager(dst, async_save=False)
  checkpoint.save(mngr, 0, meta={'model': cfg.to_dict(), 'hf_config': hf}, params=params)
  mngr.wait_until_finished()
  mngr.close()
  side = [n for n in os.listdir(src) if n != 'config.json' and not n.startswith('model.safetensors')
          and os.path.isfile(os.path.join(src, n))]
  os.makedirs(os.path.join(dst, SIDE_FILES), exist_ok=True)
  for name in side:
    shutil.copy2(os.path.join(src, name), os.path.join(dst, SIDE_FILES, name))


def hrmtext_to_hf(src: str, dst: str, *, use_ema: bool = True) -> None:
  cfg, params, meta = checkpoint.load_weights(src, use_ema=use_ema)
  base = meta.get('hf_config')
  hf = config_to_hf(cfg, base)
  dtype = jnp.dtype((base or {}).get('dtype') or 'float32')
  os.makedirs(dst, exist_ok=True)
  save_file(params_to_hf(params, cfg, dtype), os.path.join(dst, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write('\n')
  side_dir = os.path.join(checkpoint.checkpoint_dir(src), os.pardir, SIDE_FILES)
  if os.path.isdir(side_dir):
    for name in os.listdir(side_dir):
      shutil.copy2(os.path.join(side_dir, name), os.path.join(dst, name))
