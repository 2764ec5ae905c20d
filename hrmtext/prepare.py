r"""Prepares training data: raw rows -> tokenizer -> tokenized sources -> sampled epochs.

  python -m hrmtext.prepare --output runs/data/builtin             # built-in corpus, all defaults
  python -m hrmtext.prepare --output DIR --inputs a.jsonl,b.parquet --tokenizer TOK_DIR
  python -m hrmtext.prepare --output DIR --config=experiments/tiny_cpu.py   # uses its config.data
  python -m hrmtext.prepare --output DIR --inputs ... --engine=beam \
      --beam_options='--runner=FlinkRunner --flink_master=HOST:8081'        # a cluster

Inputs are JSONL/Parquet rows {"instruction", "response", "condition"} (condition defaults to
'direct'); the built-in reasoning_gym corpus is used when no --inputs are given. Layout of DIR:
  raw/{train,heldout}/<task>.jsonl   built-in rows (held-out rows carry "task" and "answer")
  tokenizer/                         trained sentencepiece model + tokenizer_info.json
  tokenized/{train,heldout}/<name>/  reference tokenized layout, one folder per source file (a
                                     large one: part-<k>-of-<n>/ folders, each in that layout)
  sampled/                           reference sampled training set (what training reads; a large
                                     one has token shards, read as one)
Memory does not grow with the corpus beyond ~16 bytes per row: inputs are tokenized shard by
shard (--input_shard_mb each, on --workers processes or Apache Beam) and everything is written in
pieces. The output bytes depend on the inputs and settings only, not on the engine or workers.
Re-running skips finished outputs, down to single shards after an interruption; every output is
written to a temporary name and renamed. A run into a fresh DIR that stops on bad input (a
malformed row, no example left) removes what it made. The summary counts the examples kept, and
those dropped (too long, response too short, malformed) by reason.
"""

import collections
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time

from absl import flags
import numpy as np
from tqdm import tqdm

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.data import engine as engines
from hrmtext.data import layout, mixture, packing, stages
from hrmtext.data.sources import input_shards, read_rows, source_name, where, write_jsonl
from hrmtext.data.tokenizer import Tokenizer, train_tokenizer
from hrmtext.files import atomic_open, check_writable

_DATA_CONFIG = os.path.join(os.path.dirname(__file__), 'data', 'config.py')

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
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1,
    'Processes that tokenize and sample (--engine=local; 1: no pool).')
_ENGINE = flags.DEFINE_enum('engine', 'local', ['local', 'beam'],
    'local: --workers processes on this machine; beam: an Apache Beam pipeline per step '
    '(pip install "hrmtext[beam]"), on the runner --beam_options names. The same bytes either way.')
_BEAM_OPTIONS = flags.DEFINE_string('beam_options', '--runner=DirectRunner',
    'Beam pipeline options as on Beam\'s command line (--engine=beam). DIR must be reachable '
    'by every Beam worker (a shared filesystem).')
_INPUT_SHARD_MB = flags.DEFINE_float('input_shard_mb', 8,
    'Input megabytes per tokenizing task; each writes one shard of its tokenized source.')
_SAMPLED_SHARD_TOKENS = flags.DEFINE_integer('sampled_shard_tokens', 1 << 30,
    'Tokens per token shard of the sampled set, about (whole tokenized shards each); a set of '
    'one shard has the reference\'s single tokens.npy.')
# Settings added after roots were first written: a root without them was made with these.
_LATER_SETTINGS = dict(input_shard_mb=8.0, sampled_shard_tokens=1 << 30)


def _data_config():
  cfg = _CONFIG.value
  return cfg.data if 'data' in cfg else cfg


def _settings(cfg) -> dict:
  settings = dict(seq_len=cfg.seq_len, epochs=cfg.epochs, seed=cfg.seed,
                  tokenizer=cfg.tokenizer.to_dict(), builtin=cfg.builtin.to_dict(),
                  mixture=cfg.mixture.to_dict(), inputs=_INPUTS.value,
                  heldout_inputs=_HELDOUT_INPUTS.value, use_builtin=_BUILTIN.value,
                  tokenizer_path=_TOKENIZER.value, tokenized=_TOKENIZED.value,
                  input_shard_mb=_INPUT_SHARD_MB.value,
                  sampled_shard_tokens=_SAMPLED_SHARD_TOKENS.value)
  return json.loads(json.dumps(settings))  # tuples -> lists, as read back


