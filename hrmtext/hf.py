"""HF transformers `hrm_text` checkpoint directory <-> hrmtext checkpoint.

Config: a hub `config.json` is read as transformers reads it (`resolve_hf_config`: HrmTextConfig's
defaults and `__post_init__` derivations, e.g. a legacy file's `num_hidden_layers` is the blocks
per stack). The reference's own export (`conversion/convert_to_hf.py` of the authors' code) is
accepted too: it writes the layer count of both stacks as `num_hidden_layers` and the credit
horizon as `L_bp_steps`.
Weights: PyTorch Linear `[out, in]`; fused `gqkv_proj` rows are (gate, q, k, v) and
`gate_up_proj` rows are (gate, up) -- the same order as our fused kernels. Like transformers'
conversion mapping, the split in-memory names (`self_attn.{gate,q,k,v}_proj`,
`mlp.{gate,up}_proj`, `self_attn.o_proj`) are accepted as well.
Tokenizer: `tokenizer.json` comes with a `tokenizer_info.json` (the prompt tokens: the release's
by default) as the run's tokenizer (hrmtext.run), so inference needs no --tokenizer; without a
tokenizer, token-id rows still work. Everything of the HF directory we do not model (extra config
fields, tokenizer files, generation config, tensor dtypes) is carried in the run (its hf_files/
and checkpoint meta) so the export is identical.
LoRA runs export as PEFT adapters (`lora_to_peft`): per adapted module of transformers'
HrmTextForCausalLM, PEFT's lora_A [rank, in] and lora_B [out, rank]; a fused weight's adapter
(hrmtext.model.lora) gives one per part, the module of that part.
"""
import json
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.flax import load_file, save_file
from safetensors.numpy import save_file as save_numpy_file

from hrmtext import checkpoint
from hrmtext.data.tokenizer import INFO_FILE, Tokenizer
from hrmtext.errors import UserError
from hrmtext.model import LoraConfig, ModelConfig, lora as lora_lib
from hrmtext.run import Run, find_base

WEIGHTS = 'model.safetensors'
HF_TOKENIZER = 'tokenizer.json'
ADAPTER_CONFIG, ADAPTER_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
# LoRA target (hrmtext.model.lora.TARGETS) -> the module of transformers' HrmTextForCausalLM it
# adapts, in each block of a stack or (lm_head) the model's.
PEFT_MODULES = {
    'attn.gate': 'self_attn.gate_proj', 'attn.q': 'self_attn.q_proj',
    'attn.k': 'self_attn.k_proj', 'attn.v': 'self_attn.v_proj', 'attn.o': 'self_attn.o_proj',
    'mlp.gate': 'mlp.gate_proj', 'mlp.up': 'mlp.up_proj', 'mlp.down': 'mlp.down_proj',
    'lm_head': 'lm_head'}

# transformers' HrmTextConfig field defaults (configuration_hrm_text.py, transformers 5.x).
HF_DEFAULTS = dict(
    vocab_size=151808, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
    num_attention_heads=12, hidden_act='silu', max_position_embeddings=2048,
    initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False, head_dim=128, H_cycles=2, L_cycles=3, prefix_lm=True)
DEFAULT_ROPE_THETA = 10000.0

# The prompt tokens of the released HRM-Text models (the reference tokenizer step's defaults).
RELEASE_PROMPT_TOKENS = dict(
    boq='<|im_start|>', eoq='<|im_end|>', eoa='<|box_end|>',
    condition_mapping=dict(direct='<|object_ref_start|>', cot='<|object_ref_end|>',
                           noisy='<|quad_start|>', synth='<|quad_end|>'))


def read_hf_config(path: str) -> dict:
  """The config.json of HF directory `path`; a UserError says why when it is missing, is not
  JSON or describes another model."""
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise UserError(f'{path} has no config.json (a HF hrm_text directory) and no checkpoints/ '
                    f'(an hrmtext run)')
  try:
    with open(file, encoding='utf-8') as f:
      hf = json.load(f)
  except ValueError as e:  # not JSON, not UTF-8
    raise UserError(f'{file}: not valid JSON ({e})') from None
  if not isinstance(hf, dict):
    raise UserError(f'{file}: expected a JSON object')
  if hf.get('model_type') != 'hrm_text':
    raise UserError(f'{file}: model_type {hf.get("model_type")!r} is not an hrm_text model '
                    f'(HrmTextForCausalLM); hrmtext converts only those')
  return hf


