"""Rollouts: G sampled responses per prompt from the inference engine, on the parameters being
trained, and the packed batch the policy-gradient step learns from.

A response is sampled as generation samples it: the instruction (with its condition tags) is the
bidirectional prefix, the response is decoded causally until the end-of-answer token or the token
budget. Each request draws from its own random stream, `seed` folded with (step, prompt, sample),
so a rollout is a pure function of the parameters, the prompts and the step: a resumed run samples
what the uninterrupted one did.
"""
import dataclasses

import numpy as np

from hrmtext.data import packing
from hrmtext.data.layout import Index
from hrmtext.infer import Engine, Sampling
from hrmtext.rl import objective, rewards


@dataclasses.dataclass
class Group:
  """A prompt and its G sampled responses (token ids, EOA excluded), their rewards and whether
  each ended with the end-of-answer token (else it ran out of budget: overlong)."""
  row: dict
  instruction: list[int]
  responses: list[list[int]]
  rewards: np.ndarray
  finished: np.ndarray


def request_seed(step: int, prompt: int, sample: int) -> int:
  """The random stream of one sampled response (the engine folds it into the run's seed): a
  32-bit hash of (step, prompt, sample), for any step."""
  return int(np.random.SeedSequence([step, prompt, sample]).generate_state(1)[0])


def sample_groups(engine: Engine, tokenizer, rows: list[dict], *, group_size: int,
                  sampling: Sampling, max_new_tokens: int, seed: int, step: int,
                  first_prompt: int = 0) -> list[Group]:
  """`group_size` responses to each prompt row, rewarded by the row's verifier. `first_prompt`:
  the rows' position in the step's prompt stream (for their random streams)."""
  instructions = [tokenizer.encode_instruction(r['instruction'], r.get('condition') or 'direct')
                  for r in rows]
  prompts = [ids for ids in instructions for _ in range(group_size)]
  seeds = [request_seed(step, first_prompt + p, g) for p in range(len(rows))
           for g in range(group_size)]
  responses = engine.generate(prompts, max_new_tokens, sampling, seed=seed, request_seeds=seeds)
  groups = []
  for p, row in enumerate(rows):
    mine = responses[p * group_size:(p + 1) * group_size]
    groups.append(Group(
        row, instructions[p], mine,
        np.array([rewards.reward(tokenizer.decode(r), row) for r in mine], np.float32),
        np.array([len(r) < max_new_tokens for r in mine])))
  return groups


def training_batch(groups: list[Group], eoa: int, *, rows: int, seq_len: int, max_segments: int,
                   token_level: bool, drop_overlong: bool) -> dict[str, np.ndarray]:
  """The groups' responses packed into `rows` rows of `seq_len`, at most `max_segments` a row (as
  the trainer packs data: the instruction as the prefix, labels on the response, a finished
  response's EOA included), with per-token `advantages` and `weights`
  (objective.token_weights; 0 for padding and for dropped overlong responses). Responses that do
  not fit are left out."""
  group_size = len(groups[0].responses)
  advantages = objective.group_advantages(np.concatenate([g.rewards for g in groups]),
                                          group_size)
  instruction, response, finished = [], [], []
  for g in groups:
    for r, done in zip(g.responses, g.finished):
      instruction.append(g.instruction)
      response.append(r + [eoa] if done else r)
      finished.append(done)
  index = Index.from_lengths([len(i) for i in instruction], [len(r) for r in response])
  tokens = np.concatenate([np.concatenate([i, r]) for i, r in zip(instruction, response)])
  lengths = packing.packed_lengths(index, seq_len)
  plan = packing.pack(lengths, seq_len, window_rows=rows, max_segments=max_segments)
  packed_rows = plan.rows(range(min(rows, plan.num_rows)))
  packed_rows += [np.zeros(0, np.int64)] * (rows - len(packed_rows))
  batch = packing.pack_rows(tokens.astype(np.int32), index, lengths, packed_rows, seq_len,
                            max_segments=max_segments)
  kept = np.zeros(len(response), bool)
  kept[np.concatenate(packed_rows).astype(int)] = True
  keep = kept & (np.array(finished) | (not drop_overlong))
  # The labels of a response in its row: its tokens, fewer where the row cut it.
  labelled = np.maximum(0, lengths - (index.inst_len - 1))
  weights = objective.token_weights(labelled, token_level, keep)
  # Per token: its response's advantage and weight (segment k of a row is its k-th example).
  example = np.full(batch['segment_ids'].shape, -1)
  for r, ids in enumerate(packed_rows):
    for k, e in enumerate(ids):
      example[r, batch['segment_ids'][r] == k + 1] = e
  responding = (example >= 0) & (batch['labels'] != packing.IGNORE_LABEL)
  safe = np.maximum(example, 0)
  batch['advantages'] = np.where(responding, advantages[safe], 0).astype(np.float32)
  batch['weights'] = np.where(responding, weights[safe], 0).astype(np.float32)
  return batch
