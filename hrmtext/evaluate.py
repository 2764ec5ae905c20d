"""python -m hrmtext.evaluate --checkpoint runs/tiny [--benchmarks gsm8k=PATH,mmlu=PATH]

Evaluates a checkpoint (EMA weights by default) on the built-in held-out tasks of the data it
was trained on (exact match per task) and on public benchmarks from local files (see
hrmtext.evals.loaders for the formats). Prints a per-task table; --output writes JSON.
"""
import json
import os
import sys

from absl import app, flags

from hrmtext.cli import quiet_logs
from hrmtext.evals import evaluate, format_table, heldout_tasks, load_benchmark
from hrmtext.infer import flags as infer_flags, text

HELDOUT = flags.DEFINE_string('heldout', '', 'Prepared data root with raw/heldout/ (default: '
                              'the checkpoint\'s training data); "none" to skip.')
BENCHMARKS = flags.DEFINE_list('benchmarks', [], 'name=path pairs, e.g. gsm8k=gsm8k_test.jsonl.')
LIMIT = flags.DEFINE_integer('limit', None, 'Examples per task at most.')
OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON here.')


def heldout_root(meta: dict) -> str:
  """The prepared root of the training data: the parent of its sampled set."""
  sampled = meta.get('tokenizer', '')
  return os.path.dirname(sampled) if os.path.basename(sampled) == 'sampled' else sampled


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if LIMIT.value is not None and LIMIT.value < 1:
      raise ValueError('--limit must be >= 1')
    infer_flags.check_output(OUTPUT.value)
    engine, tok, meta = infer_flags.load()
    tasks = []
    if HELDOUT.value != 'none':
      tasks += heldout_tasks(HELDOUT.value or heldout_root(meta))
    for spec in BENCHMARKS.value:
      name, _, path = spec.partition('=')
      if not path:
        raise ValueError(f'--benchmarks entry {spec!r} is not name=path')
      tasks.append(load_benchmark(name, path))
    if not tasks:
      raise ValueError('no tasks: no held-out data found and no --benchmarks given')
    generate_fn, loglik_fn = text.model_fns(engine, tok)
    results = evaluate(tasks, generate_fn, loglik_fn, limit=LIMIT.value)
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f'error: {e}')
  print(format_table(results))
  if OUTPUT.value:
    with open(OUTPUT.value + '.tmp', 'w') as f:
      json.dump(results, f, indent=2)
    os.replace(OUTPUT.value + '.tmp', OUTPUT.value)
    print(f'wrote {OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
