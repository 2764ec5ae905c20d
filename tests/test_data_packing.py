"""PrefixLM packing: the batch format against a plain loop, and first-fit-decreasing plans."""

import numpy as np
import pytest

from hrmtext.data import packing
from hrmtext.data.layout import Index

IGNORE = packing.IGNORE_LABEL


def _random_examples(rng, n, max_inst=12, max_resp=12):
  """Tokens with instruction/response pieces at scattered offsets, and their Index."""
  tokens, fields = [], []
  for _ in range(n):
    inst = rng.integers(1, 100, rng.integers(1, max_inst)).tolist()
    resp = rng.integers(1, 100, rng.integers(1, max_resp)).tolist()
    tokens += [0] * int(rng.integers(0, 3))  # gaps: offsets must be followed
    fields.append((len(tokens), len(inst), len(tokens) + len(inst), len(resp)))
    tokens += inst + resp
  return np.array(tokens, np.uint16), Index(*(np.array(f, np.int64) for f in zip(*fields)))


def _naive_row(tokens, index, example_ids, seq_len):
  """The packed row exactly as the format defines it, one example at a time."""
  row = dict(inputs=[], labels=[], positions=[], segment_ids=[], is_instruction=[])
  for segment, e in enumerate(example_ids, 1):
    inst = tokens[index.inst_start[e]:index.inst_start[e] + index.inst_len[e]].tolist()
    resp = tokens[index.resp_start[e]:index.resp_start[e] + index.resp_len[e]].tolist()
    n = min(len(inst) + len(resp) - 1, seq_len)
    row['inputs'] += (inst + resp[:-1])[:n]
    row['labels'] += ([IGNORE] * (len(inst) - 1) + resp)[:n]
    row['positions'] += list(range(n))
    row['segment_ids'] += [segment] * n
    row['is_instruction'] += ([1] * len(inst) + [0] * len(resp))[:n]
  pad = seq_len - len(row['inputs'])
  return {k: np.array(v + [IGNORE if k == 'labels' else 0] * pad) for k, v in row.items()}


def test_pack_rows_matches_the_format_definition():
  rng = np.random.default_rng(0)
  tokens, index = _random_examples(rng, 40)
  seq_len = 32
  lengths = packing.packed_lengths(index, seq_len)
  plan = packing.pack(lengths, seq_len, window_rows=4, max_segments=64).padded(3)
  rows = plan.rows(range(plan.num_rows))
  batch = packing.pack_rows(tokens, index, lengths, rows, seq_len, max_segments=64)
  shapes = packing.field_shapes(plan.num_rows, seq_len, 64)
  assert all(batch[k].dtype == np.int32 and batch[k].shape == shapes[k] for k in packing.FIELDS)
  for r, example_ids in enumerate(rows):
    want = _naive_row(tokens, index, example_ids, seq_len)
    for name in packing.TOKEN_FIELDS:
      np.testing.assert_array_equal(batch[name][r], want[name], err_msg=f'{name} of row {r}')