def is_hf_dir(path: str) -> bool:
  """Whether `convert` reads `path` as a HF directory: its config.json is an hrm_text model's, or
  it has no hrmtext checkpoints (then reading it says what is wrong). A run keeps its experiment
  config in a config.json too."""
  try:
    read_hf_config(path)
    return True
  except UserError:
    return not os.path.isdir(Run(path).checkpoints)


def resolve_hf_config(hf: dict) -> dict:
  """The config transformers builds from `hf`: defaults filled in, then HrmTextConfig's
  __post_init__ (L_bp_cycles [2], embedding_scale 1 / initializer_range, and a file without
  num_layers_per_stack has the blocks per stack in num_hidden_layers) and RoPE parameters from a
  legacy top-level `rope_theta`."""
  r = {**HF_DEFAULTS, **hf}
  if r.get('L_bp_cycles') is None:
    r['L_bp_cycles'] = [2]
  if r.get('embedding_scale') is None:
    r['embedding_scale'] = 1.0 / r['initializer_range']
  if r.get('num_layers_per_stack') is None:
    r['num_layers_per_stack'] = r['num_hidden_layers']
    r['num_hidden_layers'] = r['num_layers_per_stack'] * r['H_cycles'] * (r['L_cycles'] + 1)
  rope = dict(r.get('rope_parameters') or {})
  rope.setdefault('rope_type', rope.pop('type', 'default'))
  rope.setdefault('rope_theta', r.get('rope_theta', DEFAULT_ROPE_THETA))
  r['rope_parameters'] = rope
  return r


def is_reference_export(hf: dict) -> bool:
  """Written by the authors' conversion/convert_to_hf.py (it names the horizon `L_bp_steps`)."""
  return 'L_bp_steps' in hf and 'L_bp_cycles' not in hf


def config_from_hf(hf: dict, layers_in_weights: int | None = None) -> ModelConfig:
  """ModelConfig of a config.json (as transformers reads it); `layers_in_weights`, the blocks per
  stack the weights hold, is checked against it."""
  r = resolve_hf_config(hf)
  unsupported = {'attention_bias': True, 'mlp_bias': True, 'tie_word_embeddings': True,
                 'prefix_lm': False}
  for key, bad in unsupported.items():
    if r[key] == bad:
      raise UserError(f'HF config {key}={bad} is not supported by hrmtext')
  rope = r['rope_parameters']
  if rope['rope_type'] != 'default' or r['hidden_act'] != 'silu':
    raise UserError('only default RoPE and silu MLPs are supported')
  layers = r['num_layers_per_stack']
  if is_reference_export(hf) and layers_in_weights is not None and (
      layers == 2 * layers_in_weights):  # n_layers of both stacks
    layers = layers_in_weights
  if layers_in_weights is not None and layers != layers_in_weights:
    raise UserError(f'config.json gives {layers} blocks per stack (num_layers_per_stack, or '
                    f'num_hidden_layers in a legacy file) but the weights hold {layers_in_weights}')
  return ModelConfig(
      architecture='hrm', vocab_size=r['vocab_size'], hidden_size=r['hidden_size'],
      num_heads=r['num_attention_heads'], head_dim=r['head_dim'],
      intermediate_size=r['intermediate_size'], layers_per_stack=layers, H_cycles=r['H_cycles'],
      L_cycles=r['L_cycles'], rope_theta=float(rope['rope_theta']),
      rms_norm_eps=r['rms_norm_eps'], embedding_scale=float(r['embedding_scale']))


def horizon_from_hf(hf: dict) -> dict:
  """The release's credit horizon as a run's train.horizon: per H cycle, its trailing L steps
  (L_bp_cycles; the authors' export calls it L_bp_steps). A fine-tune trains as released with
  --config.train.horizon.schedule=per_cycle and these L_bp_cycles."""
  steps = hf['L_bp_steps'] if is_reference_export(hf) else resolve_hf_config(hf)['L_bp_cycles']
  return {'schedule': 'per_cycle', 'L_bp_cycles': list(steps)}


