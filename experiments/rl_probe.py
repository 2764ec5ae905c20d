r"""What RL can move in a run: per task of its RL prompts, the policy's greedy and sampled answers.

  python experiments/rl_probe.py runs/tiny --tasks count_bits,gcd,syllogism

RL (hrmtext.rl) reinforces answers the policy samples. Where the sampled answers do not depend on
the prompt, it can only trade one constant answer for another. The table gives, on the first
`--prompts` prompts of each task (the run's built-in RL split unless --prompts_file), with
`--group` samples each at temperature 1 (the RL default): greedy and sampled exact match of the
answer, pass@G (a group holds a correct answer), `independent` (the exact match of a policy that
samples the same answers whatever the prompt: the sum over answers of their sampled share times
their share of the correct answers) and `dependence`, sampled minus independent: 0 when the
answers ignore the prompt.
"""
import argparse
import collections
import sys

import numpy as np

from hrmtext.errors import UserError
from hrmtext.infer import Sampling
from hrmtext.infer.text import load
from hrmtext.rl import prompts as rl_prompts
from hrmtext.run import Run


def probe(engine, tok, rows: list[dict], *, group: int, max_new_tokens: int,
          seed: int) -> dict:
  """The table's numbers for one task's rows."""
  answers = [str(r['answer']).strip() for r in rows]
  instructions = [tok.encode_instruction(r['instruction'], r['condition']) for r in rows]
  decode = lambda ids: tok.decode(ids).strip()
  greedy = [decode(x) for x in engine.generate(instructions, max_new_tokens, Sampling(0.0))]
  sampled = engine.generate([i for i in instructions for _ in range(group)], max_new_tokens,
                            Sampling(1.0), seed=seed,
                            request_seeds=list(range(len(instructions) * group)))
  sampled = np.array([decode(x) for x in sampled]).reshape(len(rows), group)
  hits = sampled == np.array(answers)[:, None]
  share = lambda values: {k: v / len(values) for k, v in collections.Counter(values).items()}
  sampled_share, answer_share = share(sampled.ravel().tolist()), share(answers)
  independent = sum(q * answer_share.get(a, 0.0) for a, q in sampled_share.items())
  return {'greedy': np.mean([g == a for g, a in zip(greedy, answers)]),
          'sampled': hits.mean(), f'pass@{group}': hits.any(1).mean(),
          'independent': independent, 'dependence': hits.mean() - independent}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('run', help='a trained run (its EMA weights)')
  parser.add_argument('--tasks', default='', help='comma-separated tasks (default: all)')
  parser.add_argument('--prompts_file', default='',
                      help='JSONL/Parquet prompt rows (default: the run\'s built-in RL split)')
  parser.add_argument('--prompts', type=int, default=128, help='prompts per task')
  parser.add_argument('--group', type=int, default=8, help='samples per prompt')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if min(args.prompts, args.group, args.max_new_tokens) < 1:
    parser.error('--prompts, --group and --max_new_tokens must be >= 1')
  try:
    run = Run(args.run)
    meta = run.meta()
    path = args.prompts_file
    if not path:
      if not run.data_dir(meta):
        raise UserError(f'{args.run} names no data root: pass --prompts_file')
      path = rl_prompts.builtin_split(run.data_dir(meta))
    by_task = collections.defaultdict(list)
    for row in rl_prompts.load(path, args.tasks):
      if len(by_task[row['task']]) < args.prompts:
        by_task[row['task']].append(row)
    tok = run.tokenizer(meta)
    if tok is None:
      raise UserError(f'{args.run} keeps no tokenizer')
    longest = max(len(tok.encode_instruction(r['instruction'], r['condition']))
                  for rows in by_task.values() for r in rows)
    engine, tok, _ = load(args.run, slots=256, max_len=longest + args.max_new_tokens)
  except (UserError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  columns = ['greedy', 'sampled', f'pass@{args.group}', 'independent', 'dependence']
  print('| task | ' + ' | '.join(columns) + ' |')
  print('|---' * (len(columns) + 1) + '|')
  for task in sorted(by_task):
    result = probe(engine, tok, by_task[task], group=args.group,
                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f'| {task} | ' + ' | '.join(f'{result[c]:+.3f}' if c == 'dependence' else
                                      f'{result[c]:.3f}' for c in columns) + ' |', flush=True)


if __name__ == '__main__':
  main()
