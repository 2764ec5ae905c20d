"""Rollouts packed for the policy-gradient step (hrmtext.rl.rollout.training_batch)."""
import numpy as np
import pytest

from hrmtext.data import packing
from hrmtext.rl import objective
from hrmtext.rl.rollout import Group, request_seed, training_batch

EOA = 2


def groups():
  """Two prompts, 2 samples each: rewards (1, 0) and (1, 1); the last response ran out of
  budget (no EOA)."""
  return [
      Group({'instruction': 'a'}, [5, 6, 7], [[10, 11], [12]], np.array([1., 0.]),
            np.array([True, True])),
      Group({'instruction': 'b'}, [8, 9], [[13, 14, 15], [16, 17]], np.array([1., 1.]),
            np.array([True, False])),
  ]


@pytest.mark.parametrize('drop_overlong', [True, False])
def test_responses_are_packed_with_their_advantages_and_weights(drop_overlong):
  batch = training_batch(groups(), EOA, rows=2, seq_len=16, max_segments=4, token_level=True,
                         drop_overlong=drop_overlong)
  assert batch['inputs'].shape == (2, 16) and set(packing.FIELDS) < set(batch)
  labelled = batch['labels'] != packing.IGNORE_LABEL
  # Every response token (and a finished one's EOA) is a label, once.
  got = sorted(batch['labels'][labelled].tolist())
  assert got == sorted([10, 11, EOA, 12, EOA, 13, 14, 15, EOA, 16, 17])
  # Group 1: advantages +1, -1; group 2 (equal rewards): 0.
  advantage_of = {10: 1, 11: 1, 12: -1, 13: 0, 14: 0, 15: 0, 16: 0, 17: 0}
  for label, advantage in zip(batch['labels'][labelled], batch['advantages'][labelled]):
    if label != EOA:
      assert advantage == pytest.approx(advantage_of[label], abs=1e-5)
  # Token-level weights: one over the kept responses' tokens (the overlong one's 2 dropped).
  kept_tokens = 11 - (2 if drop_overlong else 0)
  weight_of = {label: w for label, w in zip(batch['labels'][labelled], batch['weights'][labelled])}
  assert weight_of[10] == pytest.approx(1 / kept_tokens)
  assert weight_of[16] == pytest.approx(0 if drop_overlong else 1 / kept_tokens)
  assert batch['weights'].sum() == pytest.approx(1, rel=1e-6)
  assert np.all(batch['weights'][~labelled] == 0) and np.all(batch['advantages'][~labelled] == 0)


def test_sequence_level_weights_average_the_responses():
  batch = training_batch(groups(), EOA, rows=2, seq_len=16, max_segments=4, token_level=False,
                         drop_overlong=True)
  labelled = batch['labels'] != packing.IGNORE_LABEL
  weight_of = dict(zip(batch['labels'][labelled].tolist(), batch['weights'][labelled]))
  # 3 kept responses of 3, 2 and 4 tokens (EOA included): each weighs 1/3 in all.
  assert weight_of[10] == pytest.approx(1 / 9) and weight_of[12] == pytest.approx(1 / 6)
  assert weight_of[13] == pytest.approx(1 / 12)
  assert batch['weights'].sum() == pytest.approx(1, rel=1e-6)


def test_responses_that_do_not_fit_are_left_out():
  batch = training_batch(groups(), EOA, rows=1, seq_len=8, max_segments=4, token_level=True,
                         drop_overlong=True)
  assert batch['weights'].sum() == pytest.approx(1, rel=1e-6)  # normalised over what is in
  assert objective.token_weights(np.array([3, 0]), True).tolist() == [pytest.approx(1 / 3), 0]


def test_request_seeds_are_distinct_per_step_prompt_and_sample():
  seeds = {request_seed(s, p, g) for s in range(50) for p in range(64) for g in range(8)}
  assert len(seeds) == 50 * 64 * 8
  # 32-bit (the engine's uint32 seeds) at any step; the product of the old formula overflowed
  # after step 42 of the tiny config.
  assert all(0 <= request_seed(s, p, g) < 2**32 for s in (43, 10**6, 10**9) for p in (0, 511)
             for g in (0, 15))
