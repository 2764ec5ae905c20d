"""Mixture rules (caps, repeats, long context, min response length) and the sampled layout."""

import collections

import ml_collections
import numpy as np
import pytest

from hrmtext.data import mixture
from hrmtext.data.layout import Index, SampledSet, write_sampled

RULE = dict(prefix='', max_per_file=-1, repeat=1.0, long_context='truncate')


def _index(inst_len, resp_len):
  inst_len, resp_len = np.array(inst_len), np.array(resp_len)
  start = np.concatenate([[0], np.cumsum(inst_len + resp_len)[:-1]])
  return Index(start, inst_len, start + inst_len, resp_len)


def test_first_matching_prefix_wins():
  rules = [
      dict(RULE, prefix='gsm', repeat=2.0),
      dict(RULE, prefix='gs', repeat=3.0),
      dict(RULE, prefix='')
  ]
  assert mixture.rule_for('gsm_symbolic', rules)['repeat'] == 2.0
  assert mixture.rule_for('gs_other', rules)['repeat'] == 3.0
  assert mixture.rule_for('chain_sum', rules)['repeat'] == 1.0
  with pytest.raises(ValueError, match='matches no mixture rule'):
    mixture.rule_for('chain_sum', rules[:2])
  with pytest.raises(ValueError, match='long_context'):
    mixture.rule_for('x', [dict(RULE, long_context='wrap')])


def test_long_examples_truncated_or_dropped_and_short_responses_dropped():
  index = _index(inst_len=[4, 4, 9, 4, 4], resp_len=[3, 8, 3, 1, 6])  # context 10
  truncated = mixture.eligible(index, dict(RULE, long_context='truncate'), 10, 2)
  np.testing.assert_array_equal(truncated.inst_len, [4, 4, 4])
  np.testing.assert_array_equal(truncated.resp_len, [3, 6, 6])  # 9+3 leaves 1 token: dropped
  np.testing.assert_array_equal(truncated.resp_start, index.resp_start[[0, 1, 4]])
  dropped = mixture.eligible(index, dict(RULE, long_context='drop'), 10, 2)
  np.testing.assert_array_equal(dropped.resp_len, [3, 6])


def test_capped_source_sees_every_row_before_repeating():
  epochs = [
      mixture.epoch_rows(100, dict(RULE, max_per_file=30), k, seed=0, name='a') for k in range(4)
  ]
  assert all(len(e) == 30 for e in epochs)
  assert len(set(np.concatenate(epochs[:3]))) == 90  # epochs 0-2 are disjoint
  assert set(np.concatenate(epochs[:3])) | set(epochs[3]) == set(
      range(100))  # epoch 3 finishes the pass
  other_seed = mixture.epoch_rows(100, dict(RULE, max_per_file=30), 0, seed=1, name='a')
  assert not np.array_equal(epochs[0], other_seed)
  np.testing.assert_array_equal(epochs[0],
                                mixture.epoch_rows(100, dict(RULE, max_per_file=30), 0, 0, 'a'))


def test_repeat_upsamples_whole_passes():
  rows = mixture.epoch_rows(10, dict(RULE, repeat=2.0), 0, seed=0, name='a')
  assert collections.Counter(rows.tolist()) == {i: 2 for i in range(10)}
  assert len(mixture.epoch_rows(10, dict(RULE, repeat=0.5), 0, seed=0, name='a')) == 5


def test_sample_epochs_writes_the_reference_sampled_layout(tmp_path):
  sources = {
      'small': (np.arange(1, 21, dtype=np.uint32), _index([3, 3, 3, 3], [2, 2, 2, 2])),
      'big': (np.arange(21, 61, dtype=np.uint32), _index([4] * 5, [4] * 5))
  }
  cfg = ml_collections.ConfigDict(
      dict(rules=(dict(RULE, prefix='small', repeat=2.0), dict(RULE, max_per_file=2)),
           min_resp_length=2))
  tokens, epochs = mixture.sample_epochs(sources, cfg, context=11, epochs=3, seed=0)
  np.testing.assert_array_equal(tokens, np.arange(1, 61))
  for index in epochs:
    assert len(index.inst_len) == 8 + 2  # small twice, big capped at 2
    first_tokens = tokens[index.inst_start]
    assert sum(first_tokens <= 20) == 8 and sum(first_tokens > 20) == 2
  write_sampled(str(tmp_path / 's'), tokens, epochs, dict(tokenizer_path='x'), vocab_size=200,
                max_seq_len=11)
  sampled = SampledSet(str(tmp_path / 's'))
  assert sampled.num_epochs == 3 and sampled.max_seq_len == 11 and sampled.tokens(
  ).dtype == np.uint8
  assert sampled.metadata['total_length'] == int(epochs[0].inst_len.sum() +
                                                 epochs[0].resp_len.sum())
  for k, index in enumerate(epochs):
    for got, want in zip(sampled.epoch(k), index):
      np.testing.assert_array_equal(got, want)
