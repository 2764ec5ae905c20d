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


def _first_fit_decreasing(windows, lengths, seq_len, max_segments):
  """First-fit-decreasing of each window (an array of example ids): bins of total length <= seq_len
  and at most max_segments ids, longest examples placed first, each into the first open bin with
  room. All windows advance together, one numpy step per example rank (a loop over examples in
  Python is ~100x slower). Returns the ids grouped by bin, bin after bin, and each bin's size."""
  sizes = np.array([len(w) for w in windows])
  by_size = np.argsort(-sizes, kind='stable')  # windows still placing examples come first
  sizes = sizes[by_size]
  valid = np.arange(sizes[0]) < sizes[:, None]  # [windows, examples]
  ids = np.zeros(valid.shape, np.int64)
  ids[valid] = np.concatenate([windows[w] for w in by_size])
  size = np.where(valid, lengths[ids], 0)  # real examples have length >= 1
  rank = np.argsort(-size, axis=1, kind='stable')
  ids, size = np.take_along_axis(ids, rank, 1), np.take_along_axis(size, rank, 1)
  num_bins = np.zeros(len(sizes), np.int64)
  free = np.full((len(sizes), 8), -1, np.int64)  # room per bin; -1: not open (fits nothing)
  count = np.zeros(free.shape, np.int64)  # examples per bin
  bin_of = np.full(valid.shape, np.iinfo(np.int64).max, np.int64)
  for i in range(valid.shape[1]):
    active = int(np.searchsorted(-sizes, -i, side='left'))  # windows with an example of rank i
    if num_bins[:active].max() >= free.shape[1]:
      free = np.pad(free, ((0, 0), (0, free.shape[1])), constant_values=-1)
      count = np.pad(count, ((0, 0), (0, count.shape[1])))
    open_bins = int(num_bins[:active].max()) + 1
    length = size[:active, i]
    fits = (free[:active, :open_bins] >= length[:, None]) & (count[:active, :open_bins]
                                                             < max_segments)
    first = fits.argmax(1)
    rows = np.arange(active)
    new = ~fits[rows, first]
    target = np.where(new, num_bins[:active], first)
    free[rows[new], target[new]] = seq_len
    num_bins[:active] += new
    free[rows, target] -= length
    count[rows, target] += 1
    bin_of[:active, i] = target
  order = np.argsort(bin_of, axis=1, kind='stable')
  ids = np.take_along_axis(ids, order, 1)
  counts = count[:, :free.shape[1]]
  back = np.argsort(by_size)  # windows in their given order again
  order = ids[back][valid[back]]
  counts = counts[back][np.arange(counts.shape[1]) < num_bins[back][:, None]]
  return order, counts


def _windows(lengths, window_tokens, piece=1 << 16):
  """Groups of consecutive windows (arrays of the ids of usable examples): a window ends where the
  running token count crosses a multiple of `window_tokens`. Reads `piece` examples at a time."""
  carried_ids, carried_window, total = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
  for begin in range(0, len(lengths), piece):
    ids = np.flatnonzero(lengths[begin:begin + piece] > 0) + begin
    sums = total + np.cumsum(lengths[ids])
    total = int(sums[-1]) if len(sums) else total
    ids = np.concatenate([carried_ids, ids])
    window = np.concatenate([carried_window, sums // window_tokens])
    last = begin + piece >= len(lengths)
    bounds = np.flatnonzero(np.diff(window)) + 1
    cut = len(ids) if last else (bounds[-1] if len(bounds) else 0)  # the last may go on
    if cut:
      yield np.split(ids[:cut], bounds[bounds < cut])
    carried_ids, carried_window = ids[cut:], window[cut:]


def pack_windows(lengths: np.ndarray, seq_len: int, window_rows: int, max_segments: int):
  """Yields (example ids grouped by row, examples per row) of successive groups of windows: the
  plan of `pack` in pieces, in bounded memory."""
  for windows in _windows(lengths, window_rows * seq_len):
    yield _first_fit_decreasing(windows, lengths, seq_len, max_segments)


def pack(lengths: np.ndarray, seq_len: int, window_rows: int, max_segments: int) -> Plan:
  """Plans rows (of at most `max_segments` examples) for examples in their given order, packing
  windows of ~window_rows rows each.

  Windows keep the epoch's shuffled order at a coarse grain while leaving first-fit-decreasing
  enough examples to fill rows almost completely.
  """
  orders, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for order, count in pack_windows(lengths, seq_len, window_rows, max_segments):
    orders.append(order)
    counts.append(count)
  counts = np.concatenate(counts)
  return Plan(np.concatenate(orders), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def packing_efficiency(plan: Plan, lengths: np.ndarray, seq_len: int) -> float:
  """Non-padding tokens / all tokens of the planned rows."""
  return float(lengths[plan.order].sum() / max(1, plan.num_rows * seq_len))


def pack_rows(tokens, index: Index, lengths: np.ndarray, rows: list[np.ndarray],
              seq_len: int, target_only: bool = True,
              max_segments: int | None = None) -> dict[str, np.ndarray]:
  """Builds the packed batch [len(rows), seq_len] for rows given as arrays of example ids, with
  run metadata for rows of up to `max_segments` examples (default: the most any row here has).
  `tokens`: an array, or a sampled set's layout.TokenShards.

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

  # One entry per token from here on, example after example; where the tokens are sharded
  # (layout.TokenShards), examples grouped by shard: each lies in one, read with one gather.
  shard = tokens.shard_of(index.inst_start[ids]) if hasattr(tokens, 'shard_of') else None
  by_shard = slice(None) if shard is None else np.argsort(shard, kind='stable')
  example, example_length = ids[by_shard], length[by_shard]
  example_start = np.cumsum(example_length) - example_length
  pos = np.arange(example_length.sum()) - np.repeat(example_start, example_length)
  inst_len = np.repeat(index.inst_len[example], example_length)
  resp_start = np.repeat(index.resp_start[example], example_length)
  in_instruction = pos < inst_len
  inst_start = np.repeat(index.inst_start[example], example_length)
  source = np.where(in_instruction, inst_start + pos, resp_start + pos - inst_len)
  if shard is None:
    take = tokens.__getitem__
  else:  # (shard, first token, end token) of each shard's examples
    shard = shard[by_shard]
    first = np.flatnonzero(np.diff(shard, prepend=-1))
    groups = list(zip(shard[first].tolist(), example_start[first].tolist(),
                      [*example_start[first[1:]].tolist(), len(pos)]))
    take = lambda positions: tokens.take_grouped(positions, groups)
  # Each input's label is the example's next token: an instruction token or a response token.
  next_pos = pos + 1
  label_in_instruction = next_pos < inst_len
  label_source = np.where(label_in_instruction, inst_start + next_pos,
                          resp_start + next_pos - inst_len)
  labels = np.where(label_in_instruction & target_only, IGNORE_LABEL,
                    take(label_source).astype(np.int32))
  dest = np.repeat((row_of * seq_len + start_in_row)[by_shard], example_length) + pos

  batch = {name: np.zeros((len(rows), seq_len), np.int32) for name in TOKEN_FIELDS}
  batch['labels'].fill(IGNORE_LABEL)
  values = dict(inputs=take(source), labels=labels, positions=pos,
                segment_ids=np.repeat(segment[by_shard], example_length),
                is_instruction=in_instruction)
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
