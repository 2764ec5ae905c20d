"""Mixture rules (caps, repeats, long context, min response length) and the sampled layout."""

import collections
import os

import numpy as np
import pytest

from hrmtext.data import layout, mixture, stages
from hrmtext.data.layout import SampledSet

RULE = dict(prefix='', max_per_file=-1, repeat=1.0, long_context='truncate')


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
  inst_len, resp_len = np.array([4, 4, 9, 4, 4]), np.array([3, 8, 3, 1, 6])  # context 10
  counts = collections.Counter()
  keep, cut = mixture.usable(inst_len, resp_len, dict(RULE, long_context='truncate'), 10, 2, counts)
  np.testing.assert_array_equal(keep, [True, True, False, False, True])  # 9+3 leaves 1 token
  np.testing.assert_array_equal(cut[keep], [3, 6, 6])
  assert counts[mixture.CUT] == 1 and sum(counts.values()) == 3  # 1 cut, 2 dropped
  keep, _ = mixture.usable(inst_len, resp_len, dict(RULE, long_context='drop'), 10, 2)
  np.testing.assert_array_equal(keep, [True, False, False, False, True])


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


def test_epoch_rows_keep_their_values():
  """The rows of an epoch as the first (in-memory) version drew them: a sampled set made before
  is made again byte for byte."""
  np.testing.assert_array_equal(
      mixture.epoch_rows(10, dict(RULE, max_per_file=4), 3, seed=0, name='a'), [5, 0, 3, 6])
  np.testing.assert_array_equal(mixture.epoch_rows(3, dict(RULE, repeat=2.0), 1, seed=5, name='b'),
                                [2, 1, 0, 2, 1, 0])
  permutation = mixture._permutation  # pylint: disable=protected-access
  assert permutation([1, 2], 50).tolist() == np.random.default_rng([1, 2]).permutation(50).tolist()


def _write_source(directory, rows, first_token, shards=1):
  """A tokenized source of `rows` (instruction, response) lengths in `shards` shards."""
  token = first_token
  for k, part in enumerate(np.array_split(np.array(rows), shards)):
    inst_len, resp_len = part[:, 0], part[:, 1]
    tokens = np.arange(token, token + int(part.sum()))
    token += len(tokens)
    layout.write_tokenized_source(layout.shard_dir(directory, k, shards), tokens, inst_len,
                                  resp_len)


def test_epochs_of_sharded_sources_in_the_reference_sampled_layout(tmp_path):
  _write_source(tmp_path / 'tok' / 'big', [(4, 4)] * 5, first_token=1, shards=2)
  _write_source(tmp_path / 'tok' / 'small', [(3, 2)] * 4, first_token=41)
  rules = (dict(RULE, prefix='small', repeat=2.0), dict(RULE, max_per_file=2))
  sources, token_files = mixture.plan_sources(layout.tokenized_sources(tmp_path / 'tok'), rules)
  assert [s.name for s in sources] == ['big', 'small'] and len(token_files) == 3
  assert [shard.token_base for s in sources for shard in s.shards] == [0, 24, 40]
  out = tmp_path / 's'
  plan = [dict(name=s.name, rule=s.rule, shards=[list(shard) for shard in s.shards])
          for s in sources]
  stages.token_shard(dict(out=str(out / 'tokens.npy'), parts=token_files, dtype='uint8'))
  results = [stages.epoch(dict(out=str(out), epoch=k, sources=plan, seed=0, context=11,
                               min_resp_length=2)) for k in range(3)]
  layout.write_metadata(str(out), [('tokens.npy', 60)], dict(tokenizer_path='x'), 11,
                        results[0]['tokens'])
  sampled = SampledSet(str(out))
  tokens = np.asarray(sampled.tokens())
  np.testing.assert_array_equal(tokens, np.arange(1, 61))
  assert sampled.num_epochs == 3 and sampled.max_seq_len == 11 and tokens.dtype == np.uint8
  for k in range(3):
    index = sampled.epoch(k)
    assert len(index.inst_len) == 2 + 8  # big capped at 2, small twice
    first_tokens = tokens[index.inst_start]
    assert sum(first_tokens <= 40) == 2 and sum(first_tokens > 40) == 8
    np.testing.assert_array_equal(index.resp_start, index.inst_start + index.inst_len)
    assert results[k] == dict(rows=10, tokens=int(index.inst_len.sum() + index.resp_len.sum()))
  assert sampled.metadata['total_length'] == 2 * 8 + 8 * 5
  assert stages.epoch(dict(out=str(out), epoch=0, sources=plan, seed=0, context=11,
                           min_resp_length=2)) == results[0]  # done: nothing written again
  assert not [n for n in os.listdir(out) if n.endswith('.tmp')]
