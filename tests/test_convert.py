"""HF <-> hrmtext conversion: exact round trip, config.json read exactly as transformers reads it
(legacy files, the reference's own export), both weight layouts, CLI direction detection and
errors. The hub-release journey (tokenizer, generate, score) is in test_release.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import hf_oracle


def convert(src, dst, *flags):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}  # no accelerator plugin start-up noise
  return subprocess.run([sys.executable, '-m', 'hrmtext.convert', f'--src={src}', f'--dst={dst}',
                         *flags], capture_output=True, text=True, env=env)


@hf_oracle.needs_hf
def test_round_trip_is_identical(tmp_path):
  # Settings the reference training code lacks: vocab 300 (not a multiple of 256), L_bp_cycles.
  model = hf_oracle.make_hf_model(vocab=300, L_bp_cycles=(1, 3))
  model.model.z_L_init.data.zero_()  # as released
  hf_dir, ours, back = tmp_path / 'hf', tmp_path / 'ours', tmp_path / 'back'
  model.save_pretrained(hf_dir)
  (hf_dir / 'generation_config.json').write_text('{"fake": "generation config"}')
  for src, dst in ((hf_dir, ours), (ours, back)):
    result = convert(src, dst)
    assert result.returncode == 0, result.stderr
  assert (ours / 'checkpoints' / '0').is_dir()
  a, b = load_file(hf_dir / 'model.safetensors'), load_file(back / 'model.safetensors')
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  assert json.loads((hf_dir / 'config.json').read_text()) == json.loads(
      (back / 'config.json').read_text())
  assert (back / 'generation_config.json').read_text() == '{"fake": "generation config"}'


def test_cli_errors_are_one_line(tmp_path):
  result = convert(tmp_path / 'missing', tmp_path / 'out')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'not a directory' in result.stderr
  (tmp_path / 'out').mkdir()
  result = convert(tmp_path, tmp_path / 'out')
  assert result.returncode != 0 and 'already exists' in result.stderr
  result = convert(tmp_path / 'out', tmp_path / 'new')  # neither HF nor hrmtext
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'new') and not os.path.exists(tmp_path / 'new.partial')


# config.json files as found in the wild: minimal legacy (transformers' defaults fill the rest), a
# legacy RoPE field, an explicit per-stack count, and what the reference's convert_to_hf writes.
CONFIGS = {
    'minimal legacy': dict(model_type='hrm_text', vocab_size=300, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           head_dim=32),
    'legacy rope_theta': dict(model_type='hrm_text', vocab_size=256, hidden_size=64,
                              num_attention_heads=4, head_dim=16, num_hidden_layers=3,
                              rope_theta=5e5, H_cycles=3, L_cycles=2, initializer_range=0.1),
    'saved by transformers': dict(model_type='hrm_text', hidden_size=64, num_attention_heads=2,
                                  head_dim=32, num_layers_per_stack=1, num_hidden_layers=8,
                                  L_bp_cycles=[1, 3], embedding_scale=3.5,
                                  rope_parameters={'rope_type': 'default', 'rope_theta': 1e4}),
}


@hf_oracle.needs_hf
@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_is_read_as_transformers_reads_it(name):
  from hrmtext import hf
  ours = hf.resolve_hf_config(CONFIGS[name])
  theirs = hf_oracle.transformers.HrmTextConfig(**CONFIGS[name])
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_attention_heads', 'head_dim',
              'num_hidden_layers', 'num_layers_per_stack', 'H_cycles', 'L_cycles', 'L_bp_cycles',
              'embedding_scale', 'rope_parameters', 'rms_norm_eps', 'initializer_range',
              'hidden_act', 'tie_word_embeddings', 'attention_bias', 'mlp_bias', 'prefix_lm',
              'max_position_embeddings'):
    assert ours[key] == getattr(theirs, key), key
  cfg = hf.config_from_hf(CONFIGS[name])
  assert (cfg.layers_per_stack, cfg.scale, cfg.rope_theta) == (
      theirs.num_layers_per_stack, theirs.embedding_scale, theirs.rope_parameters['rope_theta'])


def reference_export(model, path):
  """A directory as the reference's conversion/convert_to_hf.py writes it: the file-layout
  tensors (z_L_init bfloat16, as the reference keeps it) and its own config fields."""
  import torch
  from safetensors.torch import save_file
  path.mkdir()
  model.save_pretrained(path)  # the file layout (fused tensors)
  tensors = load_file(path / 'model.safetensors')
  tensors = {k: torch.from_numpy(v) for k, v in tensors.items()}
  tensors['model.z_L_init'] = tensors['model.z_L_init'].to(torch.bfloat16)
  save_file(tensors, path / 'model.safetensors')
  c = model.config
  (path / 'config.json').write_text(json.dumps({
      'model_type': 'hrm_text', 'architectures': ['HrmTextForCausalLM'],
      'vocab_size': c.vocab_size, 'hidden_size': c.hidden_size,
      'intermediate_size': c.intermediate_size,
      'num_hidden_layers': 2 * c.num_layers_per_stack,  # n_layers, before half_layers splits it
      'num_attention_heads': c.num_attention_heads, 'num_key_value_heads': c.num_attention_heads,
      'head_dim': c.head_dim, 'H_cycles': c.H_cycles, 'L_cycles': c.L_cycles,
      'L_bp_steps': [0, 3], 'max_position_embeddings': 4097, 'rms_norm_eps': 1e-6,
      'rope_theta': 10000.0, 'tie_word_embeddings': False,
      'initializer_range': c.initializer_range, 'embedding_scale': c.embedding_scale,
      'prefix_lm': True, 'pad_token_id': 0, 'bos_token_id': 1, 'eos_token_id': 2}, indent=2))


@hf_oracle.needs_hf
def test_reference_export_imports_and_exports_unchanged(tmp_path):
  from hrmtext import hf
  from hrmtext.run import Run
  model = hf_oracle.make_hf_model(vocab=300, layers=2)
  reference_export(model, tmp_path / 'ref')
  hf.hf_to_hrmtext(str(tmp_path / 'ref'), str(tmp_path / 'ours'))
  cfg, params, meta = Run(str(tmp_path / 'ours')).load_weights()
  want_cfg, want = hf_oracle.to_hrmtext(model)
  assert cfg.layers_per_stack == 2
  # The export's own horizon, as a run's train.horizon to fine-tune with.
  assert meta['horizon'] == {'schedule': 'per_cycle', 'L_bp_cycles': [0, 3]}
  assert cfg.scale == want_cfg.scale and cfg.mlp_size == want_cfg.mlp_size
  z = want['z_L_init']
  want['z_L_init'] = np.asarray(hf_oracle.torch.from_numpy(z).to(hf_oracle.torch.bfloat16).float())
  for a, b in zip(hf_oracle.jax_leaves(params), hf_oracle.jax_leaves(want)):
    np.testing.assert_array_equal(a, b)
  hf.hrmtext_to_hf(str(tmp_path / 'ours'), str(tmp_path / 'back'))
  a, b = load_file(tmp_path / 'ref' / 'model.safetensors'), load_file(tmp_path / 'back' / 'model.safetensors')
  assert sorted(a) == sorted(b) and b['model.z_L_init'].dtype == a['model.z_L_init'].dtype
  for name in a:
    assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name
  assert json.loads((tmp_path / 'back' / 'config.json').read_text()) == json.loads(
      (tmp_path / 'ref' / 'config.json').read_text())


@hf_oracle.needs_hf
def test_split_layout_and_inconsistent_directories(tmp_path):
  """transformers' in-memory names load as the file layout does; a config that disagrees with
  the weights, or missing tensors, are one-line errors."""
  from safetensors.torch import save_file
  from hrmtext import hf
  from hrmtext.run import Run
  model = hf_oracle.make_hf_model(vocab=300, layers=2)
  model.save_pretrained(tmp_path / 'fused')
  split = tmp_path / 'split'
  split.mkdir()
  (split / 'config.json').write_text((tmp_path / 'fused' / 'config.json').read_text())
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, split / 'model.safetensors')
  for name in ('fused', 'split'):
    hf.hf_to_hrmtext(str(tmp_path / name), str(tmp_path / f'{name}_ours'))
  _, fused, _ = Run(str(tmp_path / 'fused_ours')).load_weights()
  _, from_split, _ = Run(str(tmp_path / 'split_ours')).load_weights()
  for a, b in zip(hf_oracle.jax_leaves(fused), hf_oracle.jax_leaves(from_split)):
    np.testing.assert_array_equal(a, b)

  config = json.loads((tmp_path / 'fused' / 'config.json').read_text())
  (split / 'config.json').write_text(json.dumps(dict(config, num_layers_per_stack=3)))
  result = convert(split, tmp_path / 'bad')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'gives 3 blocks per stack' in result.stderr and 'weights hold 2' in result.stderr
  tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
  save_file(tensors, split / 'model.safetensors')
  (split / 'config.json').write_text(json.dumps(config))
  result = convert(split, tmp_path / 'bad')
  assert result.returncode != 0 and 'the weights have no lm_head.weight' in result.stderr
  assert not (tmp_path / 'bad').exists()


def test_trained_run_exports_its_tokenizer_and_reimports_it(tmp_path):
  """A run trained with an hrmtext sentencepiece tokenizer: the export carries the model file,
  tokenizer_info.json and BOQ / EOA as bos / eos; importing that directory gives them back."""
  import jax
  from hrmtext import hf
  from hrmtext.data.tokenizer import Tokenizer, train_tokenizer
  from hrmtext.model import ModelConfig
  from hrmtext import checkpoint
  from hrmtext.run import Run
  texts = ['What is 3 + 4? It is 7.', 'The capital of France is Paris.'] * 50
  tok = train_tokenizer(texts, str(tmp_path / 'data' / 'tokenizer'), 320, ['direct', 'cot'])
  cfg = ModelConfig(vocab_size=384, hidden_size=32, num_heads=2, head_dim=16, layers_per_stack=1)
  params = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(np.float32),
                        checkpoint.abstract_params(cfg))
  mngr = Run(str(tmp_path / 'run')).manager(async_save=False)
  checkpoint.save(mngr, 1, meta={'model': cfg.to_dict(), 'tokenizer': str(tmp_path / 'data' / 'tokenizer')},
                  params=params)
  mngr.close()
  hf.hrmtext_to_hf(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id']) == (tok.boq, tok.eoa)
  assert hf._hf_shape(hf.config_from_hf(config, cfg.layers_per_stack)) == hf._hf_shape(cfg)
  hf.hf_to_hrmtext(str(tmp_path / 'hf'), str(tmp_path / 'again'))
  again = Tokenizer.load(str(tmp_path / 'again' / 'tokenizer'))
  assert again.info['condition_mapping'] == tok.info['condition_mapping']
  assert again.encode_instruction('What is 3 + 4?', 'cot') == tok.encode_instruction('What is 3 + 4?', 'cot')
  _, back, _ = Run(str(tmp_path / 'again')).load_weights()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
