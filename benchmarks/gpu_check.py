r"""One GPU check: environment, attention kernels at real size, train steps beside their prediction,
decode; one JSON (gpu_check.json) and one markdown table (gpu_check.md) in --out.

  python3 benchmarks/gpu_check.py --out OUT          # one H100: under 8 minutes
  python3 benchmarks/gpu_check.py --out OUT --tiny   # CPU-sized, cuDNN rows skipped

Parts, each in its own process with its own time budget (a part that fails or runs out of time is
recorded as such; the others' results stay; both files are rewritten after every part):
  environment  GPU, driver, CUDA and cuDNN versions (as jax sees them), jax/jaxlib, Python.
  attention    hrmtext.model.attention.attention on packed PrefixLM rows (B=4, T=4096, 12 heads of
               128, bf16; row 0 holds exactly --max_segments examples, among them one whose
               response is 1 token (so all its inputs are instruction) and one with a single
               response input): 'cudnn' and 'xla' in bf16 against 'xla' in fp32 (matmuls at
               HIGHEST): output and dq/dk/dv (of a random cotangent) errors on real tokens, each
               relative to the reference's largest absolute value, NaN counts, fwd+bwd ms (median).
  decode       python -m hrmtext.bench_decode (--decode_args).
  train        per --train_runs: python -m hrmtext.bench ... --compile_only --json (memory and
               roofline prediction), then the same timed (--steps, --warmup): tokens/s, MFU, peak
               memory. Both share a JAX compilation cache, so the timed run loads the compile.
The driver imports no jax itself: the parts' processes get the whole device.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from hrmtext import cli
from hrmtext.errors import UserError

FULL_RUNS = ('hrm_XL=--config experiments/hrm.py:XL',
             'hrm_L=--config experiments/hrm.py:L',
             'transformer_L=--config experiments/hrm.py:L --config.model.architecture=transformer')
TINY_RUNS = ('tiny=--config experiments/tiny_cpu.py --config.data.seq_len=256 --rows 2',)
# (full, tiny) defaults of the size flags: --tiny changes those not given.
SIZES = {'batch': (4, 2), 'seq_len': (4096, 256), 'heads': (12, 2), 'head_dim': (128, 64),
         'max_segments': (64, 16), 'steps': (5, 2), 'warmup': (2, 1),
         'decode_args': ('--batch 1,32 --new_tokens 128 --nohf',
                         '--batch 1 --new_tokens 32 --prompt_len 8 --nohf')}

OUT = flags.DEFINE_string('out', None, 'Folder for gpu_check.json and gpu_check.md.')
TINY = flags.DEFINE_bool('tiny', False, 'CPU-sized check (experiments/tiny_cpu.py, T=256, B=2, '
                         '2 heads); the cuDNN rows are skipped where there is no GPU.')
BATCH = flags.DEFINE_integer('batch', 4, 'Attention: rows.')
SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Attention: tokens per row.')
HEADS = flags.DEFINE_integer('heads', 12, 'Attention: heads.')
HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Attention: head size.')
MAX_SEGMENTS = flags.DEFINE_integer('max_segments', 64, 'Attention: examples per row at most '
                                    '(row 0 holds exactly this many).')
REPEATS = flags.DEFINE_integer('repeats', 5, 'Attention: timed fwd+bwd runs (median).')
TOLERANCE = flags.DEFINE_float('tolerance', 0.05, 'Attention: largest relative error that passes.')
SEED = flags.DEFINE_integer('seed', 0, 'Attention: rows and values.')
TRAIN_RUNS = flags.DEFINE_multi_string(
    'train_runs', None, 'NAME=BENCH_ARGS, each a hrmtext.bench run (default: hrm XL, hrm L, '
    'transformer L; --tiny: tiny_cpu).')
BENCH_ARGS = flags.DEFINE_string('bench_args', '', 'More hrmtext.bench flags for every train run, '
                                 'e.g. --config.train.micro_batches=4.')
STEPS = flags.DEFINE_integer('steps', 5, 'Train: timed steps.')
WARMUP = flags.DEFINE_integer('warmup', 2, 'Train: untimed steps.')
DECODE_ARGS = flags.DEFINE_string('decode_args', SIZES['decode_args'][0],
                                  'hrmtext.bench_decode flags.')
BUDGETS = flags.DEFINE_list('budgets_s', ['environment=30', 'attention=90', 'decode=45'],
                            'Seconds each part may take, PART=SECONDS.')
TRAIN_BUDGETS = flags.DEFINE_list(
    'train_budgets_s', ['170', '110', '70'],
    'Seconds per train run, in --train_runs order (the last repeats).')
DEADLINE = flags.DEFINE_integer('deadline_s', 470, 'Seconds for the whole check: a part gets at '
                                'most what is left.')
MIN_PART_S = 5  # a part with less time left than this is skipped
PART_FLAGS = ('batch', 'seq_len', 'heads', 'head_dim', 'max_segments', 'repeats', 'tolerance',
              'seed')  # what the in-process parts read
PART = flags.DEFINE_enum('part', None, ['environment', 'attention'],
                         'Internal: run one in-process part and print its JSON.')


def main(argv):
  del argv
  apply_tiny()
  if PART.value:  # a part's own process
    import gpu_parts  # pylint: disable=g-import-not-at-top (imports jax; beside this file)
    part = {'environment': gpu_parts.environment, 'attention': attention_part}[PART.value]
    print(json.dumps(part()), flush=True)
    return
  if not OUT.value:
    raise UserError('--out is required: the folder for gpu_check.json and gpu_check.md')
  os.makedirs(OUT.value, exist_ok=True)
  Check(OUT.value).run()


def apply_tiny():
  """--tiny: the tiny defaults of the size flags not given."""
  if TINY.value:
    for name, (_, tiny) in SIZES.items():
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = tiny


def attention_part() -> dict:
  import gpu_parts  # pylint: disable=g-import-not-at-top
  return gpu_parts.attention_check(BATCH.value, SEQ_LEN.value, HEADS.value, HEAD_DIM.value,
                                   MAX_SEGMENTS.value, REPEATS.value, SEED.value, TOLERANCE.value)


class Check:
  """The parts in order, the report rewritten after each."""

  def __init__(self, out: str):
    self.out, self.start = out, time.monotonic()
    self.budgets = {k: float(v) for k, v in (b.split('=', 1) for b in BUDGETS.value)}
    settings = {name: flags.FLAGS[name].value for name in (
        'tiny', 'batch', 'seq_len', 'heads', 'head_dim', 'max_segments', 'repeats', 'tolerance',
        'bench_args', 'steps', 'warmup', 'decode_args', 'deadline_s')}
    self.report = {'check': 'gpu_check', 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                   'settings': settings, 'environment': None, 'attention': None,
                   'decode': None, 'train': {}}
    self.cache = tempfile.mkdtemp(prefix='gpu_check_jax_cache_')

  def left(self, budget: float) -> float:
    return min(budget, DEADLINE.value - (time.monotonic() - self.start))

  def run(self):
    try:
      for part in ('environment', 'attention'):
        self.record(part, self.in_process(part))
      self.record('decode', self.decode())
      budgets = [float(b) for b in TRAIN_BUDGETS.value]
      for i, spec in enumerate(TRAIN_RUNS.value or (TINY_RUNS if TINY.value else FULL_RUNS)):
        name, _, args = spec.partition('=')
        self.record(f'train {name}', self.train(args, budgets[min(i, len(budgets) - 1)]))
    finally:
      shutil.rmtree(self.cache, ignore_errors=True)
    print(f'gpu_check: wrote {self.out}/gpu_check.json and gpu_check.md in '
          f'{time.monotonic() - self.start:.0f} s', flush=True)

  def record(self, part: str, result: dict):
    """Keeps a part's result, rewrites the report and says how it went."""
    if part.startswith('train '):
      self.report['train'][part.removeprefix('train ')] = result
    else:
      self.report[part] = result
    self.write()
    print(f'gpu_check: {part} {result["status"]} in {result["seconds"]:.0f} s'
          + (f': {result["error"]}' if result.get('error') else ''), flush=True)

  def in_process(self, part: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), f'--part={part}', *(
        f'--{name}={flags.FLAGS[name].value}' for name in PART_FLAGS)]
    return json_result(run_command(command, self.left(self.budgets.get(part, 60))))

  def decode(self) -> dict:
    command = [sys.executable, '-m', 'hrmtext.bench_decode', *shlex.split(DECODE_ARGS.value)]
    result = run_command(command, self.left(self.budgets.get('decode', 60)))
    if result['status'] != 'ok':
      return failed(result)
    rows = [{key: number_or_text(value) for key, value in (
        field.split('=', 1) for field in line.split()[1:] if '=' in field)}
            for line in result['stdout'].splitlines() if line.startswith('bench: engine=')]
    model = next((line for line in result['stdout'].splitlines()
                  if line.startswith('bench: model')), '')
    return {'status': 'ok', 'seconds': result['seconds'], 'model': model.removeprefix('bench: '),
            'rows': rows}

  def train(self, args: str, budget: float) -> dict:
    """The compile-only run (memory, prediction), then the timed run in what is left."""
    env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': os.environ.get(
        'JAX_COMPILATION_CACHE_DIR', self.cache)}
    bench = [sys.executable, '-m', 'hrmtext.bench', *shlex.split(args),
             *shlex.split(BENCH_ARGS.value), '--json']
    start = time.monotonic()
    compiled = json_result(run_command([*bench, '--compile_only'], self.left(budget), env))
    timed = json_result(run_command(
        [*bench, f'--steps={STEPS.value}', f'--warmup={WARMUP.value}'],
        self.left(budget - (time.monotonic() - start)), env))
    return {'status': timed['status'], 'command': shlex.join(bench[2:]), 'compiled': compiled,
            'measured': timed, 'seconds': time.monotonic() - start}

  def write(self):
    for name, text in (('gpu_check.json', json.dumps(self.report, indent=1, default=str)),
                       ('gpu_check.md', markdown(self.report))):
      path = os.path.join(self.out, name)
      with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(text + '\n')
      os.replace(path + '.tmp', path)