def release_L_bp_cycles(meta: dict) -> list:
  """L_bp_cycles to export for a checkpoint: an imported one's, a run's that trained per_cycle,
  else transformers' default [2] (a no-op at inference)."""
  horizon = meta.get('horizon') or meta.get('config', {}).get('train', {}).get('horizon', {})
  if horizon.get('schedule') == 'per_cycle' and horizon.get('L_bp_cycles'):
    return list(horizon['L_bp_cycles'])
  return [2]


def _hf_shape(cfg: ModelConfig) -> tuple:
  """What of a ModelConfig a config.json describes."""
  return (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_size,
          cfg.layers_per_stack, cfg.H_cycles, cfg.L_cycles, cfg.rope_theta, cfg.rms_norm_eps,
          cfg.scale)


def config_to_hf(cfg: ModelConfig, base: dict | None = None, L_bp_cycles=(2,)) -> dict:
  """config.json of `cfg` (with the release horizon `L_bp_cycles`). `base`, the config.json it
  was imported from, comes back verbatim when it still describes the model (legacy and
  reference-export files stay as they were); otherwise its other fields are kept."""
  if cfg.architecture != 'hrm':
    raise UserError('only HRM models have a transformers counterpart')
  if (cfg.norm_type, cfg.attn_type) != ('pre', 'prefixlm') or not all(
      map(cfg.has_final_norm, 'LH')):
    raise UserError('transformers has no counterpart of the norm_type / final_norm / attn_type '
                    'ablation switches')
  if base is not None and _hf_shape(config_from_hf(base, cfg.layers_per_stack)) == _hf_shape(cfg):
    return dict(base)
  hf = dict(base or {'architectures': ['HrmTextForCausalLM'], 'model_type': 'hrm_text',
                     'dtype': 'float32', 'hidden_act': 'silu', 'tie_word_embeddings': False,
                     'prefix_lm': True, 'attention_bias': False, 'mlp_bias': False,
                     'initializer_range': cfg.hidden_size**-0.5,
                     'max_position_embeddings': 4096, 'use_cache': True})
  for legacy in ('L_bp_steps', 'rope_theta'):
    hf.pop(legacy, None)
  hf.update(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.mlp_size,
      num_layers_per_stack=cfg.layers_per_stack,
      num_hidden_layers=cfg.layers_per_stack * cfg.H_cycles * (cfg.L_cycles + 1),
      H_cycles=cfg.H_cycles, L_cycles=cfg.L_cycles,
      L_bp_cycles=list(L_bp_cycles),
      rope_parameters={'rope_theta': cfg.rope_theta, 'rope_type': 'default'},
      rms_norm_eps=cfg.rms_norm_eps, embedding_scale=cfg.scale)
  if 'num_key_value_heads' in hf:
    hf['num_key_value_heads'] = cfg.num_heads
  return hf


_SPLIT = re.compile(r'(.*)\.(self_attn|mlp)\.(gate|q|k|v|up|o)_proj\.weight$')
_FUSED = {'self_attn': ('attn.gqkv_proj', ('gate', 'q', 'k', 'v')),
          'mlp': ('mlp.gate_up_proj', ('gate', 'up'))}


def fused_tensors(tensors: dict) -> dict:
  """The file layout (fused gqkv_proj / gate_up_proj, attn.o_proj) of HF tensors in either the
  file layout or transformers' split in-memory layout. Names of neither pass through as they are
  (`params_from_hf` refuses them)."""
  out = {}
  for name, w in tensors.items():
    match = _SPLIT.match(name)
    base, module, part = match.groups() if match else (None, None, None)
    if (module, part) == ('self_attn', 'o'):
      out[name.replace('.self_attn.', '.attn.')] = w
    elif match and part in _FUSED[module][1]:  # joined when its gate comes, so skipped on its own
      fused, parts = _FUSED[module]
      names = [f'{base}.{module}.{p}_proj.weight' for p in parts]
      missing = [n for n in names if n not in tensors]
      if missing:
        raise UserError(f'the weights have {name} but no {missing[0]}')
      if part == 'gate':
        out[f'{base}.{fused}.weight'] = jnp.concatenate([tensors[n] for n in names])
    else:
      out[name] = w
  return out


def layers_per_stack(tensors: dict) -> int:
  found = {int(m.group(1)) for name in tensors
           if (m := re.match(r'model\.H_module\.layers\.(\d+)\.', name))}
  return max(found) + 1 if found else 0


