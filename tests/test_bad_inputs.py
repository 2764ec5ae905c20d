"""Every entry point x every bad input: one `error:` line on stderr, exit status 1 or 2, nothing
half-written (no output, no temporary file, a user's own `X.tmp` / `X.partial` untouched). Every
rule of the training config's `hrmtext.training.config.validate` is also checked in-process."""
import importlib.util
import json
import os
import pathlib
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hrmtext import hf
from hrmtext.errors import UserError
from hrmtext.data import layout
from hrmtext.data.tokenizer import train_tokenizer
from hrmtext.model import ModelConfig, build_model
from hrmtext import checkpoint
from hrmtext.run import Run
from hrmtext.training.config import base_config, experiment_config, validate
from tests.test_infer_cli import CORPUS, cli

# Progress lines that long work prints on stderr before it can find the bad input (prepare's).
PROGRESS = ('training a ', 'tokenizing ', 'sampling ')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tokenizer, a random-weight checkpoint (hidden 32) with its HF export, and bad inputs."""
  root = tmp_path_factory.mktemp('bad_inputs')
  tok = train_tokenizer(CORPUS * 3, str(root / 'tok'), vocab_size=300,
                        conditions=('direct', 'cot', 'synth'))
  cfg = ModelConfig(vocab_size=512, hidden_size=32, num_heads=2, head_dim=16,
                    intermediate_size=64, layers_per_stack=1)
  params = nn.unbox(build_model(cfg).init(jax.random.key(0)))
  mngr = Run(str(root / 'run')).manager(async_save=False)
  checkpoint.save(mngr, 1, meta={'model': cfg.to_dict(), 'tokenizer': str(root / 'tok'),
                                 'config': {'data': {'seq_len': 64}}}, params=params)
  mngr.close()
  hf.hrmtext_to_hf(str(root / 'run'), str(root / 'hf'))
  _hf_dirs(root)
  _bad_files(root, tok)
  readonly = root / 'readonly'  # root writes anywhere but where the kernel refuses: /sys
  readonly.mkdir(mode=0o555)
  if os.access(readonly, os.W_OK):
    readonly = pathlib.Path('/sys')
  return root, readonly


def _hf_dirs(root):
  """HF directories convert must refuse: an unknown tensor, another model, bad config.json."""
  shutil.copytree(root / 'hf', root / 'hf_extra')
  tensors = load_file(root / 'hf_extra' / 'model.safetensors')
  save_file(dict(tensors, **{'model.extra_norm.weight': np.ones(32, np.float32)}),
            root / 'hf_extra' / 'model.safetensors')
  for name, config in (('hf_llama', '{"model_type": "llama"}'), ('hf_no_config', None),
                       ('hf_bad_config', '{"model_type": "hrm_te')):
    (root / name).mkdir()
    shutil.copy(root / 'hf' / 'model.safetensors', root / name)
    if config is not None:
      (root / name / 'config.json').write_text(config)


def _bad_files(root, tok):
  rows = lambda path, rows: path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  rows(root / 'ok.jsonl', [{'instruction': 'What is 3 + 4?', 'response': '7'}])
  (root / 'latin1.jsonl').write_bytes(b'{"instruction": "caf\xe9", "response": "7"}\n')
  (root / 'latin1_gsm8k.jsonl').write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
  (root / 'corrupt.parquet').write_bytes(b'PAR1 not really parquet')
  (root / 'empty.jsonl').write_text('')
  rows(root / 'long_row.jsonl', [{'instruction': 'hi', 'response': 'seven ' * 2000}])
  # Nothing survives seq_len 16: empty responses (just the end-of-answer) and long rows.
  rows(root / 'all_dropped.jsonl', [{'instruction': 'q', 'response': ''}] * 3 + [
      {'instruction': 'What is 3 + 4? ' * 10, 'response': '7'}] * 2)
  (root / 'syntax_error.py').write_text('def get_config(:\n  pass\n')
  source = root / 'truncated_npy' / 'src'  # a tokenized root (reference layout), cut short
  layout.write_tokenized_source(str(source), np.arange(40) % 250 + 5, [5, 5], [15, 15])
  tok.save_info(str(root / 'truncated_npy'))
  data = (source / 'tokens.npy').read_bytes()
  (source / 'tokens.npy').write_bytes(data[:-50])


# (verb, arguments, what the error line says). In arguments {root} is the fixture folder,
# {out} the output path (must not exist afterwards), {readonly} a folder nobody can write into.
CKPT = ('--checkpoint', '{root}/run')
ROWS = {
    # Item 7: outputs checked before any work.
    'generate: unwritable --output': ('generate', (*CKPT, '--input', '{root}/ok.jsonl', '--output',
                                                   '{readonly}/out.jsonl'), 'cannot write'),
    'generate: --output under a file': ('generate', (*CKPT, '--input', '{root}/ok.jsonl',
                                                     '--output', '{root}/ok.jsonl/out.jsonl'),
                                        'no folder'),
    'score: unwritable --output': ('score', (*CKPT, '--input', '{root}/ok.jsonl', '--output',
                                             '{readonly}/out.jsonl'), 'cannot write'),
    'evaluate: unwritable --output_dir': ('evaluate', (*CKPT, '--output_dir', '{readonly}/out'),
                                          'cannot write'),
    'evaluate: --output_dir is a file': ('evaluate', (*CKPT, '--output_dir', '{root}/ok.jsonl'),
                                         'it is a file'),
    'prepare: unwritable --output': ('prepare', ('--output', '{readonly}/out', '--inputs',
                                                 '{root}/ok.jsonl'), 'cannot write'),
    'convert: unwritable --dst': ('convert', ('--src', '{root}/hf', '--dst', '{readonly}/out'),
                                  'cannot write'),
    # Item 9: convert drops nothing and says what a directory is not.
    'convert: unknown tensor': ('convert', ('--src', '{root}/hf_extra', '--dst', '{out}'),
                                'model.extra_norm.weight'),
    'convert: model_type llama': ('convert', ('--src', '{root}/hf_llama', '--dst', '{out}'),
                                  "model_type 'llama' is not an hrm_text model"),
    'convert: no config.json': ('convert', ('--src', '{root}/hf_no_config', '--dst', '{out}'),
                                'no config.json'),
    'convert: malformed config.json': ('convert', ('--src', '{root}/hf_bad_config', '--dst',
                                                   '{out}'), 'config.json: not valid JSON'),
    # Item 11: one line, not a traceback.
    'generate: non-UTF-8 --input': ('generate', (*CKPT, '--input', '{root}/latin1.jsonl',
                                                 '--output', '{out}'), 'latin1.jsonl:1: not UTF-8'),
    'generate: corrupt Parquet': ('generate', (*CKPT, '--input', '{root}/corrupt.parquet',
                                               '--output', '{out}'), 'not a readable Parquet'),
    'score: non-UTF-8 --input': ('score', (*CKPT, '--input', '{root}/latin1.jsonl', '--output',
                                           '{out}'), 'latin1.jsonl:1: not UTF-8'),
    'score: a row longer than --max_len': ('score', (*CKPT, '--input', '{root}/long_row.jsonl',
                                                     '--output', '{out}'), 'raise --max_len'),
    'evaluate: non-UTF-8 benchmark': ('evaluate', (*CKPT, '--benchmarks',
                                                   'gsm8k={root}/latin1_gsm8k.jsonl',
                                                   '--output_dir', '{out}'), 'not UTF-8'),
    'evaluate: empty benchmark': ('evaluate', (*CKPT, '--benchmarks', 'gsm8k={root}/empty.jsonl',
                                               '--output_dir', '{out}'), 'no examples'),
    'prepare: non-UTF-8 --inputs': ('prepare', ('--output', '{out}', '--inputs',
                                                '{root}/latin1.jsonl', '--tokenizer', '{root}/tok',
                                                '--workers', '1'), 'latin1.jsonl:1: not UTF-8'),
    'prepare: corrupt Parquet': ('prepare', ('--output', '{out}', '--inputs',
                                             '{root}/corrupt.parquet', '--tokenizer', '{root}/tok',
                                             '--workers', '1'), 'not a readable Parquet'),
    'prepare: truncated .npy': ('prepare', ('--output', '{out}', '--tokenized',
                                            '{root}/truncated_npy'), 'tokens.npy: not a complete'),
    'prepare: config file syntax error': ('prepare', ('--output', '{out}', '--config',
                                                      '{root}/syntax_error.py'),
                                          'syntax_error.py:1:'),
    'train: config file syntax error': ('train', ('--workdir', '{out}', '--config',
                                                  '{root}/syntax_error.py'), 'syntax_error.py:1:'),
    'bench_decode: --batch x': ('bench_decode', ('--batch', 'x'), '--batch x'),
    # Item 12: values accepted silently before.
    'generate: --eoa_id < 0': ('generate', (*CKPT, '--prompt', 'hi', '--eoa_id', '-1'), '--eoa_id'),
    'evaluate: --eoa_id < 0': ('evaluate', (*CKPT, '--eoa_id', '-1', '--output_dir', '{out}'),
                               '--eoa_id'),
    'prepare: 0 examples left': ('prepare', ('--output', '{out}', '--inputs',
                                             '{root}/all_dropped.jsonl', '--tokenizer',
                                             '{root}/tok', '--workers', '1',
                                             '--config.seq_len=16'),
                                 'no examples to sample: of the 5 examples in 1 sources, 5 '
                                 'dropped (2 longer than'),
    'prepare: seq_len 0': ('prepare', ('--output', '{out}', '--config.seq_len=0'), 'seq_len=0'),
    'prepare: --workers 0': ('prepare', ('--output', '{out}', '--inputs', '{root}/ok.jsonl',
                                         '--workers', '0'), '--workers=0: must be >= 1'),
    'prepare: --input_shard_mb 0': ('prepare', ('--output', '{out}', '--inputs', '{root}/ok.jsonl',
                                                '--input_shard_mb', '0'), '--input_shard_mb'),
    'prepare: --sampled_shard_tokens 0': ('prepare', ('--output', '{out}', '--inputs',
                                                      '{root}/ok.jsonl', '--sampled_shard_tokens',
                                                      '0'), '--sampled_shard_tokens'),
    # Item 1: keep=0 would delete every checkpoint, a resumed run's too (here the fixture run's).
    'train: checkpoint.keep=0': ('train', ('--workdir', '{root}/run', '--config.checkpoint.keep=0'),
                                 'checkpoint.keep=0: must be >= 1'),
    'train: train.epochs=0': ('train', ('--workdir', '{out}', '--config.train.steps=0',
                                        '--config.train.epochs=0'),
                              'train.epochs=0'),
    'train: train.steps<0': ('train', ('--workdir', '{out}', '--config.train.steps=-1'),
                             'train.steps=-1'),
    'train: unknown lora target': ('train', ('--workdir', '{out}', '--config.lora.rank=4',
                                             '--config.lora.targets=attn.x'),
                                   "lora.targets: unknown 'attn.x'"),
}
if importlib.util.find_spec('apache_beam') is None:  # the optional engine, asked for without it
  ROWS['prepare: --engine beam without Beam'] = ('prepare', (
      '--output', '{out}', '--inputs', '{root}/ok.jsonl', '--engine', 'beam'), 'hrmtext[beam]')


def listing(folder) -> dict:
  """Every path under `folder` with its bytes (files) or None (folders)."""
  return {str(p): (p.read_bytes() if p.is_file() else None)
          for p in sorted(pathlib.Path(folder).rglob('*'))}


@pytest.mark.parametrize('name', ROWS)
def test_bad_input_is_one_line_and_writes_nothing(name, files, tmp_path):
  verb, args, fragment = ROWS[name]
  root, readonly = files
  out = tmp_path / 'out'
  for own in ('out.tmp', 'out.partial', 'out.jsonl.tmp'):  # a user's files, not the run's
    (tmp_path / own).write_text('mine')
  before, inputs = listing(tmp_path), listing(root)
  result = cli(verb, *(a.format(root=root, out=out, readonly=readonly) for a in args))
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not line.lstrip('\r').startswith(PROGRESS)]
  assert result.returncode in (1, 2), result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert fragment in lines[0], lines[0]
  assert listing(tmp_path) == before  # no output, no temporary file, the user's files as they were
  assert listing(root) == inputs
  assert not [n for n in os.listdir(readonly) if n.startswith('.hrmtext')]


def test_failed_prepare_leaves_no_settings_and_a_corrected_rerun_works(files, tmp_path):
  """A failed run into a folder that exists leaves it as it was; the rerun with the corrected
  input (another file) is not refused, and its summary counts the examples it dropped."""
  root, _ = files
  out = tmp_path / 'out'
  out.mkdir()
  result = cli('prepare', '--output', out, '--inputs', root / 'latin1.jsonl', '--tokenizer',
               root / 'tok', '--workers', 1)
  assert result.returncode == 1 and os.listdir(out) == [], result.stderr[-3000:]
  fixed = tmp_path / 'fixed.jsonl'
  fixed.write_text((root / 'ok.jsonl').read_text() + json.dumps(
      {'instruction': 'q', 'response': ''}) + '\n')
  result = cli('prepare', '--output', out, '--inputs', fixed, '--tokenizer', root / 'tok',
               '--workers', 1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'examples: 1 dropped (1 with a response under min_resp_length' in result.stdout
  assert (out / 'prepare_settings.json').exists() and (out / 'sampled').is_dir()


def test_convert_round_trips_lose_nothing(files, tmp_path):
  """HF -> hrmtext -> HF gives the same tensors, bit for bit; hrmtext -> HF -> hrmtext the same
  params (an unknown tensor is refused, as the table shows, instead of dropped)."""
  root, _ = files
  hf.hf_to_hrmtext(str(root / 'hf'), str(tmp_path / 'ours'))
  hf.hrmtext_to_hf(str(tmp_path / 'ours'), str(tmp_path / 'back'))
  a = load_file(root / 'hf' / 'model.safetensors')
  b = load_file(tmp_path / 'back' / 'model.safetensors')
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  _, want, _ = Run(str(root / 'run')).load_weights()
  _, got, _ = Run(str(tmp_path / 'ours')).load_weights()
  assert hf.leaf_names(got) == hf.leaf_names(want)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(UserError, match='no place for: model.extra'):
    hf.hf_to_hrmtext(str(root / 'hf_extra'), str(tmp_path / 'extra'))


# Items 12 and 11 for training: the Trainer calls validate() first (the table above runs a few
# through `python -m hrmtext.train`); here every rule of validate() itself.
BAD_CONFIG = {
    'checkpoint.keep': 0,  # would delete every checkpoint, a resumed run's old ones too
    'checkpoint.every_steps': 0,
    'checkpoint.every_minutes': -1.0,
    'eval.every_steps': 0,
    'train.steps': -1,
    'train.lr': -1e-3,
    'data.seq_len': 0,
    'train.global_batch_tokens': 100,  # less than one row of data.seq_len 512
    'log_every_steps': 0,
    'train.micro_batches': -1,
    'train.ema_decay': 1.5,
    'train.horizon.bp_max': 1,  # below bp_min
}


@pytest.mark.parametrize('field', BAD_CONFIG)
def test_validate_names_the_bad_field(field):
  config = base_config()
  config.update_from_flattened_dict({field: BAD_CONFIG[field]})
  with pytest.raises(UserError, match=re.escape(f'config {field}={BAD_CONFIG[field]!r}: must be ')):
    validate(config)


def test_validate_epochs_only_without_steps_and_passes_every_experiment():
  config = base_config()
  config.train.epochs = 0
  with pytest.raises(UserError, match='train.epochs=0'):
    validate(config)
  config.train.steps = 10  # epochs unused
  validate(config)
  experiments = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'experiments')
  for name, arg in (('tiny_cpu', ()), ('hrm', ('XL',)), ('sft', ('XL',)), ('ablation', ())):
    validate(experiment_config(os.path.join(experiments, f'{name}.py'), *arg))