def run_command(command: list, timeout: float, env=None) -> dict:
  """Runs `command` in its own process group, killed with it after `timeout` seconds (not at
  all when less than MIN_PART_S is left)."""
  if timeout < MIN_PART_S:
    return {'status': 'skipped', 'seconds': 0.0, 'stdout': '', 'returncode': None,
            'stderr': 'error: not run: the check reached its --deadline_s', 'timeout_s': timeout}
  start = time.monotonic()
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        env=env, start_new_session=True) as process:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
      status = 'ok' if process.returncode == 0 else 'failed'
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)
      stdout, stderr = process.communicate()
      status = 'timeout'
  return {'status': status, 'seconds': time.monotonic() - start, 'stdout': stdout,
          'stderr': stderr, 'returncode': process.returncode, 'timeout_s': timeout}


def json_result(result: dict) -> dict:
  """The JSON object a process printed on its last stdout line, with status and seconds."""
  if result['status'] == 'ok':
    try:
      return {'status': 'ok', 'seconds': result['seconds'],
              **json.loads(result['stdout'].strip().splitlines()[-1])}
    except (IndexError, json.JSONDecodeError):
      result = {**result, 'status': 'failed'}
  return failed(result)


def failed(result: dict) -> dict:
  """A failed or timed-out part: why, in a line, and the end of its output."""
  lines = (result['stderr'] or result['stdout'] or '').strip().splitlines()
  error = ([l for l in lines if l.startswith('error:')] or lines or ['no output'])[-1]
  if result['status'] == 'timeout':
    error = f'ran past its {result["timeout_s"]:.0f} s budget; last output: {error}'
  return {'status': result['status'], 'seconds': result['seconds'], 'error': error,
          'output_tail': lines[-15:]}


