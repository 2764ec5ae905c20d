"""PrefixLM packing: examples -> fixed-length rows (the packed batch format of the trainer).

A packing plan is fixed per epoch (first-fit-decreasing over windows of the epoch's example order),
so any row can be built on its own: the pipeline is random-access and its state is one index.
Each row holds whole examples, at most `max_segments` of them; an example longer than the row is
cut to it.

Besides the tokens, a packed batch holds what the fused attention kernels need, computed here on
the host (the compiled step then has no per-layer integer work and no fallback branch): the row's
runs in cuDNN's packed layout (RUN_FIELDS), for a causal pass over each example (and the
padding) and a bidirectional pass over each instruction.
"""

from typing import NamedTuple

import numpy as np

from hrmtext.data.layout import Index

IGNORE_LABEL = -100
TOKEN_FIELDS = ('inputs', 'labels', 'positions', 'segment_ids', 'is_instruction')  # [rows, len]
# Runs of a row (start, length), -1 past its last run: offsets [rows, max_runs + 1], lengths
# [rows, max_runs], with max_runs = max_segments + 1 (the examples and the padding).
RUN_FIELDS = ('causal_offsets', 'causal_lengths', 'prefix_offsets', 'prefix_lengths')
FIELDS = TOKEN_FIELDS + RUN_FIELDS


def field_shapes(rows: int, seq_len: int, max_segments: int) -> dict[str, tuple]:
  """The shape of each field of a packed batch."""
  runs = max_segments + 1
  shapes = dict.fromkeys(TOKEN_FIELDS, (rows, seq_len))
  shapes.update(causal_offsets=(rows, runs + 1), causal_lengths=(rows, runs),
                prefix_offsets=(rows, runs + 1), prefix_lengths=(rows, runs))
  return shapes


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


def _first_fit_decreasing(ids, lengths, seq_len, max_segments):
  """Bins (as lists of ids) of total length <= seq_len and at most max_segments ids, longest
  examples placed first."""
  ids = ids[np.argsort(-lengths[ids], kind='stable')]
  free = np.empty(len(ids), np.int64)  # remaining room per open bin; at most one bin per example
  count = np.empty(len(ids), np.int64)  # examples per open bin
  bin_of = np.empty(len(ids), np.int64)
  num_bins = 0
  for i, length in enumerate(lengths[ids].tolist()):
    fits = (free[:num_bins] >= length) & (count[:num_bins] < max_segments)
    b = int(fits.argmax()) if num_bins and fits.any() else num_bins
    if b == num_bins:
      free[b], count[b] = seq_len, 0
      num_bins += 1
    free[b] -= length
    count[b] += 1
    bin_of[i] = b
  order = np.argsort(bin_of, kind='stable')
  return ids[order], np.bincount(bin_of, minlength=num_bins)


def pack(lengths: np.ndarray, seq_len: int, window_rows: int, max_segments: int) -> Plan:
  """Plans rows (of at most `max_segments` examples) for examples in their given order, packing
  windows of ~window_rows rows each.

  Windows keep the epoch's shuffled order at a coarse grain while leaving first-fit-decreasing
  enough examples to fill rows almost completely.
  """
  ids = np.flatnonzero(lengths > 0)
  window = np.cumsum(lengths[ids]) // (window_rows * seq_len)
  bounds = np.flatnonzero(np.diff(window)) + 1
  orders, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for window_ids in np.split(ids, bounds):
    if len(window_ids):
      order, count = _first_fit_decreasing(window_ids, lengths, seq_len, max_segments)
      orders.append(order)
      counts.append(count)
  counts = np.concatenate(counts)
  return Plan(np.concatenate(orders), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def packing_efficiency(plan: Plan, lengths: np.ndarray, seq_len: int) -> float:
  """Non-padding tokens / all tokens of the planned rows."""
  return float(lengths[plan.order].sum() / max(1, plan.num_rows * seq_len))


def pack_rows(tokens: np.ndarray, index: Index, lengths: np.ndarray, rows: list[np.ndarray],
              seq_len: int, target_only: bool = True,
              max_segments: int | None = None) -> dict[str, np.ndarray]:
  """Builds the packed batch [len(rows), seq_len] for rows given as arrays of example ids, with
  run metadata for rows of up to `max_segments` examples (default: the most any row here has).

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

  batch = {name: np.zeros((len(rows), seq_len), np.int32) for name in TOKEN_FIELDS}
  batch['labels'].fill(IGNORE_LABEL)
  values = dict(inputs=tokens[source], labels=labels, positions=pos,
                segment_ids=np.repeat(segment, length), is_instruction=in_instruction)
  for name in TOKEN_FIELDS:
    batch[name].reshape(-1)[dest] = values[name]
  if max_segments is None:
    max_segments = max(1, int(per_row.max(initial=0)))
  if per_row.max(initial=0) > max_segments:
    raise ValueError(f'a row of {per_row.max()} examples; at most {max_segments}')
  instruction = np.minimum(index.inst_len[ids], length)  # >= 1: packed_lengths' usable examples
  runs = lambda lengths: _runs(row_of, segment - 1, start_in_row, lengths, len(rows),
                               max_segments)
  batch.update(_with_padding(runs(length), row_tokens, per_row, seq_len, 'causal'))
  batch.update(_named(runs(instruction), 'prefix'))
  return batch


def _runs(row_of, slot, starts, lengths, num_rows, max_segments):
  """(offsets [rows, max_segments + 2], lengths [rows, max_segments + 1]) with run `slot` of a
  row at [start, start + length), -1 where a row has no run."""
  offsets = np.full((num_rows, max_segments + 2), -1, np.int32)
  run_lengths = np.full((num_rows, max_segments + 1), -1, np.int32)
  offsets[row_of, slot] = starts
  run_lengths[row_of, slot] = lengths
  return offsets, run_lengths


def _with_padding(runs, row_tokens, per_row, seq_len, name):
  """The causal runs and, after a row's examples, its padding [row_tokens, seq_len) as one run
  (padding attends to padding, as the mask of DESIGN §2 says: segment 0, causal)."""
  offsets, run_lengths = runs
  padded = np.flatnonzero(row_tokens < seq_len)
  offsets[padded, per_row[padded]] = row_tokens[padded]
  run_lengths[padded, per_row[padded]] = seq_len - row_tokens[padded]
  return _named((offsets, run_lengths), name)


def _named(runs, name):
  return {f'{name}_offsets': runs[0], f'{name}_lengths': runs[1]}
