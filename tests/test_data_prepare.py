"""`python -m hrmtext.prepare` end to end: built-in corpus, user files, idempotence, bad input."""

import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from hrmtext.data import builtin, engine, layout, pipeline
from hrmtext.data.config import data_config
from hrmtext.data.tokenizer import Tokenizer
from tests.data_fixtures import unpack_batch

SMALL_CONFIG = '''
from hrmtext.data.config import data_config

def get_config():
  c = data_config()
  for task in c.builtin.tasks.values():
    task.count = 40
  c.builtin.heldout_per_task = 4
  c.tokenizer.vocab_size = 400
  c.epochs = 2
  return c
'''


def _prepare(*args):
  return subprocess.run([sys.executable, '-m', 'hrmtext.prepare', *map(str, args)],
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def builtin_root(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('builtin')
  (tmp / 'small.py').write_text(SMALL_CONFIG)
  out = tmp / 'out'
  result = _prepare('--output', out, '--config', tmp / 'small.py')
  assert result.returncode == 0, result.stderr
  return tmp, out, result


def test_builtin_corpus_layout(builtin_root):
  _, out, result = builtin_root
  tasks = sorted(data_config().builtin.tasks)
  assert sorted(os.listdir(out / 'raw' / 'train')) == [f'{t}.jsonl' for t in tasks]
  for task in tasks:
    train = _read_jsonl(out / 'raw' / 'train' / f'{task}.jsonl')
    heldout = _read_jsonl(out / 'raw' / 'heldout' / f'{task}.jsonl')
    assert len(train) == 40 and 0 < len(heldout) <= 4
    assert all(row['task'] == task and row['answer'] for row in heldout)
    assert not {r['instruction'] for r in train} & {r['instruction'] for r in heldout}
    assert len({r['instruction'] for r in heldout}) == len(heldout)
  assert sorted(layout.tokenized_sources(out / 'tokenized' / 'train')) == tasks
  sampled = layout.SampledSet(str(out / 'sampled'))
  assert sampled.num_epochs == 2 and sampled.max_seq_len == data_config().seq_len + 1
  assert len(sampled.epoch(0).inst_len) == 40 * len(tasks)
  assert Tokenizer.load(str(out / 'sampled')).vocab_size <= 400
  assert 'packing efficiency' in result.stdout


def test_rerun_does_no_work_and_other_settings_are_refused(builtin_root):
  tmp, out, _ = builtin_root
  stamp = os.stat(out / 'sampled' / 'tokens.npy').st_mtime_ns
  again = _prepare('--output', out, '--config', tmp / 'small.py')
  assert again.returncode == 0, again.stderr
  assert 'tokenizing' not in again.stderr and 'sampling' not in again.stderr
  assert os.stat(out / 'sampled' / 'tokens.npy').st_mtime_ns == stamp
  other = _prepare('--output', out, '--config', tmp / 'small.py', '--config.seed=1')
  assert other.returncode == 1 and 'other settings' in other.stderr


def test_sampling_an_existing_tokenized_root_is_deterministic(builtin_root, tmp_path):
  tmp, out, _ = builtin_root
  result = _prepare('--output', tmp_path / 'out', '--tokenized', out / 'tokenized' / 'train',
                    '--config', tmp / 'small.py')
  assert result.returncode == 0, result.stderr
  mine, again = layout.SampledSet(str(out / 'sampled')), layout.SampledSet(
      str(tmp_path / 'out' / 'sampled'))
  np.testing.assert_array_equal(mine.tokens(), again.tokens())
  for k in range(mine.num_epochs):
    for got, want in zip(again.epoch(k), mine.epoch(k)):
      np.testing.assert_array_equal(got, want)
  assert Tokenizer.load(str(tmp_path / 'out' / 'sampled')).path == Tokenizer.load(
      str(out / 'sampled')).path


def test_eval_batches_and_heldout_examples(builtin_root):
  """Each held-out task's batches hold exactly its examples, once each (responses cut to fit)."""
  _, out, _ = builtin_root
  cfg = data_config()
  cfg.dir = str(out)
  examples = pipeline.heldout_examples(cfg)
  batches = pipeline.make_eval_batches(cfg, rows=4, seq_len=cfg.seq_len)
  assert sorted(batches) == sorted({r['task'] for r in examples})
  tokenizer = Tokenizer.load(str(out / 'sampled'))
  for task, task_batches in batches.items():
    assert all(b['inputs'].shape == (4, cfg.seq_len) for b in task_batches)
    packed = collections.Counter(e for b in task_batches for e in unpack_batch(b))
    expected = collections.Counter()
    for r in examples:
      if r['task'] == task:
        instruction = tuple(tokenizer.encode_instruction(r['instruction'], r['condition']))
        response = tokenizer.encode_response(r['response'])[:cfg.seq_len + 1 - len(instruction)]
        expected[instruction, tuple(response)] += 1
    assert packed == expected, task
  again = pipeline.make_eval_batches(cfg, rows=4, seq_len=cfg.seq_len)
  assert {task: [b['inputs'].tolist() for b in bs] for task, bs in again.items()} == \
      {task: [b['inputs'].tolist() for b in bs] for task, bs in batches.items()}  # deterministic


def test_builtin_is_deterministic_and_gsm_heldout_uses_unseen_templates():
  task_cfg = data_config().builtin.tasks.gsm_symbolic
  task_cfg.count = 30
  heldout_templates = builtin.heldout_gsm_templates(8, seed=0)
  train = builtin.train_rows('gsm_symbolic', task_cfg, 0, heldout_templates)
  assert train == builtin.train_rows('gsm_symbolic', task_cfg, 0, heldout_templates)
  assert train != builtin.train_rows('gsm_symbolic', task_cfg, 1, heldout_templates)
  for row in train:  # the worked solution ends with its final answer
    assert row['condition'] == 'cot' and float(row['response'].rsplit('#### ', 1)[1]) == float(
        row['answer'])
  heldout = builtin.heldout_rows('gsm_symbolic', task_cfg, 0, heldout_templates,
                                 {r['instruction'] for r in train}, count=10)

  # Regenerate the items with reasoning_gym to see which template each row came from.
  def templates(seed, size, rows):
    source = reasoning_gym.create_dataset('gsm_symbolic', seed=seed, size=size)
    template_of = {source[i]['question']: source.task_indices[i] for i in range(size)}
    return {template_of[r['instruction']] for r in rows}

  assert len(heldout) == 10
  assert templates(builtin.HELDOUT_SEED_OFFSET, 400, heldout) <= heldout_templates
  assert not templates(0, 4 * 30 + 64, train) & heldout_templates


@pytest.fixture(scope='module')
def tokenizer_dir(builtin_root):
  return builtin_root[1] / 'tokenizer'


def test_user_files_with_existing_tokenizer(tmp_path, tokenizer_dir):
  rows = [
      dict(instruction=f'q{i}', response=f'answer {i}',
           condition=['direct', 'cot', 'direct,cot'][i % 3]) for i in range(30)
  ]
  with open(tmp_path / 'mine.jsonl', 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
    f.write(json.dumps(dict(instruction='no condition', response='defaults to direct')) + '\n')
  pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / 'extra.parquet')
  with open(tmp_path / 'dev.jsonl', 'w') as f:
    f.write(json.dumps(dict(instruction='dev q', response='dev a')) + '\n')
  out = tmp_path / 'out'
  result = _prepare('--output', out, '--inputs', f'{tmp_path}/mine.jsonl,{tmp_path}/extra.parquet',
                    '--heldout_inputs', tmp_path / 'dev.jsonl', '--tokenizer', tokenizer_dir,
                    '--workers', 2)
  assert result.returncode == 0, result.stderr
  assert not os.path.exists(out / 'raw' / 'train')  # no built-in corpus with --inputs
  tokenizer = Tokenizer.load(str(tokenizer_dir))
  source = out / 'tokenized' / 'train' / 'mine'
  tokens, index = layout.load_tokens(str(source)), layout.load_index(str(source))
  assert len(index.inst_len) == 31
  for i, row in enumerate(
      rows + [dict(instruction='no condition', response='defaults to direct', condition='direct')]):
    inst = tokens[index.inst_start[i]:index.inst_start[i] + index.inst_len[i]].tolist()
    resp = tokens[index.resp_start[i]:index.resp_start[i] + index.resp_len[i]].tolist()
    assert inst == tokenizer.encode_instruction(row['instruction'], row['condition'])
    assert resp == tokenizer.encode_response(row['response'])
  assert len(layout.load_index(str(out / 'tokenized' / 'train' / 'extra')).inst_len) == 10
  assert len(layout.SampledSet(str(out / 'sampled')).epoch(0).inst_len) == 41
  assert _read_jsonl(out / 'raw' / 'heldout' / 'dev.jsonl')[0]['task'] == 'dev'


@pytest.mark.parametrize('bad_line,message', [
    ('{"instruction": "q", "response": ', 'invalid JSON'),
    ('{"instruction": "q"}', "field 'response'"),
    ('{"instruction": "q", "response": "a", "condition": "cot,bogus"}', 'unknown condition'),
    ('[1, 2]', 'expected a JSON object'),
])
def test_bad_row_names_file_and_line(tmp_path, tokenizer_dir, bad_line, message):
  path = tmp_path / 'data.jsonl'
  path.write_text('{"instruction": "q1", "response": "a1"}\n\n' + bad_line +
                  '\n{"instruction": "q2", "response": "a2"}\n')
  out = tmp_path / 'out'
  shards = ('--input_shard_mb', '0.00004')  # a shard per line: its number counts those before
  result = _prepare('--output', out, '--inputs', path, '--tokenizer', tokenizer_dir, '--workers', 1,
                    *shards)
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith(f'error: {path}:3: ') and message in error
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(out / 'tokenized' / 'train' / 'data') and not os.path.exists(
      out / 'sampled')

  skipped = _prepare('--output', tmp_path / 'out2', '--inputs', path, '--tokenizer', tokenizer_dir,
                     '--workers', 1, '--skip_bad_rows', *shards)
  assert skipped.returncode == 0, skipped.stderr
  assert f'skipped: {path}:3: ' in skipped.stderr
  assert len(layout.load_source(str(tmp_path / 'out2' / 'tokenized' / 'train' /
                                    'data'))[1].inst_len) == 2
  assert 'examples: 1 dropped (1 malformed (--skip_bad_rows)); 2 kept' in skipped.stdout


def test_missing_input_and_unsupported_suffix(tmp_path):
  missing = _prepare('--output', tmp_path / 'a', '--inputs', tmp_path / 'nope.jsonl')
  assert missing.returncode == 1 and 'no such file' in missing.stderr
  (tmp_path / 'rows.csv').write_text('x')
  csv = _prepare('--output', tmp_path / 'b', '--inputs', tmp_path / 'rows.csv')
  assert csv.returncode == 1 and 'unsupported input file' in csv.stderr


def _tree(folder) -> dict:
  """Every file under `folder` (relative path -> bytes)."""
  return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), 'rb').read()
          for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope='module')
