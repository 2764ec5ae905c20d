"""Grain input pipeline: packed PrefixLM batches from a sampled training set, and held-out data.

Training: each epoch_<k> gets a fixed packing plan. One global row stream walks the epochs' rows,
shuffled per (pass, epoch), epoch after epoch, and wraps around after the last one. Global batch i
is stream rows [i * G, (i + 1) * G) for G rows per step; of those, data shard p of P loads the
p-th block of G / P rows. So batch i is a pure function of i, and the global batch order does not
depend on the number of processes: a run resumed on another process count continues it exactly.
The iterator's position is the train step (one batch per step): a resumed run starts there.
The sampled set may have its tokens in shards and live on object storage (layout.TokenShards):
its batches are those of the same set in one tokens.npy.
"""

import functools
import os
import sys

from etils import epath
import grain
import ml_collections
import numpy as np

from hrmtext.errors import UserError
from hrmtext.data import packing
from hrmtext.data.layout import (METADATA_FILE, Index, SampledSet, heldout_dir, load_source,
                                 tokenized_sources)
from hrmtext.data.sources import read_rows

EVAL_WINDOW_ROWS = 1 << 20  # pack the whole held-out set as one window


def sampled_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """`data_cfg.dir` if it is a sampled set (e.g. made by the reference), else <dir>/sampled; a
  local folder or object storage (gs://...)."""
  if (epath.Path(data_cfg.dir) / METADATA_FILE).exists():
    return data_cfg.dir
  return str(epath.Path(data_cfg.dir) / 'sampled')


@functools.lru_cache(maxsize=8)
def _row_permutation(seed, epoch_pass, epoch, num_rows):
  return np.random.default_rng([seed, epoch_pass, epoch]).permutation(num_rows)


class TrainBatches:
  """Random-access source whose element i is this data shard's rows of global batch i (endless)."""

  def __init__(self, directory: str, *, seq_len: int, rows_per_process: int, process_index: int,
               process_count: int, seed: int, window_rows: int, max_segments: int,
               target_only: bool = True):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self._dir, self._seq_len, self._rows = directory, seq_len, rows_per_process
    self._process_index, self._process_count, self._seed = process_index, process_count, seed
    self._target_only, self._max_segments = target_only, max_segments
    sampled = SampledSet(directory)
    epochs = [sampled.epoch(k) for k in range(sampled.num_epochs)]
    # One index over all epochs (they share tokens.npy); plans hold ids into it.
    self._index = Index.concatenate(epochs)
    self.lengths = packing.packed_lengths(self._index, seq_len)
    self.plans, base = [], 0
    for index in epochs:
      plan = packing.pack(self.lengths[base:base + len(index.inst_len)], seq_len, window_rows,
                          max_segments)
      self.plans.append(plan._replace(order=plan.order + base))
      base += len(index.inst_len)
    self.epoch_end = np.cumsum([plan.num_rows for plan in self.plans])  # in the global stream
    if self.epoch_end[-1] == 0:
      raise UserError(f'{directory}: no trainable examples for seq_len {seq_len}')
    self._tokens = sampled.tokens()  # opened when first read (in each Grain worker: its own)

  def __len__(self) -> int:
    return sys.maxsize

  def batch_rows(self, index: int) -> list[np.ndarray]:
    """Example ids of this data shard's rows of global batch `index`."""
    first = (index * self._process_count + self._process_index) * self._rows
    epoch_pass, position = np.divmod(first + np.arange(self._rows), self.epoch_end[-1])
    epochs = np.searchsorted(self.epoch_end, position, side='right')
    rows = []
    for p, k, pos in zip(epoch_pass.tolist(), epochs.tolist(), position.tolist()):
      local = pos - (self.epoch_end[k - 1] if k else 0)
      permutation = _row_permutation(self._seed, p, k, self.plans[k].num_rows)
      rows.extend(self.plans[k].rows([permutation[local]]))
    return rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return packing.pack_rows(self._tokens, self._index, self.lengths, self.batch_rows(index),
                             self._seq_len, self._target_only, self._max_segments)

  def __repr__(self):
    return (f'TrainBatches({self._dir}, rows={self._rows}, seq_len={self._seq_len}, '
            f'process {self._process_index}/{self._process_count})')


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, rows_per_process: int, seq_len: int,
                        process_index: int, process_count: int, seed: int,
                        start: int = 0) -> grain.DatasetIterator:
  """Endless iterator of this process's packed batches, dicts of int32 [rows_per_process, seq_len],
  from global batch `start` on (a resumed run passes its step)."""
  source = TrainBatches(sampled_dir(data_cfg), seq_len=seq_len, rows_per_process=rows_per_process,
                        process_index=process_index, process_count=process_count, seed=seed,
                        window_rows=data_cfg.pack_window_rows,
                        max_segments=data_cfg.max_segments_per_row,
                        target_only=data_cfg.target_only)
  dataset = grain.MapDataset.source(source)[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=data_cfg.worker_buffer_size))
  if data_cfg.worker_count > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_cfg.worker_count,
                                     per_worker_buffer_size=data_cfg.worker_buffer_size))
  return iter(dataset)


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, rows: int,
                      seq_len: int) -> dict[str, list[dict[str, np.ndarray]]]:
  """Held-out task -> packed batches [rows, seq_len] covering each of its examples once.

  Deterministic. Each task is packed on its own rows, so its loss and accuracy can be summed
  apart from the others'. Empty when the data has no held-out split (e.g. a sampled set made by
  the reference pipeline).
  """
  root = heldout_dir(data_cfg.dir, 'tokenized')
  if not os.path.isdir(root):
    return {}
  batches = {}
  for task, directory in tokenized_sources(root).items():
    tokens, index = load_source(directory)
    if not len(index.resp_len):
      continue
    lengths = packing.packed_lengths(index, seq_len)
    plan = packing.pack(lengths, seq_len, EVAL_WINDOW_ROWS, data_cfg.max_segments_per_row)
    plan = plan.padded(rows)
    batches[task] = [
        packing.pack_rows(tokens, index, lengths, plan.rows(range(start, start + rows)), seq_len,
                          max_segments=data_cfg.max_segments_per_row)
        for start in range(0, plan.num_rows, rows)
    ]
  return batches


def heldout_examples(data_cfg: ml_collections.ConfigDict) -> list[dict]:
  """Raw held-out rows (task, instruction, response, condition, ...) for generation evals."""
  root = heldout_dir(data_cfg.dir, 'raw')
  if not os.path.isdir(root):
    return []
  examples = []
  for name in sorted(os.listdir(root)):
    if name.endswith('.jsonl'):
      examples.extend(
          dict(row, task=row.get('task', name[:-len('.jsonl')]))
          for row in read_rows(os.path.join(root, name)))
  return examples