def markdown(report: dict) -> str:
  """The report as one table: part, case, status, result."""
  rows = [environment_row(report['environment'])]
  rows += attention_rows(report['attention'])
  rows += decode_rows(report['decode'])
  rows += [train_row(name, run) for name, run in report['train'].items()]
  lines = [f'# GPU check, {report["started"]}', '',
           '| part | case | status | result |', '|---|---|---|---|']
  lines += [f'| {" | ".join(str(c).replace("|", "/") for c in row)} |' for row in rows if row]
  return '\n'.join(lines)


def environment_row(env):
  if not env or env['status'] != 'ok':
    return ('environment', '', *status_and_error(env))
  keys = ('gpu', 'driver', 'cuda', 'cudnn', 'jax', 'jaxlib', 'cuda_plugin', 'python')
  return ('environment', env.get('device_kind', ''), 'ok',
          ', '.join(f'{k} {env.get(k)}' for k in keys if env.get(k)))


def attention_rows(attention):
  if not attention or attention['status'] != 'ok':
    return [('attention', '', *status_and_error(attention))]
  rows = []
  for r in attention['rows']:
    case = f'{r["implementation"]} {r["dtype"]}' + (' (reference)' if r.get('reference') else '')
    if r['status'] != 'ok':
      rows.append(('attention', case, r['status'], r.get('reason', '')))
      continue
    errors = ', '.join(f'{k} {r[k + "_error"]:.2e}' for k in ('out', 'dq', 'dk', 'dv')
                       if r.get(k + '_error') is not None)
    nans = sum(r['nans'].values())
    rows.append(('attention', case, 'ok' if r.get('passed', True) else 'FAILED',
                 f'{errors + ", " if errors else ""}NaNs {nans}, fwd+bwd {r["fwd_bwd_ms"]:.2f} ms'))
  return rows