def corpus(builtin_root, tmp_path_factory):
  """Built-in rows with a counter appended: 4,000 in JSONL, 1,000 in Parquet row groups."""
  tmp = tmp_path_factory.mktemp('corpus')
  raw = builtin_root[1] / 'raw' / 'train'
  rows = [row for name in sorted(os.listdir(raw)) for row in _read_jsonl(raw / name)]
  rows = [dict(row, instruction=f"{row['instruction']} #{i}")
          for i, row in zip(range(5000), itertools.cycle(rows))]
  with open(tmp / 'big.jsonl', 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows[:4000])
  pq.write_table(pa.Table.from_pylist(rows[4000:]), tmp / 'more.parquet', row_group_size=100)
  return f'{tmp}/big.jsonl,{tmp}/more.parquet'


SHARDED = ('--input_shard_mb', '0.1', '--sampled_shard_tokens', '30000')


@pytest.fixture(scope='module')
def sharded_root(corpus, tokenizer_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('sharded') / 'out'
  result = _prepare('--output', out, '--inputs', corpus, '--tokenizer', tokenizer_dir,
                    '--workers', 1, *SHARDED)
  assert result.returncode == 0, result.stderr
  return out


def test_sharded_outputs_are_the_same_bytes_on_any_number_of_workers(sharded_root, corpus,
                                                                     tokenizer_dir, tmp_path):
  parts = sorted(os.listdir(sharded_root / 'tokenized' / 'train' / 'big'))
  assert len(parts) > 3 and parts[0] == f'part-00000-of-{len(parts):05d}'
  assert len(os.listdir(sharded_root / 'tokenized' / 'train' / 'more')) > 1  # row groups
  metadata = layout.SampledSet(str(sharded_root / 'sampled')).metadata
  assert len(metadata['token_shards']) > 3
  result = _prepare('--output', tmp_path / 'out', '--inputs', corpus, '--tokenizer', tokenizer_dir,
                    '--workers', 2, *SHARDED)
  assert result.returncode == 0, result.stderr
  assert _tree(tmp_path / 'out') == _tree(sharded_root)
  assert re.search(r'tokenizing .* rows/s, [\d.]+M tokens/s', result.stderr)  # the progress
  assert re.search(r'examples: 0 dropped, \d+ cut to fit; \d+ kept', result.stdout)


def test_training_reads_a_sharded_set_as_the_one_file_set(sharded_root, corpus, tokenizer_dir,
                                                          tmp_path):
  result = _prepare('--output', tmp_path / 'out', '--inputs', corpus, '--tokenizer', tokenizer_dir,
                    '--workers', 2)  # default shard sizes: one tokens.npy (the reference layout)
  assert result.returncode == 0, result.stderr
  assert 'token_shards' not in layout.SampledSet(str(tmp_path / 'out' / 'sampled')).metadata
  cfg = data_config()
  sources = []
  for root in (tmp_path / 'out', sharded_root):
    cfg.dir = str(root)
    sources.append(pipeline.TrainBatches(pipeline.sampled_dir(cfg), seq_len=cfg.seq_len,
                                         rows_per_process=4, process_index=0, process_count=1,
                                         seed=0, window_rows=cfg.pack_window_rows,
                                         max_segments=cfg.max_segments_per_row))
  for i in range(0, int(sources[0].epoch_end[-1]) // 4 + 2, 7):
    want, got = sources[0][i], sources[1][i]
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f'{name} of batch {i}')


@pytest.mark.slow  # 14-70 s on 2 cores, idle to busy: Beam starts worker processes per step
def test_beam_direct_runner_writes_the_same_bytes(sharded_root, corpus, tokenizer_dir, tmp_path):
  pytest.importorskip('apache_beam', reason='Apache Beam is not installed (pip install '
                      '"hrmtext[beam]"): the Beam engine is an optional extra')
  # Tasks in Beam's own worker processes, as on a cluster (its in_memory mode uses threads).
  options = '--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2'
  result = _prepare('--output', tmp_path / 'out', '--inputs', corpus, '--tokenizer', tokenizer_dir,
                    '--engine', 'beam', '--beam_options', options, *SHARDED)
  assert result.returncode == 0, result.stderr
  assert _tree(tmp_path / 'out') == _tree(sharded_root)
  stale = tmp_path / 'out' / '.beam-killed.tmp'  # what a run killed mid-step leaves
  stale.mkdir()
  (stale / 'results-00000-of-00001').write_text('[0, true, {}]\n')
  engine.BeamEngine('--runner=DirectRunner', scratch=str(tmp_path / 'out'))
  assert not stale.exists() and _tree(tmp_path / 'out') == _tree(sharded_root)
  bad = _prepare('--output', tmp_path / 'bad', '--inputs', corpus, '--engine', 'beam',
                 '--beam_options', '--runner=NoSuchRunner')
  assert bad.returncode == 1 and not (tmp_path / 'bad').exists()
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: --beam_options='--runner=NoSuchRunner': Unexpected pipeline runner: NoSuchRunner")


def test_an_interrupted_run_resumes_to_the_same_bytes_without_redoing_shards(
    sharded_root, corpus, tokenizer_dir, tmp_path):
  """kill -9 once the first shards are written; the rerun keeps them (same inode and mtime)."""
  out = tmp_path / 'out'
  args = ['--output', out, '--inputs', corpus, '--tokenizer', tokenizer_dir, '--workers', 1,
          '--input_shard_mb', '0.01', *SHARDED[2:]]  # smaller shards: many to interrupt
  process = subprocess.Popen([sys.executable, '-m', 'hrmtext.prepare', *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
  source = out / 'tokenized' / 'train' / 'big'
  deadline = time.time() + 60
  while not (source.is_dir() and [n for n in os.listdir(source) if n.startswith('part-')]):
    assert process.poll() is None and time.time() < deadline, 'no shard written'
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done = {n: os.stat(source / n) for n in os.listdir(source) if n.startswith('part-')}
  total = int(next(iter(done)).rsplit('-', 1)[1])
  assert 0 < len(done) < total, 'killed too late to interrupt'
  again = _prepare(*args)
  assert again.returncode == 0, again.stderr
  todo, shards = map(int, re.search(r'\((\d+) of (\d+) shards to do\)', again.stderr).groups())
  assert todo == shards - len(done)  # none of the finished ones again
  for name, stat in done.items():
    now = os.stat(source / name)
    assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
  fresh = _prepare(*args[:1], tmp_path / 'fresh', *args[2:])
  assert fresh.returncode == 0, fresh.stderr
  assert _tree(out) == _tree(tmp_path / 'fresh')
