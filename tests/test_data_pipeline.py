"""Grain pipeline on a reference-layout sampled set: format, sharding over any process count,
wrap-around, resuming at a batch."""

import collections
import itertools

from absl import flags
import numpy as np
import pytest

from tests.data_fixtures import shard_sampled_set, unpack_batch, write_reference_dataset
from hrmtext.data import layout, pipeline
from hrmtext.data.config import data_config
from hrmtext.data.packing import FIELDS, field_shapes

SEQ_LEN = 64


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  path = tmp_path_factory.mktemp('reference')
  epochs = write_reference_dataset(str(path), num_examples=90, epochs=3, max_seq_len=SEQ_LEN + 1)
  cfg = data_config()
  cfg.dir = str(path)
  return cfg, epochs


def _iterator(cfg, rows=2, process_index=0, process_count=1, seed=0):
  return pipeline.make_train_iterator(cfg, rows_per_process=rows, seq_len=SEQ_LEN,
                                      process_index=process_index, process_count=process_count,
                                      seed=seed)


def _source(cfg, rows=1, process_index=0, process_count=1):
  return pipeline.TrainBatches(cfg.dir, seq_len=SEQ_LEN, rows_per_process=rows,
                               process_index=process_index, process_count=process_count, seed=0,
                               window_rows=cfg.pack_window_rows,
                               max_segments=cfg.max_segments_per_row)


def test_reference_dataset_yields_its_examples_in_packed_format(reference):
  cfg, epochs = reference
  batch = next(_iterator(cfg, rows=3))
  assert set(batch) == set(FIELDS)
  shapes = field_shapes(3, SEQ_LEN, cfg.max_segments_per_row)
  for name, array in batch.items():
    assert array.dtype == np.int32 and array.shape == shapes[name], name
  examples = unpack_batch(batch)
  assert len(examples) > 3 and set(examples) <= set(
      epochs[0])  # whole examples of epoch 0, unchanged
  assert (batch['segment_ids'] > 0).mean() > 0.8  # rows are packed, not one example per row


def test_each_epoch_is_covered_exactly_once(reference):
  cfg, epochs = reference
  source = _source(cfg)
  starts = [0, *source.epoch_end]
  for k, epoch in enumerate(epochs):
    seen = collections.Counter(itertools.chain.from_iterable(
        unpack_batch(source[i]) for i in range(starts[k], starts[k + 1])))
    assert seen == collections.Counter(epoch)


@pytest.mark.parametrize('process_count', [2, 3, 6])
def test_global_batches_do_not_depend_on_the_process_count(reference, process_count):
  """What makes resuming on another number of processes exact: the data shards' rows of global
  batch i, in shard order, are the rows of batch i of one process (across epochs and passes)."""
  cfg, _ = reference
  rows = 6
  single = _source(cfg, rows=rows)
  shards = [_source(cfg, rows=rows // process_count, process_index=p,
                    process_count=process_count) for p in range(process_count)]
  for i in range(int(single.epoch_end[-1]) // rows + 3):
    want = single.batch_rows(i)
    got = [row for shard in shards for row in shard.batch_rows(i)]
    assert len(got) == len(want) == rows
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('storage', ['local', 'object'])
def test_a_sharded_set_gives_the_batches_of_the_one_file_set(reference, tmp_path, monkeypatch,
                                                             storage):
  """Token shards are read as one array; on object storage (here: the local files read as if
  remote, by ranged reads through etils.epath) too. Batch i is the same rows on 3 processes."""
  cfg, _ = reference
  lengths = shard_sampled_set(cfg.dir, str(tmp_path / 'sharded'), num_shards=7)
  assert len(lengths) == 7
  one_file = _source(cfg, rows=3)
  if storage == 'object':
    monkeypatch.setattr(layout, 'is_local', lambda path: False)
  sharded_cfg = cfg.copy_and_resolve_references()
  sharded_cfg.dir = str(tmp_path / 'sharded')
  sharded = _source(sharded_cfg, rows=3)
  assert sharded._tokens.num_shards == 7  # pylint: disable=protected-access
  processes = [_source(sharded_cfg, rows=1, process_index=p, process_count=3) for p in range(3)]
  for i in range(int(one_file.epoch_end[-1]) + 2):  # every epoch, and into the next pass
    want, got = one_file[i], sharded[i]
    per_process = [process[i] for process in processes]
    for name in FIELDS:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f'{name} of batch {i}')
      np.testing.assert_array_equal(np.concatenate([b[name] for b in per_process]), want[name],
                                    err_msg=f'{name} of batch {i} on 3 processes')


def test_wraps_around_after_last_epoch_with_a_new_row_order(reference):
  cfg, epochs = reference
  source = _source(cfg)
  rows_per_pass = int(source.epoch_end[-1])
  first_pass = [unpack_batch(source[i]) for i in range(int(source.epoch_end[0]))]
  second_pass = [unpack_batch(source[rows_per_pass + i]) for i in range(int(source.epoch_end[0]))]
  flat = lambda rows: collections.Counter(itertools.chain.from_iterable(rows))
  assert flat(first_pass) == flat(second_pass) == collections.Counter(epochs[0])
  assert first_pass != second_pass


def test_longer_examples_are_cut_to_the_row(tmp_path):
  epochs = write_reference_dataset(str(tmp_path), num_examples=20, epochs=1, max_inst=30,
                                   max_resp=40, max_seq_len=72)
  cfg = data_config()
  cfg.dir = str(tmp_path)
  source = pipeline.TrainBatches(cfg.dir, seq_len=32, rows_per_process=1, process_index=0,
                                 process_count=1, seed=0, window_rows=4, max_segments=64)
  packed = list(
      itertools.chain.from_iterable(
          unpack_batch(source[i]) for i in range(int(source.epoch_end[0]))))
  expected = [(inst, resp[:32 - len(inst) + 1]) for inst, resp in epochs[0] if len(inst) <= 32]
  assert collections.Counter(packed) == collections.Counter(expected)


@pytest.mark.parametrize('worker_count', [0, 1])
def test_iterator_from_a_batch_continues_the_stream(reference, worker_count):
  """How a resumed run picks up its data: the iterator made at `start` yields batches start, ..."""
  cfg, _ = reference
  cfg = cfg.copy_and_resolve_references()
  cfg.worker_count = worker_count
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (app.run parses them)
  iterator = _iterator(cfg)
  for _ in range(5):
    next(iterator)
  expected = [next(iterator) for _ in range(40)]  # crosses epoch boundaries and wraps around
  resumed = pipeline.make_train_iterator(cfg, rows_per_process=2, seq_len=SEQ_LEN, process_index=0,
                                         process_count=1, seed=0, start=5)
  for want in expected:
    got = next(resumed)
    for name in FIELDS:
      np.testing.assert_array_equal(got[name], want[name])
  iterator.close()
  resumed.close()


def test_seed_changes_row_order(reference):
  cfg, _ = reference
  a, b = next(_iterator(cfg, seed=0)), next(_iterator(cfg, seed=1))
  assert not np.array_equal(a['inputs'], b['inputs'])


def test_sampled_dir_and_bad_arguments(reference, tmp_path):
  cfg, _ = reference
  assert pipeline.sampled_dir(cfg) == cfg.dir
  with pytest.raises(ValueError, match='process_index'):
    _iterator(cfg, process_index=2, process_count=2)
  missing = cfg.copy_and_resolve_references()
  missing.dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='metadata.json'):
    _iterator(missing)
  assert pipeline.make_eval_batches(cfg, rows=2,
                                    seq_len=SEQ_LEN) == {}  # reference sets have no held-out
