r"""Prepares training data: raw rows -> tokenizer -> tokenized sources -> sampled epochs.

  python -m hrmtext.prepare --output runs/data/builtin             # built-in corpus, all defaults
  python -m hrmtext.prepare --output DIR --inputs a.jsonl,b.parquet --tokenizer TOK_DIR
  python -m hrmtext.prepare --output DIR --config=experiments/tiny_cpu.py   # uses its config.data

Inputs are JSONL/Parquet rows {"instruction", "response", "condition"} (condition defaults to
'direct'); the built-in reasoning_gym corpus is used when no --inputs are given. Layout of DIR:
  raw/{train,heldout}/<task>.jsonl   built-in rows (held-out rows carry "task" and "answer")
  tokenizer/                         trained sentencepiece model + tokenizer_info.json
  tokenized/{train,heldout}/<name>/  reference tokenized layout, one folder per source file
  sampled/                           reference sampled training set (what training reads)
Re-running skips finished outputs; every output is written to a temporary name and renamed. A run
into a fresh DIR that stops on bad input (a malformed row, no example left) removes what it made.
The summary counts the examples dropped (too long, response too short, malformed) by reason.
"""

import collections
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys

from absl import flags
import numpy as np
from tqdm import tqdm

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.data import layout, mixture, packing
from hrmtext.data.sources import read_rows, source_name, write_jsonl
from hrmtext.data.tokenizer import Tokenizer, train_tokenizer
from hrmtext.files import atomic_open, check_writable

_DATA_CONFIG = os.path.join(os.path.dirname(__file__), 'data', 'config.py')
_CHUNK_ROWS = 1024

_CONFIG = cli.define_config_file(
    'config', _DATA_CONFIG,
    'Data config file (hrmtext/data/config.py) or an experiment config whose '
    '`data` field is used. Override fields with e.g. --config.seq_len=512.')
_OUTPUT = flags.DEFINE_string('output',
    None, 'Prepared root to write (default: the config\'s dir).')
_INPUTS = flags.DEFINE_list('inputs',
    [], 'Training JSONL/Parquet files; each is one source of the mixture.')
_HELDOUT_INPUTS = flags.DEFINE_list('heldout_inputs',
    [], 'Held-out JSONL/Parquet files (for evaluation only).')
_BUILTIN = flags.DEFINE_bool('builtin',
    None, 'Include the built-in corpus (default: only without --inputs).')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, 'Existing tokenizer: tokenizer_info.json or its folder '
    '(sentencepiece model or HF tokenizer.json). Default: train one.')
_TOKENIZED = flags.DEFINE_string(
    'tokenized', None, 'Existing tokenized root (reference layout) to sample from '
    'instead of tokenizing --inputs.')
_SKIP_BAD_ROWS = flags.DEFINE_bool('skip_bad_rows',
    False, 'Skip and count malformed rows instead of stopping.')
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Tokenization processes.')


def _data_config():
  cfg = _CONFIG.value
  return cfg.data if 'data' in cfg else cfg


def _settings(cfg) -> dict:
  settings = dict(seq_len=cfg.seq_len, epochs=cfg.epochs, seed=cfg.seed,
                  tokenizer=cfg.tokenizer.to_dict(), builtin=cfg.builtin.to_dict(),
                  mixture=cfg.mixture.to_dict(), inputs=_INPUTS.value,
                  heldout_inputs=_HELDOUT_INPUTS.value, use_builtin=_BUILTIN.value,
                  tokenizer_path=_TOKENIZER.value, tokenized=_TOKENIZED.value)
  return json.loads(json.dumps(settings))  # tuples -> lists, as read back


