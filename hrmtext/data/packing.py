"""PrefixLM packing: examples -> fixed-length rows (the packed batch format of the trainer).

A packing plan is fixed per epoch (first-fit-decreasing over windows of the epoch's example order),
so any row can be built on its own: the pipeline is random-access and its state is one index.
Each row holds whole examples; an example longer than the row is cut to it.
"""

from typing import NamedTuple

import numpy as np

from hrmtext.data.layout import Index

IGNORE_LABEL = -100
FIELDS = ('inputs', 'labels', 'positions', 'segment_ids', 'is_instruction')


class Plan(NamedTuple):
  """Rows of example ids: row r holds `order[row_splits[r]:row_splits[r + 1]]`."""
  order: np.ndarray
  row_splits: np.ndarray

  @property
  def num_rows(self) -> int:
    return len(self.row_splits) - 1

  def rows(self, row_ids) -> list[np.ndarray]:
    return [self.order[self.row_splits[r]:self.row_splits[r + 1]] for r in row_ids]

  def padded(self, multiple: int) -> 'Plan':
    """Appends empty rows so that the row count divides by `multiple` (even data shards)."""
    empty_rows = np.full(-self.num_rows % multiple, self.row_splits[-1])
    return Plan(self.order, np.concatenate([self.row_splits, empty_rows]))


def packed_lengths(index: Index, seq_len: int) -> np.ndarray:
  """Tokens each example takes in a row: instruction + response - 1, cut to seq_len.

  0 marks examples that cannot be trained on in rows of seq_len (no response token, or an
  instruction so long that no response token would get a label); packing skips them.
  """
  length = np.minimum(index.inst_len + index.resp_len - 1, seq_len)
  usable = (index.resp_len >= 1) & (index.inst_len >= 1) & (index.inst_len <= seq_len)
  return np.where(usable, length, 0).astype(np.int64)


def _first_fit_decreasing(ids, lengths, seq_len):
  """Bins (as lists of ids) of total length <= seq_len, longest examples placed first."""
  ids = ids[np.argsort(-lengths[ids], kind='stable')]
  free = np.empty(len(ids), np.int64)  # remaining room per open bin; at most one bin per example
  bin_of = np.empty(len(ids), np.int64)
  num_bins = 0
  for i, length in enumerate(lengths[ids].tolist()):
    fits = free[:num_bins] >= length
    b = int(fits.argmax()) if num_bins and fits.any() else num_bins
    if b == num_bins:
      free[b] = seq_len
      num_bins += 1
    free[b] -= length
    bin_of[i] = b
  order = np.argsort(bin_of, kind='stable')
  return ids[order], np.bincount(bin_of, minlength=num_bins)


def pack(lengths: np.ndarray, seq_len: int, window_rows: int) -> Plan:
  """Plans rows for examples in their given order, packing windows of ~window_rows rows each.

  Windows keep the epoch's shuffled order at a coarse grain while leaving first-fit-decreasing
  enough examples to fill rows almost completely.
  """
  ids = np.flatnonzero(lengths > 0)
  window = np.cumsum(lengths[ids]) // (window_rows * seq_len)
  bounds = np.flatnonzero(np.diff(window)) + 1
  orders, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for window_ids in np.split(ids, bounds):
    if len(window_ids):
      order, count = _first_fit_decreasing(window_ids, lengths, seq_len)
      orders.append(order)
      counts.append(count)
  counts = np.concatenate(counts)
  return Plan(np.concatenate(orders), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def packing_efficiency(plan: Plan, lengths: np.ndarray, seq_len: int) -> float:
  """Non-padding tokens / all tokens of the planned rows."""
  return float(lengths[plan.order].sum() / max(1, plan.num_rows * seq_len))


def pack_rows(tokens: np.ndarray, index: Index, lengths: np.ndarray, rows: list[np.ndarray],
              seq_len: int, target_only: bool = True) -> dict[str, np.ndarray]:
  """Builds the packed batch [len(rows), seq_len] for rows given as arrays of example ids.

  Per example: inputs = instruction ++ response[:-1], labels = IGNORE * (len(instruction) - 1)
  ++ response, positions restart at 0, segment_ids count examples from 1 within the row. Without
  `target_only` (the reference data's option) the instruction is labelled too: labels =
  instruction[1:] ++ response, every input predicting the next token.
  """
  per_row = np.array([len(r) for r in rows], np.int64)
  ids = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
  length = lengths[ids]
  row_of = np.repeat(np.arange(len(rows)), per_row)
  start = np.cumsum(length) - length  # of each example in the flat token stream
  row_tokens = np.bincount(row_of, weights=length, minlength=len(rows)).astype(np.int64)
  start_in_row = start - (np.cumsum(row_tokens) - row_tokens)[row_of]
  segment = np.arange(len(ids)) - (np.cumsum(per_row) - per_row)[row_of] + 1

  # One entry per token from here on.
  pos = np.arange(length.sum()) - np.repeat(start, length)
  inst_len = np.repeat(index.inst_len[ids], length)
  resp_start = np.repeat(index.resp_start[ids], length)
  in_instruction = pos < inst_len
  inst_start = np.repeat(index.inst_start[ids], length)
  source = np.where(in_instruction, inst_start + pos, resp_start + pos - inst_len)
  # Each input's label is the example's next token: an instruction token or a response token.
  next_pos = pos + 1
  label_in_instruction = next_pos < inst_len
  label_source = np.where(label_in_instruction, inst_start + next_pos,
                          resp_start + next_pos - inst_len)
  labels = np.where(label_in_instruction & target_only, IGNORE_LABEL,
                    tokens[label_source].astype(np.int32))
  dest = np.repeat(row_of * seq_len + start_in_row, length) + pos

  batch = {name: np.zeros((len(rows), seq_len), np.int32) for name in FIELDS}
  batch['labels'].fill(IGNORE_LABEL)
  values = dict(inputs=tokens[source], labels=labels, positions=pos,
                segment_ids=np.repeat(segment, length), is_instruction=in_instruction)
  for name in FIELDS:
    batch[name].reshape(-1)[dest] = values[name]
  return batch
