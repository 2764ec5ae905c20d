"""Runs tasks through the model's two callables in batches and averages their metrics.

  generate_fn(requests) -> list[str]: each request {instruction, condition, max_new_tokens};
      returns the greedy response text (without EOA).
  loglik_fn(requests) -> list[(float, bool)]: each request {instruction, condition, response};
      returns the summed log-prob of the response tokens and whether greedy decoding reproduces it.
"""

import collections
from collections.abc import Callable, Sequence

import numpy as np
import tqdm

from hrmtext.evals.tasks import Example, Task

GenerateFn = Callable[[list[dict]], list[str]]
LoglikFn = Callable[[list[dict]], list[tuple[float, bool]]]


def evaluate(tasks: Sequence[Task], generate_fn: GenerateFn | None,
             loglik_fn: LoglikFn | None, *, limit: int | None = None, batch_size: int = 32,
             progress: bool = True) -> dict[str, dict]:
  """Scores the first `limit` examples (all if None) of each task.

  Returns {task name: {'n': examples scored, <metric>: mean over examples, ...}}; a task whose
  examples have subsets (MMLU subjects) also gets '<metric>_macro' (the mean over subsets) and
  'subsets': {subset: {'n', <metric>, ...}}. A callable no task needs may be None.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  names = [task.name for task in tasks]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f'task names must be unique, repeated: {repeated}')
  model_fns = {'generate': generate_fn, 'loglik': loglik_fn}
  for task in tasks:
    if model_fns[task.request_type] is None:
      raise ValueError(f'task {task.name!r} needs a {task.request_type}_fn')

  results = {}
  for task in tasks:
    examples = list(task.examples)[:limit]
    outputs = _run_batched(task.name, [task.requests(e) for e in examples],
                           model_fns[task.request_type], batch_size, progress)
    results[task.name] = _aggregate(examples, [task.score(e, o) for e, o in zip(examples, outputs)])
  return results


def _run_batched(name, requests_per_example, model_fn, batch_size, progress) -> list[list]:
  """All requests of a task through `model_fn`, `batch_size` at a time; outputs per example."""
  requests = [r for example_requests in requests_per_example for r in example_requests]
  outputs = []
  with tqdm.tqdm(total=len(requests), desc=name, unit='request', disable=not progress,
                 leave=False) as bar:
    for start in range(0, len(requests), batch_size):
      batch = requests[start:start + batch_size]
      batch_outputs = list(model_fn(batch))
      if len(batch_outputs) != len(batch):
        raise ValueError(f'{name}: the model returned {len(batch_outputs)} outputs '
                         f'for {len(batch)} requests')
      outputs.extend(batch_outputs)
      bar.update(len(batch))
  per_example, start = [], 0
  for example_requests in requests_per_example:
    per_example.append(outputs[start:start + len(example_requests)])
    start += len(example_requests)
  return per_example


def _mean_metrics(scores: list[dict[str, float]]) -> dict:
  keys = dict.fromkeys(key for score in scores for key in score)
  return {'n': len(scores), **{key: float(np.mean([s[key] for s in scores])) for key in keys}}


def _aggregate(examples: list[Example], scores: list[dict[str, float]]) -> dict:
  result = _mean_metrics(scores)
  by_subset = collections.defaultdict(list)
  for example, score in zip(examples, scores):
    by_subset[example.subset].append(score)
  if set(by_subset) - {''}:
    subsets = {subset: _mean_metrics(by_subset[subset]) for subset in sorted(by_subset)}
    for key in [k for k in result if k != 'n']:
      result[f'{key}_macro'] = float(np.mean([s[key] for s in subsets.values()]))
    result['subsets'] = subsets
  return result


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
  """{'<task>/<metric>': value} for logging (subset details and counts left out)."""
  return {f'{task}/{key}': value for task, metrics in results.items()
          for key, value in metrics.items() if key not in ('n', 'subsets')}


def format_table(results: dict[str, dict]) -> str:
  """A plain-text table: one row per task, its example count and every metric ('-' if none)."""
  columns = list(dict.fromkeys(key for metrics in results.values() for key in metrics
                               if key not in ('n', 'subsets')))
  rows = [['task', 'n', *columns]]
  for task, metrics in results.items():
    rows.append([task, str(metrics['n']),
                 *(f'{metrics[c]:.4f}' if c in metrics else '-' for c in columns)])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = []
  for row in rows:
    cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    lines.append('  '.join(cells).rstrip())
  return '\n'.join(lines)