def _check_settings(path, settings) -> bool:
  """Refuses to mix outputs of different settings in one root (re-runs must be no-ops); whether
  the root has settings already."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    if {**_LATER_SETTINGS, **json.load(f)} != settings:
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


def _progress(desc, unit, total=None):
  """A progress bar on stderr that shows tokens/s next to `unit`/s."""
  bar = tqdm(desc=desc, unit=unit, total=total, unit_scale=True)
  start, tokens = time.perf_counter(), [0]

  def update(rows, new_tokens):
    tokens[0] += new_tokens
    bar.update(rows)
    bar.set_postfix_str(f'{tokens[0] / max(1e-9, time.perf_counter() - start) / 1e6:.2f}M tokens/s',
                        refresh=False)

  return bar, update


def _tokenize(engine, jobs, tokenizer_dir) -> list[str]:
  """Tokenizes (source file, output folder) jobs into the reference tokenized layout, shard by
  shard; returns the messages of the rows skipped (--skip_bad_rows)."""
  tasks, files = [], []
  for path, directory in jobs:
    shards = input_shards(path, max(1, int(_INPUT_SHARD_MB.value * 1e6)))
    layout.remove_stale_temporaries(os.path.dirname(directory))
    layout.remove_stale_temporaries(directory)
    files.append((path, len(tasks), len(shards)))
    tasks += [dict(path=path, shard=list(shard), out=layout.shard_dir(directory, k, len(shards)),
                   tokenizer=tokenizer_dir, skip_bad_rows=_SKIP_BAD_ROWS.value)
              for k, shard in enumerate(shards)]
  done = {i for i, task in enumerate(tasks) if os.path.isdir(task['out'])}
  todo = [i for i in range(len(tasks)) if i not in done]
  stats = [stages.tokenized_stats(tasks[i]['out']) if i in done else None
           for i in range(len(tasks))]
  bar, update = _progress(
      f'tokenizing {len(jobs)} files ({len(todo)} of {len(tasks)} shards to do)', ' rows')
  with bar:
    results = engine.map(stages.tokenize, [tasks[i] for i in todo],
                         lambda result: update(result['rows'], result['tokens']))
  for i, result in zip(todo, results):
    stats[i] = result
  skipped = []
  for path, first, count in files:
    before = 0  # records of the file in earlier shards: a bad row's line (or Parquet row)
    for result in stats[first:first + count]:
      skipped += [f'{where(path, before + record)}: {message}'
                  for record, message in result['malformed']]
      before += result['records']
  return skipped


def _token_shards(token_files, shard_tokens):
  """Consecutive tokenized shards' (tokens.npy, length), grouped into token shards of about
  `shard_tokens` (whole tokenized shards: an example's tokens lie in one token shard)."""
  groups, size = [[]], 0
  for path, length in token_files:
    if groups[-1] and size + length > shard_tokens:
      groups.append([])
      size = 0
    groups[-1].append((path, length))
    size += length
  return groups


def _sample(engine, source_dirs, sampled, cfg, tokenizer, counts):
  """Writes the sampled set: token shards, then epochs, then metadata.json. A UserError, with
  nothing written, when no example is left."""
  context, min_resp_length = cfg.seq_len + 1, cfg.mixture.min_resp_length
  sources, token_files = mixture.plan_sources(source_dirs, cfg.mixture.rules)
  shards = [(source, shard) for source in sources for shard in source.shards]
  usable = collections.Counter()
  for (source, _), result in zip(shards, engine.map(stages.count, [
      dict(directory=shard.directory, rule=source.rule, context=context,
           min_resp_length=min_resp_length) for source, shard in shards])):
    usable[source.name] += result['usable']
    counts.update(result['counts'])
  if not sum(mixture.rows_per_epoch(usable[s.name], s.rule) for s in sources if usable[s.name]):
    raise mixture.no_examples_error(sum(shard.rows for _, shard in shards), len(sources), counts)
  counts[mixture.KEPT] += sum(usable.values())

  os.makedirs(sampled, exist_ok=True)
  layout.remove_stale_temporaries(sampled)
  groups = _token_shards(token_files, _SAMPLED_SHARD_TOKENS.value)
  names = [layout.token_shard_name(j, len(groups)) for j in range(len(groups))]
  dtype = np.dtype(layout.token_dtype(tokenizer.vocab_size)).name
  tasks = [dict(out=os.path.join(sampled, name), parts=group, dtype=dtype)
           for name, group in zip(names, groups)
           if not os.path.exists(os.path.join(sampled, name))]
  bar, update = _progress(f'sampling {len(tasks)} token shards', ' shards', len(tasks))
  with bar:
    engine.map(stages.token_shard, tasks, lambda result: update(1, result['tokens']))
  plan = [dict(name=s.name, rule=s.rule, shards=[list(shard) for shard in s.shards])
          for s in sources]
  bar, update = _progress(f'sampling {cfg.epochs} epochs', ' epochs', cfg.epochs)
  with bar:
    epochs = engine.map(stages.epoch, [
        dict(out=sampled, epoch=k, sources=plan, seed=cfg.seed, context=context,
             min_resp_length=min_resp_length) for k in range(cfg.epochs)
    ], lambda result: update(1, result['tokens']))
  layout.write_metadata(sampled, [(name, sum(length for _, length in group))
                                  for name, group in zip(names, groups)],
                        tokenizer.info_relative_to(sampled), context, epochs[0]['tokens'])


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


def prepare(out, cfg, counts: collections.Counter, engine):
  """Runs every unfinished step on `engine` (hrmtext.data.engine); returns the sampled set's
  folder. `counts` gets the examples dropped by reason (`mixture.usable`'s, 'malformed' with
  --skip_bad_rows) when it samples. A fresh root gets its settings once the inputs are checked; a
  failure on a user error removes what the run made."""
  settings, settings_path = _settings(cfg), os.path.join(out, 'prepare_settings.json')
  if _check_settings(settings_path, settings):
    return _prepare(out, cfg, counts, engine)
  with _undone_on_user_error(out):
    _named(_INPUTS.value)  # each file exists, has a known suffix and its own name
    _named(_HELDOUT_INPUTS.value)
    if _TOKENIZER.value or _TOKENIZED.value:
      Tokenizer.load(_TOKENIZER.value or _TOKENIZED.value)
    os.makedirs(out, exist_ok=True)
    with atomic_open(settings_path) as f:
      json.dump(settings, f, indent=2)
    return _prepare(out, cfg, counts, engine)


def _prepare(out, cfg, counts, engine):
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
             if not layout.source_shards(os.path.join(root, name))]
  bad_rows = _tokenize(engine, jobs, os.path.join(out, 'tokenizer')) if jobs else []
  for message in bad_rows:
    print(f'skipped: {message}', file=sys.stderr)

  sampled = os.path.join(out, 'sampled')
  if not os.path.exists(os.path.join(sampled, layout.METADATA_FILE)):
    sources = layout.tokenized_sources(tokenized_train)
    if _TOKENIZED.value:
      sources.update(layout.tokenized_sources(_TOKENIZED.value))
    print(f'sampling {cfg.epochs} epochs from {len(sources)} sources ...', file=sys.stderr)
    _sample(engine, sources, sampled, cfg, tokenizer, counts)
  if bad_rows:
    counts['malformed (--skip_bad_rows)'] += len(bad_rows)
  return sampled