def params_from_hf(tensors: dict, cfg: ModelConfig) -> dict:
  d, h, k, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_size
  tensors = fused_tensors(tensors)
  used = set()

  def f32(name, shape):
    if name not in tensors:
      raise UserError(f'the weights have no {name}')
    used.add(name)
    if tuple(tensors[name].shape) != shape:
      raise UserError(f'{name} has shape {tuple(tensors[name].shape)}; the config implies {shape}')
    return np.asarray(tensors[name].astype(jnp.float32))

  def stack(name):
    layer = lambda i, w, shape: f32(f'model.{name}_module.layers.{i}.{w}.weight', shape)
    layers = range(cfg.layers_per_stack)
    return {'layers': {
        'attn': {
            'gqkv': np.stack([layer(i, 'attn.gqkv_proj', (4 * h * k, d)).reshape(4, h, k, d)
                              .transpose(3, 0, 1, 2) for i in layers]),
            'o': np.stack([layer(i, 'attn.o_proj', (d, h * k)).reshape(d, h, k).transpose(1, 2, 0)
                           for i in layers])},
        'mlp': {
            'gate_up': np.stack([layer(i, 'mlp.gate_up_proj', (2 * f, d)).reshape(2, f, d)
                                 .transpose(2, 0, 1) for i in layers]),
            'down': np.stack([layer(i, 'mlp.down_proj', (d, f)).T for i in layers])}}}

  v = cfg.vocab_size
  params = {'embed': {'embedding': f32('model.embed_tokens.weight', (v, d))},
            'lm_head': {'kernel': f32('lm_head.weight', (v, d)).T},
            'L': stack('L'), 'H': stack('H'), 'z_L_init': f32('model.z_L_init', (d,))}
  unknown = sorted(set(tensors) - used)
  if unknown:  # dropping it would make the round trip lose it
    more = f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''
    raise UserError(f'the weights hold tensors this hrm_text config has no place for: '
                    f'{", ".join(unknown[:3])}{more}; refusing to drop them')
  return params


# The parameters `params_to_hf` writes out: any other would be lost in the export.
EXPORTED_LEAVES = {'embed/embedding', 'lm_head/kernel', 'z_L_init'} | {
    f'{stack}/layers/{w}' for stack in 'LH'
    for w in ('attn/gqkv', 'attn/o', 'mlp/gate_up', 'mlp/down')}


