r"""The README's RL table and reward curve from the metrics of `python -m hrmtext.rl` runs.

  python experiments/rl_report.py runs/rl_seed0 runs/rl_seed1 --plot experiments/rl_reward.png

Prints, per task, held-out greedy exact match before RL (the run's step-0 eval) and after (its
last eval) for each run, and the mean over tasks; draws each run's mean reward per step (and its
moving average) into the PNG.
"""
import argparse
import json
import os
import sys

import numpy as np


def read_rows(run: str) -> list[dict]:
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.isfile(path):
    sys.exit(f'error: no {path}')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def evals(rows: list[dict]) -> tuple[dict, dict]:
  """({task: exact match} before RL, the same at the last eval)."""
  done = [r for r in rows if 'eval_gen/exact_match' in r]
  if not done or done[0]['step'] != 0 or len(done) < 2:
    sys.exit('error: a run needs its step-0 eval and a later one')
  per_task = lambda row: {k.split('/')[1]: v for k, v in row.items()
                          if k.startswith('eval_gen/') and k.count('/') == 2}
  return per_task(done[0]), per_task(done[-1])


def table(runs: list[str]) -> str:
  results = [evals(read_rows(run)) for run in runs]
  tasks = sorted(results[0][0])
  header = '| task | ' + ' | '.join(f'{os.path.basename(r)} before | after' for r in runs) + ' |'
  lines = [header, '|---' * (1 + 2 * len(runs)) + '|']
  for task in tasks + ['mean']:
    cells = []
    for before, after in results:
      pick = (lambda d: np.mean([d[t] for t in tasks])) if task == 'mean' else (
          lambda d, t=task: d[t])
      cells += [f'{pick(before):.3f}', f'{pick(after):.3f} ({pick(after) - pick(before):+.3f})']
    lines.append(f'| {task} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(runs: list[str], path: str, window: int = 10) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for the plot)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  for run in runs:
    steps, rewards = zip(*[(r['step'], r['reward/mean']) for r in read_rows(run)
                           if 'reward/mean' in r])
    line, = ax.plot(steps, rewards, alpha=0.3)
    if len(rewards) >= window:
      smooth = np.convolve(rewards, np.ones(window) / window, mode='valid')
      ax.plot(steps[window - 1:], smooth, color=line.get_color(),
              label=f'{os.path.basename(run)} ({window}-step mean)')
  ax.set(xlabel='RL step', ylabel='mean reward of the sampled responses')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+', help='RL run directories')
  parser.add_argument('--plot', default='', help='Write the reward curves to this PNG.')
  args = parser.parse_args()
  print(table(args.runs))
  if args.plot:
    plot(args.runs, args.plot)
    print(f'reward curves in {args.plot}')


if __name__ == '__main__':
  main()
