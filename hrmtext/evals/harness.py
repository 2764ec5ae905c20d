"""Runs tasks through the model's two callables in batches and averages their metrics.

  generate_fn(requests) -> list[str]: each request {instruction, condition, max_new_tokens,
      max_context, temperature, seed}; returns the response text (without EOA). `seed` picks the
      request's own random stream (sampled tasks): outputs do not depend on batching.
  loglik_fn(requests) -> list[(float, bool)]: each request {instruction, condition, response};
      returns the summed log-prob of the response tokens and whether greedy decoding reproduces it.
"""

import collections
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import tqdm

from hrmtext.evals.tasks import Task

GenerateFn = Callable[[list[dict]], list[str]]
LoglikFn = Callable[[list[dict]], list[tuple[float, bool]]]


def evaluate(tasks: Sequence[Task], generate_fn: GenerateFn | None,
             loglik_fn: LoglikFn | None, *, limit: int | None = None, batch_size: int = 256,
             seed: int = 0, progress: bool = True, records: dict | None = None) -> dict[str, dict]:
  """Scores the first `limit` examples (all if None) of each task.

  Returns {task name: {'n': examples scored, <metric>: mean, ...}}. A task whose examples have
  subsets (MMLU subjects, MATH types) also gets 'subsets': {subset: {'n', <metric>, ...}}; for a
  `macro` task (MMLU) each metric is the mean over subsets and '<metric>_micro' the mean over
  examples. A callable no task needs may be None. With `records` (a dict), records[task] gets one
  {instruction, condition, target, outputs, scores} per example.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  names = [task.name for task in tasks]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f'task names must be unique, repeated: {repeated}')
  model_fns = {'generate': generate_fn, 'loglik': loglik_fn}
  results = {}
  for task in tasks:
    examples = list(task.examples)[:limit]
    per_example = [task.requests(e) for e in examples]
    for kind in {r['kind'] for requests in per_example for r in requests}:
      if model_fns[kind] is None:
        raise ValueError(f'task {task.name!r} needs a {kind}_fn')
    outputs = _run(task.name, per_example, model_fns, batch_size, _task_seed(seed, task.name),
                   progress)
    scores = [task.score(e, o) for e, o in zip(examples, outputs)]
    results[task.name] = _aggregate(examples, scores, task.macro)
    if records is not None:
      records[task.name] = [
          {'instruction': e.instruction, 'condition': e.condition, 'target': e.target,
           'outputs': o, 'scores': s} for e, o, s in zip(examples, outputs, scores)]
  return results


def _task_seed(seed: int, name: str) -> int:
  return zlib.crc32(f'{seed}/{name}'.encode()) & 0x7FFFFFFF


def _run(name, per_example, model_fns, batch_size, seed, progress) -> list[list]:
  """Every request of a task through its kind's model function, `batch_size` at a time (each
  generate request numbered by a seed of its own); the outputs per example."""
  flat = [(i, j, r) for i, requests in enumerate(per_example) for j, r in enumerate(requests)]
  outputs = [[None] * len(requests) for requests in per_example]
  with tqdm.tqdm(total=len(flat), desc=name, unit='request', disable=not progress,
                 leave=False) as bar:
    for kind in ('generate', 'loglik'):
      places = [(i, j) for i, j, r in flat if r['kind'] == kind]
      requests = [{k: v for k, v in r.items() if k != 'kind'} for _, _, r in flat
                  if r['kind'] == kind]
      if kind == 'generate':
        requests = [r | {'seed': (seed + number) & 0x7FFFFFFF} for number, r in enumerate(requests)]
      for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        batch_outputs = list(model_fns[kind](batch))
        if len(batch_outputs) != len(batch):
          raise ValueError(f'{name}: the model returned {len(batch_outputs)} outputs '
                           f'for {len(batch)} requests')
        for (i, j), output in zip(places[start:start + batch_size], batch_outputs):
          outputs[i][j] = output
        bar.update(len(batch))
  return outputs


def _mean_metrics(scores: list[dict[str, float]]) -> dict:
  keys = dict.fromkeys(key for score in scores for key in score)
  return {'n': len(scores), **{key: float(np.mean([s[key] for s in scores])) for key in keys}}


def _aggregate(examples, scores: list[dict[str, float]], macro: bool) -> dict:
  result = _mean_metrics(scores)
  by_subset = collections.defaultdict(list)
  for example, score in zip(examples, scores):
    by_subset[example.subset].append(score)
  if set(by_subset) - {''}:
    subsets = {subset: _mean_metrics(by_subset[subset]) for subset in sorted(by_subset)}
    if macro:
      for key in [k for k in result if k != 'n']:
        result[f'{key}_micro'] = result[key]
        result[key] = float(np.mean([s[key] for s in subsets.values()]))
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
  return _align(rows)


def paper_table(results: dict[str, dict], headlines: dict[str, str],
                columns: Sequence[tuple[str, str]]) -> dict[str, float | None]:
  """{paper column: headline metric of its benchmark in percent, None if not run}."""
  return {column: (100 * results[name][headlines[name]] if name in results else None)
          for column, name in columns}


def format_paper_table(table: dict[str, float | None]) -> str:
  """Two lines: the paper's columns and the values in percent ('-': not run)."""
  values = ['-' if v is None else f'{v:.1f}' for v in table.values()]
  widths = [max(len(name), len(value)) for name, value in zip(table, values)]
  return '\n'.join('  '.join(cell.rjust(w) for cell, w in zip(row, widths))
                   for row in (list(table), values))


def _align(rows: list[list[str]]) -> str:
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = []
  for row in rows:
    cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
    lines.append('  '.join(cells).rstrip())
  return '\n'.join(lines)
