"""python -m hrmtext.evaluate --checkpoint runs/tiny [--benchmarks mmlu=test.parquet,...]
    [--shots mmlu=dev.parquet,...] [--output_dir results/]

Evaluates a checkpoint (EMA weights by default) on the built-in held-out tasks of the data it
was trained on (exact match per task) and on public benchmarks from local files, with the HRM-Text
reference protocol (hrmtext.evals.loaders): GSM8K, MATH, DROP, MMLU, ARC (-Challenge), HellaSwag,
Winogrande, BoolQ greedy; AIME sampled (--samples at --temperature, maj_pass@k and pass@k).
Few-shot benchmarks take their shots from the reference's split via --shots (MMLU dev, ARC
validation, HellaSwag/Winogrande/BoolQ train, DROP its 3 fixed passages); without a shots file
the first rows of the evaluated file become the shots and are not scored.

Prints a per-task table with every metric and the paper's table (headline metrics in percent,
the paper's column order); --output_dir writes both to results.json and each task's per-example
outputs to outputs/<task>.jsonl.
"""
import json
import os

from absl import flags

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.evals import (BENCHMARKS, FEW_SHOT, PAPER_TABLE, evaluate, format_paper_table,
                           format_table, heldout_tasks, load_benchmark, paper_table)
from hrmtext.evals.engine import model_fns
from hrmtext.files import atomic_open, check_writable
from hrmtext.infer import flags as infer_flags
from hrmtext.infer.engine import Engine
from hrmtext.run import Run

flags.adopt_module_key_flags(infer_flags)  # --help lists the shared flags too
HELDOUT = flags.DEFINE_string('heldout', '', 'Prepared data root with raw/heldout/ to evaluate '
                              '(default without --benchmarks: the data root the run trained on); '
                              '"none" to skip.')
BENCHMARK_FILES = flags.DEFINE_list(
    'benchmarks', [], f'name=path pairs (a file or a folder of them); names: {", ".join(BENCHMARKS)}.')
SHOTS = flags.DEFINE_list('shots', [], f'name=path pairs: the few-shot split of a benchmark '
                          f'({", ".join(FEW_SHOT)}), e.g. mmlu=mmlu_dev.parquet.')
LIMIT = flags.DEFINE_integer('limit', None, 'Examples per task at most.')
LOGLIK_CHOICES = flags.DEFINE_bool('loglik_choices', True, 'Multiple choice: also rank the '
                                   'choices by log-likelihood (ll_acc, ll_acc_norm columns).')
SAMPLES = flags.DEFINE_integer('samples', 256, 'AIME: samples per problem.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.6, 'AIME: sampling temperature.')
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed (each request draws its own stream).')
OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Write results.json and outputs/<task>.jsonl '
                                 'here (created if missing).')


def default_heldout(meta: dict) -> list:
  """The held-out tasks of the data root the run trained on (none for an imported run)."""
  root = Run(infer_flags.CHECKPOINT.value).data_dir(meta)
  if root is None:
    return []
  if not os.path.isdir(root):
    raise UserError(f'the data the run trained on, {root}, is gone (moved or deleted?): give '
                    f'--heldout DIR (its new place) or --benchmarks')
  return heldout_tasks(root)


def name_path_pairs(specs: list[str], flag: str) -> dict[str, str]:
  pairs = {}
  for spec in specs:
    name, _, path = spec.partition('=')
    if not name or not path:
      raise UserError(f'--{flag} entry {spec!r} is not name=path')
    if name in pairs:
      raise UserError(f'--{flag} names {name!r} twice')
    pairs[name] = path
  return pairs


def benchmark_tasks() -> list:
  files, shots = name_path_pairs(BENCHMARK_FILES.value, 'benchmarks'), name_path_pairs(SHOTS.value,
                                                                                      'shots')
  for name in shots:
    if name not in FEW_SHOT:
      raise UserError(f'--shots {name}: only few-shot benchmarks take shots '
                      f'({", ".join(FEW_SHOT)})')
    if name not in files:
      raise UserError(f'--shots {name}: not in --benchmarks')
  tasks = []
  for name, path in files.items():
    kwargs = {}
    if name in shots:
      kwargs['shots_path'] = shots[name]
    if name in FEW_SHOT and name != 'drop':
      kwargs['loglik'] = LOGLIK_CHOICES.value
    if name == 'aime':
      kwargs.update(samples=SAMPLES.value, temperature=TEMPERATURE.value)
    tasks.append(load_benchmark(name, path, **kwargs))
  return tasks


def fitting_engine(engine: Engine, tasks) -> Engine:
  """The engine with room for the longest max_context the tasks ask for (unless --max_len)."""
  contexts = [task.max_context for task in tasks if task.max_context]
  if infer_flags.MAX_LEN.value or not contexts or max(contexts) <= engine.max_len:
    return engine
  return Engine(engine.model, engine.params, eoa=engine.eoa, slots=engine.slots,
                max_len=max(contexts), vocab_size=engine.vocab_size,
                cache_dtype=engine.cache_dtype, mesh=engine.mesh)


def write_json(path: str, obj, lines: bool = False) -> None:
  with atomic_open(path) as f:
    if lines:
      f.writelines(json.dumps(row) + '\n' for row in obj)
    else:
      json.dump(obj, f, indent=2)


def main(_):
  if LIMIT.value is not None and LIMIT.value < 1:
    raise UserError('--limit must be >= 1')
  if OUTPUT_DIR.value:
    check_writable(OUTPUT_DIR.value, folder=True)
  tasks = benchmark_tasks()
  engine, tok, meta = infer_flags.load()
  if HELDOUT.value not in ('', 'none'):
    tasks = heldout_tasks(HELDOUT.value) + tasks
  elif not HELDOUT.value and not tasks:
    tasks = default_heldout(meta)
  if not tasks:
    raise UserError('no tasks: no held-out data found and no --benchmarks given')
  for condition in {example.condition for task in tasks for example in task.examples}:
    tok.condition_tag_ids(condition)  # an unknown tag fails now, not after hours of work
  engine = fitting_engine(engine, tasks)
  records = {}
  results = evaluate(tasks, *model_fns(engine, tok), limit=LIMIT.value, seed=SEED.value,
                     records=records)
  table = paper_table(results, {task.name: task.headline for task in tasks}, PAPER_TABLE)
  print(format_table(results))
  print()
  print(format_paper_table(table))
  if OUTPUT_DIR.value:
    os.makedirs(os.path.join(OUTPUT_DIR.value, 'outputs'), exist_ok=True)
    for name, rows in records.items():
      write_json(os.path.join(OUTPUT_DIR.value, 'outputs', f'{name}.jsonl'), rows, lines=True)
    write_json(os.path.join(OUTPUT_DIR.value, 'results.json'),
               {'paper_table': table, 'headline': {t.name: t.headline for t in tasks},
                'results': results})
    print(f'wrote {os.path.join(OUTPUT_DIR.value, "results.json")}')


if __name__ == '__main__':
  cli.run(main)