def leaf_names(params) -> list[str]:
  """'L/layers/attn/o'-style names of the leaves of a params tree."""
  return ['/'.join(str(getattr(k, 'key', k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def params_to_hf(params: dict, cfg: ModelConfig, dtypes) -> dict:
  """File-layout tensors; `dtypes(name)` gives each one's dtype."""
  d = cfg.hidden_size
  p = jax.tree.map(np.asarray, params)
  unknown = sorted(set(leaf_names(p)) - EXPORTED_LEAVES)
  if unknown:
    raise UserError(f'the checkpoint has parameters HF hrm_text has no tensor for: '
                    f'{", ".join(unknown)}')
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
  return {name: jnp.asarray(np.ascontiguousarray(w)).astype(dtypes(name)) for name, w in out.items()}


def _read_hf_tensors(src: str) -> dict:
  index = os.path.join(src, WEIGHTS + '.index.json')
  if os.path.isfile(index):
    try:
      with open(index, encoding='utf-8') as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise UserError(f'{index}: not a safetensors index ({type(e).__name__}: {e})') from None
  elif os.path.isfile(os.path.join(src, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise FileNotFoundError(f'{src} has no {WEIGHTS} (or {WEIGHTS}.index.json)')
  tensors = {}
  for name in files:
    try:
      tensors.update(load_file(os.path.join(src, name)))
    except (SafetensorError, ValueError) as e:  # not safetensors, or cut short
      raise UserError(f'{os.path.join(src, name)}: not a readable safetensors file ({e})') from None
  return tensors


def parse_prompt_tokens(pairs) -> dict:
  """`['boq=<|im_start|>', 'synth=<|quad_end|>', ...]` -> {key: token}; keys other than boq,
  eoq, eoa are condition tags."""
  out = {}
  for pair in pairs:
    key, sep, token = pair.partition('=')
    if not sep or not key or not token:
      raise UserError(f'--prompt_tokens entry {pair!r} is not KEY=TOKEN')
    out[key.strip()] = token
  return out


def with_prompt_tokens(info: dict, overrides: dict | None) -> dict:
  """The prompt tokens of tokenizer_info `info` with `overrides` ({boq|eoq|eoa|tag: token})."""
  info = {k: info[k] for k in ('boq', 'eoq', 'eoa')} | {
      'condition_mapping': dict(info['condition_mapping'])}
  for key, token in (overrides or {}).items():
    if key in ('boq', 'eoq', 'eoa'):
      info[key] = token
    else:
      info['condition_mapping'][key] = token
  return info


def import_tokenizer(src: str, run: Run, prompt_tokens: dict | None = None) -> Tokenizer | None:
  """The tokenizer of HF directory `src` made the run's (its tokenizer_info.json pointing into
  the side files, already in the run's hf_files/): its tokenizer.json with the release's prompt
  tokens, or, for an hrmtext export, the model file and prompt tokens its own tokenizer_info.json
  names; then `prompt_tokens` applied. None when `src` has no tokenizer."""
  base, model_file = RELEASE_PROMPT_TOKENS, HF_TOKENIZER
  if os.path.isfile(os.path.join(src, INFO_FILE)):
    with open(os.path.join(src, INFO_FILE)) as f:
      base = json.load(f)
    model_file = os.path.basename(base['tokenizer_path'])
  if not os.path.isfile(os.path.join(run.hf_files, model_file)):
    if prompt_tokens:
      raise UserError(f'--prompt_tokens needs a {model_file} in {src}')
    return None
  info = dict(with_prompt_tokens(base, prompt_tokens), tokenizer_path=model_file)
  try:
    tokenizer = Tokenizer(info, run.hf_files)
  except ValueError as e:
    raise UserError(f'{e} (set the prompt tokens with --prompt_tokens KEY=TOKEN,...)') from None
  tokenizer.save_info(run.tokenizer_dir)
  return tokenizer


def hf_to_hrmtext(src: str, dst: str, *, prompt_tokens: dict | None = None) -> None:
  hf = read_hf_config(src)
  tensors = fused_tensors(_read_hf_tensors(src))
  cfg = config_from_hf(hf, layers_per_stack(tensors))
  params = params_from_hf(tensors, cfg)
  dtypes = {name: str(w.dtype) for name, w in tensors.items()}
  run = Run(dst)
  side = [n for n in os.listdir(src) if n not in ('config.json', INFO_FILE)
          and not n.startswith('model.safetensors') and os.path.isfile(os.path.join(src, n))]
  os.makedirs(run.hf_files, exist_ok=True)
  for name in side:
    shutil.copy2(os.path.join(src, name), os.path.join(run.hf_files, name))
  tokenizer = import_tokenizer(src, run, prompt_tokens)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f'{HF_TOKENIZER} has {tokenizer.vocab_size} tokens, the model only '
                    f'{cfg.vocab_size}')
  mngr = run.manager(async_save=False)
  checkpoint.save(mngr, 0, meta={'model': cfg.to_dict(), 'horizon': horizon_from_hf(hf),
                                 'hf_config': hf, 'hf_dtypes': dtypes},
                  params=params)
  mngr.wait_until_finished()
  mngr.close()


def hrmtext_to_hf(src: str, dst: str, *, use_ema: bool = True) -> None:
  run = Run(src)
  cfg, params, meta = run.load_weights(use_ema=use_ema)
  base = meta.get('hf_config')
  hf = config_to_hf(cfg, base, release_L_bp_cycles(meta))
  default_dtype = jnp.dtype((base or {}).get('dtype') or 'float32')
  saved_dtypes = meta.get('hf_dtypes', {})
  dtypes = lambda name: jnp.dtype(saved_dtypes.get(name, default_dtype))
  tokenizer = None
  try:
    tokenizer = run.tokenizer(meta)
  except (OSError, ValueError) as e:  # e.g. an older run whose data (and tokenizer) is gone
    print(f'note: exporting without a tokenizer: {e}', file=sys.stderr)
  if tokenizer is not None and base is None:  # as the reference export: BOQ / EOA as bos / eos
    hf.update(bos_token_id=tokenizer.boq, eos_token_id=tokenizer.eoa)
  os.makedirs(dst, exist_ok=True)
  save_file(params_to_hf(params, cfg, dtypes), os.path.join(dst, WEIGHTS), metadata={'format': 'pt'})
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
    f.write('\n')
  hf_files = run.hf_files if os.path.isdir(run.hf_files) else meta.get('hf_files')  # LoRA: base's
  if hf_files:
    for name in os.listdir(hf_files):
      shutil.copy2(os.path.join(hf_files, name), os.path.join(dst, name))
  if tokenizer is not None:  # the prompt tokens, next to the tokenizer's model file
    tokenizer.copy_to(dst)


def peft_target_modules(lora: LoraConfig) -> str:
  """PEFT's target_modules of `lora`: a regex of the full module names (PEFT matches it whole)."""
  stacks = 'L|H' if lora.stacks == 'both' else lora.stacks
  block = [re.escape(PEFT_MODULES[t]) for t in lora.target_names if t != 'lm_head']
  patterns = [rf'model\.({stacks})_module\.layers\.\d+\.({"|".join(block)})'] if block else []
  return '|'.join(patterns + (['lm_head'] if 'lm_head' in lora.target_names else []))


def adapters_to_peft(adapters: dict, cfg: ModelConfig, lora: LoraConfig) -> dict:
  """PEFT's tensors (`base_model.model.<module>.lora_A/B.weight`) of hrmtext adapters."""
  out = {}

  def put(module, a, b):  # a [*in, rank], b [rank, *out]
    prefix = f'base_model.model.{module}'
    out[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    out[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)

  adapters = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
  for target in lora.target_names:
    weight, part = lora_lib.TARGETS[target]
    if target == 'lm_head':
      put('lm_head', *(adapters['lm_head'][weight + s] for s in lora_lib.SUFFIXES))
      continue
    for stack in 'LH':
      if not lora.adapts_stack(stack):
        continue
      module = adapters[stack]['layers']['attn' if target.startswith('attn.') else 'mlp']
      a, b = (module[weight + s] for s in lora_lib.SUFFIXES)
      if part is not None:  # [layers, in, parts, rank], [layers, parts, rank, ...]
        j = lora.parts(weight).index(part)
        a, b = a[:, :, j], b[:, j]
      for i in range(cfg.layers_per_stack):
        put(f'model.{stack}_module.layers.{i}.{PEFT_MODULES[target]}', a[i], b[i])
  return out


def write_peft(dst: str, cfg: ModelConfig, lora: LoraConfig, adapters: dict, *,
               base_name: str = '') -> None:
  """A PEFT adapter directory `dst` of `adapters` (of a `cfg` model); `base_name`: its
  base_model_name_or_path."""
  config_to_hf(cfg)  # only what transformers has a counterpart of
  os.makedirs(dst, exist_ok=True)
  save_numpy_file(adapters_to_peft(adapters, cfg, lora), os.path.join(dst, ADAPTER_WEIGHTS),
                  metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_name,
      'r': lora.rank, 'lora_alpha': lora.alpha, 'lora_dropout': lora.dropout,
      'target_modules': peft_target_modules(lora), 'bias': 'none', 'fan_in_fan_out': False,
      'use_rslora': False, 'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': None}
  with open(os.path.join(dst, ADAPTER_CONFIG), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')


def lora_to_peft(src: str, dst: str, *, use_ema: bool = True) -> str:
  """Writes LoRA run `src`'s (EMA) adapters as a PEFT adapter directory `dst`; returns a note
  on the base model it needs (the run's base exported to HF, as those weights)."""
  cfg, lora, adapters, meta = Run(src).load_adapters(use_ema=use_ema)
  ref = meta['lora_base']
  write_peft(dst, cfg, lora, adapters, base_name=ref['run'])
  base = find_base(ref, Run(src).path)
  flags = ('' if ref['weights'] == 'ema' else ' --noema') + (
      ' --merge_lora' if base.meta(ref['step']).get('lora') else '')
  note = (f'the adapters are of {base.path} step {ref["step"]} (its {ref["weights"]}): '
          f'python -m hrmtext.convert --src {base.path} --dst BASE_HF{flags} exports that base')
  mngr = base.manager(create=False)
  latest = mngr.latest_step()
  mngr.close()
  if latest != ref['step']:
    note += f' once step {ref["step"]} is its latest (it is {latest})'
  return note