def test_known_row():
  # instruction [BOQ=2, 7, EOQ=3], response [9, 8, EOA=4]; then instruction [2, 3], response [5, 4]
  tokens = np.array([2, 7, 3, 9, 8, 4, 2, 3, 5, 4])
  index = Index(np.array([0, 6]), np.array([3, 2]), np.array([3, 8]), np.array([3, 2]))
  lengths = packing.packed_lengths(index, 10)
  batch = packing.pack_rows(tokens, index, lengths, [np.array([0, 1])], 10)
  np.testing.assert_array_equal(batch['inputs'][0], [2, 7, 3, 9, 8, 2, 3, 5, 0, 0])
  np.testing.assert_array_equal(batch['labels'][0],
                                [IGNORE, IGNORE, 9, 8, 4, IGNORE, 5, 4, IGNORE, IGNORE])
  np.testing.assert_array_equal(batch['positions'][0], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
  np.testing.assert_array_equal(batch['segment_ids'][0], [1, 1, 1, 1, 1, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(batch['is_instruction'][0], [1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
  # Runs (cuDNN's packed layout): the two examples and the padding; the two instructions.
  np.testing.assert_array_equal(batch['causal_offsets'][0], [0, 5, 8, -1])
  np.testing.assert_array_equal(batch['causal_lengths'][0], [5, 3, 2])
  np.testing.assert_array_equal(batch['prefix_offsets'][0], [0, 5, -1, -1])
  np.testing.assert_array_equal(batch['prefix_lengths'][0], [3, 2, -1])


def test_unpackable_examples_are_skipped():
  index = Index(np.zeros(3, np.int64), np.array([5, 40, 3]), np.zeros(3, np.int64),
                np.array([4, 4, 0]))
  np.testing.assert_array_equal(packing.packed_lengths(index, 16), [8, 0, 0])


@pytest.mark.parametrize('seq_len,window_rows', [(64, 1), (64, 8), (512, 16)])
def test_plan_places_every_example_once_within_row_length(seq_len, window_rows):
  lengths = np.random.default_rng(1).integers(0, 60, 3000)  # zeros: unpackable, left out
  plan = packing.pack(lengths, seq_len, window_rows, max_segments=64)
  np.testing.assert_array_equal(np.sort(plan.order), np.flatnonzero(lengths > 0))
  row_tokens = np.add.reduceat(lengths[plan.order], plan.row_splits[:-1])
  assert row_tokens.max() <= seq_len and (np.diff(plan.row_splits) > 0).all()
  efficiency = packing.packing_efficiency(plan, lengths, seq_len)
  assert efficiency == pytest.approx(lengths.sum() / (plan.num_rows * seq_len))


def test_rows_hold_at_most_max_segments_examples():
  """Many tiny examples: the bound, not the row length, ends a row."""
  lengths = np.random.default_rng(3).integers(1, 4, 2000)
  plan = packing.pack(lengths, 512, 8, max_segments=16)
  per_row = np.diff(plan.row_splits)
  assert per_row.max() == 16 and (per_row == 16).mean() > 0.9
  np.testing.assert_array_equal(np.sort(plan.order), np.arange(len(lengths)))


def test_wider_windows_pack_tighter():
  lengths = np.random.default_rng(1).integers(1, 60, 3000)
  efficiency = [
      packing.packing_efficiency(packing.pack(lengths, 512, w, max_segments=512), lengths, 512)
      for w in (1, 8, 64)
  ]
  assert efficiency[0] < efficiency[1] < efficiency[2] and efficiency[2] > 0.99


def test_plan_is_deterministic_and_padding_rows_are_empty():
  lengths = np.random.default_rng(2).integers(1, 30, 500)
  plan = packing.pack(lengths, 64, 8, 64)
  again = packing.pack(lengths, 64, 8, 64)
  np.testing.assert_array_equal(plan.order, again.order)
  np.testing.assert_array_equal(plan.row_splits, again.row_splits)
  padded = plan.padded(7)
  assert padded.num_rows % 7 == 0 and padded.num_rows - plan.num_rows < 7
  assert all(len(r) == 0 for r in padded.rows(range(plan.num_rows, padded.num_rows)))


def _first_fit_decreasing_loop(lengths, seq_len, window_rows, max_segments):
  """The plan as the definition reads: per window, longest first, each example into the first
  open row with room and fewer than max_segments examples (a new row if none)."""
  ids = np.flatnonzero(lengths > 0)
  window = np.cumsum(lengths[ids]) // (window_rows * seq_len)
  order, counts = [], []
  for window_ids in np.split(ids, np.flatnonzero(np.diff(window)) + 1):
    rows = []
    for e in window_ids[np.argsort(-lengths[window_ids], kind='stable')].tolist():
      row = next((r for r in rows if sum(lengths[r]) + lengths[e] <= seq_len and
                  len(r) < max_segments), None)
      if row is None:
        rows.append(row := [])
      row.append(e)
    order += [e for row in rows for e in row]
    counts += [len(row) for row in rows]
  return order, np.concatenate([[0], np.cumsum(counts)])


def test_plan_is_first_fit_decreasing_per_window():
  """The vectorized plan (all windows at once, in pieces of examples) is the definition's."""
  rng = np.random.default_rng(4)
  for trial in range(40):
    seq_len = int(rng.choice([8, 64, 512]))
    lengths = rng.integers(0, seq_len + 1, int(rng.integers(0, 1500)))
    if trial % 2:
      lengths = np.minimum(lengths, rng.integers(1, 6, len(lengths)))  # many per row
    window_rows, max_segments = int(rng.integers(1, 9)), int(rng.integers(1, 70))
    plan = packing.pack(lengths, seq_len, window_rows, max_segments)
    order, splits = _first_fit_decreasing_loop(lengths, seq_len, window_rows, max_segments)
    np.testing.assert_array_equal(plan.order, order)
    np.testing.assert_array_equal(plan.row_splits, splits)
  lengths = rng.integers(1, 40, 200_000)  # windows across several reading pieces
  pieces = packing.pack_windows(lengths, 64, 8, 64)
  assert sum(len(counts) for _, counts in pieces) == packing.pack(lengths, 64, 8, 64).num_rows