def summary(sampled, seq_len, window_rows, max_segments):
  """Prints each epoch's examples, tokens and packed rows (read in pieces: ~4 bytes a row)."""
  data = layout.SampledSet(sampled)
  for k in range(data.num_epochs):
    directory = data.epoch_dir(k)
    lengths, begin = np.empty(layout.npy_length(directory / 'resp_len.npy'), np.int32), 0
    for inst_len, resp_len in zip(layout.npy_pieces(directory / 'inst_len.npy'),
                                  layout.npy_pieces(directory / 'resp_len.npy')):
      piece = packing.packed_lengths(layout.Index(None, inst_len, None, resp_len), seq_len)
      lengths[begin:begin + len(piece)] = piece
      begin += len(piece)
    rows = sum(len(counts) for _, counts in packing.pack_windows(lengths, seq_len, window_rows,
                                                                  max_segments))
    tokens = int(lengths.sum(dtype=np.int64))
    print(f'epoch {k}: {len(lengths)} examples, {tokens} tokens, {rows} rows of {seq_len}, '
          f'packing efficiency {tokens / max(1, rows * seq_len):.4f}')


def _engine(out):
  if _ENGINE.value == 'beam':
    return engines.BeamEngine(_BEAM_OPTIONS.value, scratch=out)
  return engines.LocalEngine(_WORKERS.value)


def main(_):
  cfg = _data_config()
  if cfg.seq_len < 1 or cfg.epochs < 1:
    raise UserError(f'config seq_len={cfg.seq_len}, epochs={cfg.epochs}: both must be >= 1')
  if _INPUT_SHARD_MB.value <= 0 or _SAMPLED_SHARD_TOKENS.value < 1:
    raise UserError('--input_shard_mb must be > 0 and --sampled_shard_tokens >= 1')
  out = _OUTPUT.value or cfg.dir
  check_writable(out, folder=True)
  counts = collections.Counter()
  with _engine(out) as engine:
    sampled = prepare(out, cfg, counts, engine)
  summary(sampled, cfg.seq_len, cfg.pack_window_rows, cfg.max_segments_per_row)
  if any(counts.values()):
    print(f'examples: {mixture.describe_dropped(counts)}')
  print(f'prepared {out}; train with data.dir={out}')


if __name__ == '__main__':
  cli.run(main)
