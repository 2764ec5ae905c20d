"""Built-in corpus: short, verifiable reasoning_gym tasks, generated deterministically from a seed.

Training rows come from seed `seed`; held-out rows from a disjoint seed, deduplicated against the
training instructions, and (gsm_symbolic) from templates that training never sees. Rows are written
as JSONL: `<raw>/train/<task>.jsonl` and `<raw>/heldout/<task>.jsonl` (held-out rows also carry
`task` and the short final `answer`, for exact-match evals).
"""

import itertools
import os

import ml_collections
import numpy as np
import reasoning_gym
from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok as GSM_TEMPLATES
from tqdm import tqdm

from hrmtext.data.sources import read_rows, write_jsonl

HELDOUT_SEED_OFFSET = 1_000_003  # far above any per-task count, so item seeds never overlap
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
    yield dict(instruction=item['question'], response=response, condition=task_cfg.condition,
               task=task, answer=answer)


def train_rows(task: str, task_cfg: ml_collections.ConfigDict, seed: int,
               heldout_templates: set[int]) -> list[dict]:
  templates = set(GSM_TEMPLATES) - heldout_templates
  rows = _generated_rows(task, task_cfg, seed, 4 * task_cfg.count + 64, templates)
  return list(itertools.islice(rows, task_cfg.count))


def heldout_rows(task: str, task_cfg: ml_collections.ConfigDict, seed: int,
                 heldout_templates: set[int], train_instructions: set[str],
                 count: int) -> list[dict]:
  """Up to `count` rows from a disjoint seed, with instructions unseen in training and unique."""
  seen = set(train_instructions)

  def unseen(rows):
    for row in rows:
      if row['instruction'] not in seen:
        seen.add(row['instruction'])
        yield row

  rows = _generated_rows(task, task_cfg, seed + HELDOUT_SEED_OFFSET,
                         _HELDOUT_TRIES_PER_ROW * count + 1000, heldout_templates)
  return list(itertools.islice(unseen(rows), count))


def write_builtin_corpus(raw_dir: str, builtin_cfg: ml_collections.ConfigDict, seed: int) -> None:
  """Writes the train and held-out JSONL file of every task; existing files are kept."""
  os.makedirs(os.path.join(raw_dir, 'train'), exist_ok=True)
  os.makedirs(os.path.join(raw_dir, 'heldout'), exist_ok=True)
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
      write_jsonl(heldout_path, heldout)