def _check_settings(path, settings) -> bool:
  """Refuses to mix outputs of different settings in one root (re-runs must be no-ops); whether
  the root has settings already."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    if json.load(f) != settings:
      raise UserError(f'{os.path.dirname(path)} was prepared with other settings ({path}); use a '
                      'new --output or delete it')
  return True


@contextlib.contextmanager
def _undone_on_user_error(out):
  """What the block creates in `out` is removed when it fails on a user error (a bad row, no
  examples left): a fresh root's settings must not outlive the run that could not use them,
  nor its half-made outputs. An interrupted run keeps them, to resume."""
  before = set(os.listdir(out)) if os.path.isdir(out) else None
  try:
    yield
  except cli.USER_ERRORS:
    made = [out] if before is None else [os.path.join(out, name)
                                         for name in set(os.listdir(out)) - before]
    for path in made:
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      elif os.path.lexists(path):
        os.remove(path)
    raise


def _copy_heldout_inputs(raw_heldout):
  """User held-out files become raw/heldout/<name>.jsonl (rows tagged with their task)."""
  for path in _HELDOUT_INPUTS.value:
    name = source_name(path)
    target = os.path.join(raw_heldout, f'{name}.jsonl')
    if not os.path.exists(target):
      write_jsonl(target, (dict(row, task=row.get('task', name)) for row in read_rows(path)))


def _get_tokenizer(out, cfg, train_files):
  directory = os.path.join(out, 'tokenizer')
  if not os.path.exists(os.path.join(directory, 'tokenizer_info.json')):
    if _TOKENIZER.value or _TOKENIZED.value:
      Tokenizer.load(_TOKENIZER.value or _TOKENIZED.value).save_info(directory)
    else:
      per_file = math.ceil(cfg.tokenizer.train_rows / max(1, len(train_files)))
      rows = (row for path in train_files.values()
              for row in itertools.islice(read_rows(path, _SKIP_BAD_ROWS.value), per_file))
      texts = (text for row in rows for text in (row['instruction'], row['response']))
      print(f'training a {cfg.tokenizer.vocab_size}-token tokenizer ...', file=sys.stderr)
      train_tokenizer(texts, directory, cfg.tokenizer.vocab_size, cfg.tokenizer.conditions)
  return Tokenizer.load(directory)


_worker_tokenizer = None


def _init_worker(tokenizer_dir):
  global _worker_tokenizer
  _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_chunk(rows):
  """(tokens, inst_len, resp_len) of rows given as (instruction, response, condition)."""
  tokens, inst_len, resp_len = [], [], []
  for instruction, response, condition in rows:
    inst = _worker_tokenizer.encode_instruction(instruction, condition)
    resp = _worker_tokenizer.encode_response(response)
    tokens += inst + resp
    inst_len.append(len(inst))
    resp_len.append(len(resp))
  return np.array(tokens, np.uint32), inst_len, resp_len


def _tokenize(jobs, tokenizer_dir, conditions, bad_rows):
  """Tokenizes (source file, output folder) jobs into the reference tokenized layout."""
  with contextlib.ExitStack() as stack:
    if _WORKERS.value > 1:
      pool_map = stack.enter_context(
          multiprocessing.get_context('spawn').Pool(_WORKERS.value, _init_worker,
                                                    (tokenizer_dir,))).imap
    else:
      _init_worker(tokenizer_dir)
      pool_map = map
    for path, directory in jobs:
      rows = ((r['instruction'], r['response'], r['condition'])
              for r in read_rows(path, _SKIP_BAD_ROWS.value, bad_rows, conditions))
      chunks = iter(lambda: list(itertools.islice(rows, _CHUNK_ROWS)), [])
      parts = [(np.zeros(0, np.uint32), [], [])]
      with tqdm(desc=f'tokenizing {os.path.basename(directory)}', unit=' rows') as progress:
        for part in pool_map(_encode_chunk, chunks):
          parts.append(part)
          progress.update(len(part[1]))
      tokens, inst_len, resp_len = zip(*parts)
      layout.write_tokenized_source(directory, np.concatenate(tokens), np.concatenate(inst_len),
                                    np.concatenate(resp_len))


def _named(paths):
  files = {}
  for path in paths:
    name = source_name(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file')
    if name in files:
      raise UserError(f'two input files named {name!r}: {files[name]} and {path}')
    files[name] = path
  return files


def _jsonl_files(directory):
  return {
      source_name(n): os.path.join(directory, n) for n in sorted(os.listdir(directory))
      if n.endswith('.jsonl')
  }


def prepare(out, cfg, counts: collections.Counter):
  """Runs every unfinished step; returns the sampled set's folder. `counts` gets the examples
  dropped by reason (`mixture.eligible`'s, 'malformed' with --skip_bad_rows) when it samples.
  A fresh root gets its settings once the inputs are checked; a failure on a user error removes
  what the run made."""
  settings, settings_path = _settings(cfg), os.path.join(out, 'prepare_settings.json')
  if _check_settings(settings_path, settings):
    return _prepare(out, cfg, counts)
  with _undone_on_user_error(out):
    _named(_INPUTS.value)  # each file exists, has a known suffix and its own name
    _named(_HELDOUT_INPUTS.value)
    if _TOKENIZER.value or _TOKENIZED.value:
      Tokenizer.load(_TOKENIZER.value or _TOKENIZED.value)
    os.makedirs(out, exist_ok=True)
    with atomic_open(settings_path) as f:
      json.dump(settings, f, indent=2)
    return _prepare(out, cfg, counts)


def _prepare(out, cfg, counts):
  use_builtin = _BUILTIN.value if _BUILTIN.value is not None else not (_INPUTS.value or
                                                                     _TOKENIZED.value)
  raw_heldout = layout.heldout_dir(out, 'raw')
  os.makedirs(raw_heldout, exist_ok=True)
  train_files = _named(_INPUTS.value)
  if use_builtin:
    from hrmtext.data import builtin  # pylint: disable=g-import-not-at-top  (slow reasoning_gym)
    builtin.write_builtin_corpus(os.path.join(out, 'raw'), cfg.builtin, cfg.seed)
    train_files = {**_jsonl_files(os.path.join(out, 'raw', 'train')), **train_files}
  _copy_heldout_inputs(raw_heldout)
  if not (train_files or _TOKENIZED.value):
    raise UserError('no training data: give --inputs or --tokenized, or use the built-in corpus')

  tokenizer = _get_tokenizer(out, cfg, train_files)
  tokenized_train = os.path.join(out, 'tokenized', 'train')
  jobs = []
  for files, root in ((train_files, tokenized_train), (_jsonl_files(raw_heldout),
                                                       layout.heldout_dir(out, 'tokenized'))):
    tokenizer.save_info(root)
    jobs += [(path, os.path.join(root, name)) for name, path in files.items()
             if not os.path.exists(os.path.join(root, name))]
  bad_rows = []
  if jobs:
    _tokenize(jobs, os.path.join(out, 'tokenizer'), set(tokenizer.condition_ids), bad_rows)
  for message in bad_rows:
    print(f'skipped: {message}', file=sys.stderr)

  sampled = os.path.join(out, 'sampled')
  if not os.path.exists(sampled):
    sources = layout.tokenized_sources(tokenized_train)
    if _TOKENIZED.value:
      sources.update(layout.tokenized_sources(_TOKENIZED.value))
    print(f'sampling {cfg.epochs} epochs from {len(sources)} sources ...', file=sys.stderr)
    mixture.write_mixture(sources, sampled, cfg, tokenizer, counts)
  if bad_rows:
    counts['malformed (--skip_bad_rows)'] += len(bad_rows)
  return sampled


def summary(sampled, seq_len, window_rows, max_segments):
  data = layout.SampledSet(sampled)
  for k in range(data.num_epochs):
    index = data.epoch(k)
    lengths = packing.packed_lengths(index, seq_len)
    plan = packing.pack(lengths, seq_len, window_rows, max_segments)
    print(
        f'epoch {k}: {len(lengths)} examples, {int(lengths.sum())} tokens, {plan.num_rows} rows of '
        f'{seq_len}, packing efficiency {packing.packing_efficiency(plan, lengths, seq_len):.4f}')


def main(_):
  cfg = _data_config()
  if cfg.seq_len < 1 or cfg.epochs < 1:
    raise UserError(f'config seq_len={cfg.seq_len}, epochs={cfg.epochs}: both must be >= 1')
  out = _OUTPUT.value or cfg.dir
  check_writable(out, folder=True)
  counts = collections.Counter()
  sampled = prepare(out, cfg, counts)
  summary(sampled, cfg.seq_len, cfg.pack_window_rows, cfg.max_segments_per_row)
  if any(counts.values()):
    print(f'examples: {mixture.describe_dropped(counts)}')
  print(f'prepared {out}; train with data.dir={out}')


if __name__ == '__main__':
  cli.run(main)
