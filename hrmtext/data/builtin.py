"""Built-in corpus: short, verifiable reasoning_gym tasks, generated deterministically from a seed.

Training rows come from seed `seed`; held-out rows from a disjoint seed, deduplicated against the
training instructions, and (gsm_symbolic) from templates that training never sees. Rows are written
as JSONL: `<raw>/train/<task>.jsonl` and `<raw>/heldout/<task>.jsonl` (held-out rows also carry
`task` and the short final `answer`, for exact-match evals). `<raw>/rl/<task>.jsonl` holds prompts
for reinforcement learning (`hrmtext.rl`): from a third seed, disjoint from both, each with what
reasoning_gym's verifier needs (`entry`, `verifier` 'builtin').
"""

import itertools
import json
import os

import ml_collections
import numpy as np
import reasoning_gym
from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok as GSM_TEMPLATES
from tqdm import tqdm

from hrmtext.data.sources import read_rows, write_jsonl

HELDOUT_SEED_OFFSET = 1_000_003  # far above any per-task count, so item seeds never overlap
RL_SEED_OFFSET = 2 * HELDOUT_SEED_OFFSET
RL_PROMPTS_PER_TASK = 512
TRAIN_FIELDS = ('instruction', 'response', 'condition')
_HELDOUT_TRIES_PER_ROW = 50  # small problem spaces may not have enough unseen questions


def heldout_gsm_templates(count: int, seed: int) -> set[int]:
  return set(np.random.default_rng(seed).choice(GSM_TEMPLATES, size=count, replace=False).tolist())


def _generated_rows(task, task_cfg, seed, limit, gsm_templates):
  """Yields up to `limit` generated rows; gsm_symbolic only from templates `gsm_templates`."""
  dataset = reasoning_gym.create_dataset(task, seed=seed, size=limit, **task_cfg.params)
  for i in range(limit):
    if task == 'gsm_symbolic' and dataset.task_indices[i] not in gsm_templates:
      continue
    item = dataset[i]
    answer = str(item['answer'])
    response = item['metadata']['answer_cot'] if task_cfg.condition == 'cot' else answer
    # The entry reasoning_gym's verifier reads, JSON-safe (gsm_symbolic's metadata holds
    # Fractions, which its verifier does not read).
    entry = json.loads(json.dumps({k: item[k] for k in ('question', 'answer', 'metadata')},
                                  default=str))
    yield dict(instruction=item['question'], response=response, condition=task_cfg.condition,
               task=task, answer=answer, entry=entry)


def train_rows(task: str, task_cfg: ml_collections.ConfigDict, seed: int,
               heldout_templates: set[int]) -> list[dict]:
  templates = set(GSM_TEMPLATES) - heldout_templates
  rows = _generated_rows(task, task_cfg, seed, 4 * task_cfg.count + 64, templates)
  return list(itertools.islice(rows, task_cfg.count))


def heldout_rows(task: str, task_cfg: ml_collections.ConfigDict, seed: int,
                 heldout_templates: set[int], train_instructions: set[str],
                 count: int) -> list[dict]:
  """Up to `count` rows from a disjoint seed, with instructions unseen in training and unique."""
  return _unseen_rows(task, task_cfg, seed + HELDOUT_SEED_OFFSET, heldout_templates,
                      train_instructions, count)


def rl_rows(task: str, task_cfg: ml_collections.ConfigDict, seed: int, templates: set[int],
            seen_instructions: set[str], count: int) -> list[dict]:
  """Up to `count` RL prompts from a third seed, unseen in training and held out, and unique."""
  return _unseen_rows(task, task_cfg, seed + RL_SEED_OFFSET, templates, seen_instructions, count)


def _unseen_rows(task, task_cfg, seed, templates, seen_instructions, count):
  seen = set(seen_instructions)

  def unseen(rows):
    for row in rows:
      if row['instruction'] not in seen:
        seen.add(row['instruction'])
        yield row

  rows = _generated_rows(task, task_cfg, seed, _HELDOUT_TRIES_PER_ROW * count + 1000, templates)
  return list(itertools.islice(unseen(rows), count))


def write_builtin_corpus(raw_dir: str, builtin_cfg: ml_collections.ConfigDict, seed: int) -> None:
  """Writes the train, held-out and RL JSONL file of every task; existing files are kept."""
  for split in ('train', 'heldout', 'rl'):
    os.makedirs(os.path.join(raw_dir, split), exist_ok=True)
  heldout_templates = heldout_gsm_templates(builtin_cfg.heldout_gsm_templates, seed)
  for task, task_cfg in tqdm(builtin_cfg.tasks.items(), desc='built-in corpus', unit='task'):
    train_path = os.path.join(raw_dir, 'train', f'{task}.jsonl')
    heldout_path = os.path.join(raw_dir, 'heldout', f'{task}.jsonl')
    if not os.path.exists(train_path):
      train = train_rows(task, task_cfg, seed, heldout_templates)
      write_jsonl(train_path, ({k: row[k] for k in TRAIN_FIELDS} for row in train))
    if not os.path.exists(heldout_path):
      instructions = {row['instruction'] for row in read_rows(train_path)}
      heldout = heldout_rows(task, task_cfg, seed, heldout_templates, instructions,
                             builtin_cfg.heldout_per_task)
      write_jsonl(heldout_path, ({k: v for k, v in row.items() if k != 'entry'}
                                 for row in heldout))
    rl_path = os.path.join(raw_dir, 'rl', f'{task}.jsonl')
    if not os.path.exists(rl_path):  # absent from roots prepared before it: re-run prepare
      seen = {row['instruction'] for split in (train_path, heldout_path)
              for row in read_rows(split)}
      # gsm_symbolic's from training's templates: the held-out ones stay unseen.
      templates = set(GSM_TEMPLATES) - heldout_templates
      rows = rl_rows(task, task_cfg, seed, templates, seen, RL_PROMPTS_PER_TASK)
      write_jsonl(rl_path, ({**{k: row[k] for k in ('instruction', 'condition', 'task', 'answer',
                                                      'entry')}, 'verifier': 'builtin'}
                            for row in rows))
