"""RL prompts: rows {instruction, condition, answer, verifier, task, ...} from JSONL/Parquet files,
and the prompts of each step as a pure function of (seed, step, attempt), so a resumed run draws
what the uninterrupted one drew without keeping a cursor.

`prepare` writes the built-in corpus's split to <data root>/raw/rl/<task>.jsonl (disjoint from the
training and held-out rows; hrmtext.data.builtin). User files: rows with `instruction` and `answer`
(and optionally `condition`, `verifier`, `task`; the task defaults to the file's name).
"""
import os

import numpy as np

from hrmtext.data.sources import SUFFIXES, read_objects, source_name
from hrmtext.errors import UserError
from hrmtext.rl import rewards


def builtin_split(data_root: str) -> str:
  return os.path.join(data_root, 'raw', 'rl')


def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise UserError(f'RL prompts: no such file or folder {path}')
  return sorted(os.path.join(path, name) for name in os.listdir(path)
                if name.endswith(tuple(SUFFIXES)))


def load(path: str, tasks: str = '') -> list[dict]:
  """The prompt rows of the file or folder `path`, of the comma-separated `tasks` only (all when
  empty), each checked: UserError for a row without its instruction or answer, an unknown
  verifier, a task that has no rows."""
  files = _files(path)
  if not files:
    raise UserError(f'RL prompts: no {" or ".join(SUFFIXES)} file in {path}')
  wanted = [t for t in tasks.split(',') if t]
  rows = []
  for file in files:
    task = source_name(file)
    for n, row in enumerate(read_objects(file), 1):
      row = {'task': task, 'condition': 'direct', 'verifier': 'exact', **row}
      if not isinstance(row.get('instruction'), str) or 'answer' not in row:
        raise UserError(f'{file}: row {n} needs an "instruction" string and an "answer"')
      rewards.verifier(row['verifier'])  # a bad name fails now, not at the first rollout
      if not wanted or row['task'] in wanted:
        rows.append(row)
  missing = sorted(set(wanted) - {r['task'] for r in rows})
  if missing:
    raise UserError(f'RL prompts in {path}: no rows of task(s) {", ".join(missing)}')
  return rows


def step_prompts(num_rows: int, count: int, *, seed: int, step: int, attempt: int) -> list[int]:
  """Indices of the `count` prompts of `step`'s `attempt`-th draw (dynamic sampling draws again
  when too few groups are informative): distinct within a draw, uniform over the rows."""
  rng = np.random.default_rng([seed, step, attempt])
  return rng.choice(num_rows, size=count, replace=count > num_rows).tolist()
