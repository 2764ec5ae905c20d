"""The parallel steps of `hrmtext.prepare`, as tasks that any engine runs (hrmtext.data.engine).

A task is a function of its arguments alone (a dict of JSON values). It writes its output under a
temporary name, renames it when complete and returns a small JSON summary; a task whose output
exists returns that summary without doing the work again. So every engine, on any number of
workers, writes the same bytes, and a rerun after an interruption (kill -9 included) redoes only
the unfinished tasks. Memory: a piece of a shard at a time, except `epoch` (mixture.py).

  tokenize     an input shard -> a tokenized shard (reference layout) with stats.json
  count        a tokenized shard -> its usable rows, and the rows dropped and cut, by reason
  token_shard  consecutive tokenized shards -> one token shard of the sampled set (its dtype)
  epoch        every tokenized shard -> epoch_<k>/ of the sampled set
"""

import contextlib
import functools
import itertools
import json
import os

import numpy as np

from hrmtext.data import layout, mixture, sources
from hrmtext.data.tokenizer import Tokenizer
from hrmtext.files import atomic_path

STATS_FILE = 'stats.json'  # in each tokenized shard made here: what the summary counts
_ROWS_PER_WRITE = 4096


@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str) -> Tokenizer:
  return Tokenizer.load(directory)


def tokenize(task: dict) -> dict:
  """Tokenizes shard `task['shard']` of input file `task['path']` into folder `task['out']`.

  Returns rows, tokens, records (lines or Parquet rows read) and malformed: [record within the
  shard, message] of each row skipped with `skip_bad_rows` (without it, a bad row raises
  BadRowError naming its file and line).
  """
  out = task['out']
  if os.path.isdir(out):
    return tokenized_stats(out)
  tokenizer = _tokenizer(task['tokenizer'])
  conditions = set(tokenizer.condition_ids)
  path, shard = task['path'], tuple(task['shard'])
  stats = dict(rows=0, tokens=0, records=0, malformed=[])
  with layout.temp_dir(out) as tmp, contextlib.ExitStack() as files:
    writers = {name: files.enter_context(layout.NpyWriter(
        os.path.join(tmp, f'{name}.npy'), np.uint32 if name == 'tokens' else np.int64))
               for name in ('tokens', *layout.Index._fields)}
    records = sources.shard_records(path, shard)
    for chunk in iter(lambda: list(itertools.islice(records, _ROWS_PER_WRITE)), []):
      tokens, inst_len, resp_len = [], [], []
      for record, row in chunk:
        stats['records'] = record + 1
        if row is None:
          continue
        try:
          row = sources.check_row(row, conditions)
        except sources.BadRowError as e:
          if not task['skip_bad_rows']:
            place = sources.where(path, sources.records_before(path, shard) + record)
            raise sources.BadRowError(f'{place}: {e}') from None
          stats['malformed'].append([record, str(e)])
          continue
        instruction = tokenizer.encode_instruction(row['instruction'], row['condition'])
        response = tokenizer.encode_response(row['response'])
        tokens += instruction
        tokens += response
        inst_len.append(len(instruction))
        resp_len.append(len(response))
      index = layout.Index.from_lengths(inst_len, resp_len)
      for name, values in zip(layout.Index._fields, index):
        writers[name].append(values + (stats['tokens'] if 'start' in name else 0))
      writers['tokens'].append(np.array(tokens, np.uint32))
      stats['rows'] += len(inst_len)
      stats['tokens'] += len(tokens)
    files.close()  # the .npy headers get their lengths
    with open(os.path.join(tmp, STATS_FILE), 'w') as f:
      json.dump(stats, f)
  return stats


def tokenized_stats(directory: str) -> dict:
  """A finished shard's stats (a source tokenized elsewhere, e.g. by the reference, has none)."""
  path = os.path.join(directory, STATS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return dict(rows=layout.npy_length(os.path.join(directory, 'resp_len.npy')),
              tokens=layout.npy_length(os.path.join(directory, 'tokens.npy')), records=None,
              malformed=[])


def count(task: dict) -> dict:
  """`mixture.count_usable` of one tokenized shard (reads only its lengths)."""
  return mixture.count_usable(mixture.Shard(task['directory'], 0, 0), task['rule'],
                              task['context'], task['min_resp_length'])


def token_shard(task: dict) -> dict:
  """Writes `task['out']`: the tokens of `task['parts']` ([tokens.npy, length] of tokenized
  shards) back to back, as `task['dtype']`."""
  out = task['out']
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_path(out) as tmp, layout.NpyWriter(tmp, task['dtype']) as writer:
      for path, _ in task['parts']:
        for values in layout.npy_pieces(path):
          writer.append(values)
  return dict(tokens=sum(length for _, length in task['parts']))


def epoch(task: dict) -> dict:
  """Writes epoch_<task['epoch']>/ of the sampled set `task['out']`; returns its rows and tokens."""
  sources_ = [mixture.Source(s['name'], s['rule'], [mixture.Shard(*shard) for shard in s['shards']])
              for s in task['sources']]
  k, directory = task['epoch'], os.path.join(task['out'], f'epoch_{task["epoch"]}')
  if os.path.isdir(directory):
    lengths = zip(layout.npy_pieces(f'{directory}/inst_len.npy'),
                  layout.npy_pieces(f'{directory}/resp_len.npy'))
    return dict(rows=layout.npy_length(f'{directory}/resp_len.npy'),
                tokens=sum(int(i.sum() + r.sum()) for i, r in lengths))
  order = mixture.epoch_order(sources_, k, task['seed'], task['context'], task['min_resp_length'])
  totals = []
  layout.write_epoch(task['out'], k, mixture.epoch_fields(sources_, order, task['context'],
                                                          totals))
  return dict(rows=len(order), tokens=sum(totals))