def decode_rows(decode):
  if not decode or decode['status'] != 'ok':
    return [('decode', '', *status_and_error(decode))]
  return [('decode', f'batch {r.get("batch")}', 'ok',
           f'{r["decode_tokens_per_s"]:,.0f} tokens/s (first run {r.get("first_run_s")} s)')
          for r in decode['rows'] if 'decode_tokens_per_s' in r]


def train_row(name, run):
  compiled, measured = run['compiled'], run['measured']
  parts = []
  if measured['status'] == 'ok':
    parts.append(f'{measured["tokens_per_s"]:,.0f} tokens/s, MFU {percent(measured.get("mfu"))}, '
                 f'peak {number(measured.get("peak_memory_gib"))} GiB, '
                 f'step {measured["step_s"]:.3f} s')
  else:
    parts.append(f'run {measured["status"]}: {measured.get("error", "")}')
  if compiled['status'] == 'ok':
    memory = (compiled.get('per_device_memory_bytes') or {}).get('total')
    parts.append(f'predicted {number(compiled.get("predicted_tokens_per_s"), ",.0f")} tokens/s, '
                 f'MFU {percent(compiled.get("predicted_mfu"))}, compiled '
                 f'{number(memory and memory / 2**30)} GiB')
  else:
    parts.append(f'compile-only {compiled["status"]}: {compiled.get("error", "")}')
  settings = measured if measured['status'] == 'ok' else compiled
  case = f'{name} ({settings.get("attention", "?")}, micro-batches ' \
         f'{settings.get("micro_batches", "?")}, remat {settings.get("remat_policy", "?")})'
  return ('train', case, run['status'], '; '.join(parts))


def number_or_text(text: str):
  try:
    return int(text)
  except ValueError:
    try:
      return float(text)
    except ValueError:
      return text


def status_and_error(part):
  return ('not run', '') if not part else (part['status'], part.get('error', ''))


def number(value, spec='.2f'):
  return 'n/a' if value is None else format(value, spec)


def percent(value):
  return 'n/a' if value is None else f'{value:.1%}'


if __name__ == '__main__':
  cli.run(main)
