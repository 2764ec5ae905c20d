"""The training entry point end to end, in subprocesses on a tiny model and the reference-layout
fixture: exact resume after kill -9, SIGTERM save-and-exit, init_from fine-tuning, CLI errors.

Helpers for other test files (keep these names stable):
  run_train(workdir, *overrides, env=None, timeout=...) -> subprocess.CompletedProcess
  start_train(workdir, *overrides, env=None) -> subprocess.Popen (output to <workdir>.log)
  read_metrics(workdir) -> {step: row} of <workdir>/metrics.jsonl, train and eval rows merged
  finalized_steps(workdir) -> sorted steps of the committed checkpoints in <workdir>/checkpoints
  TINY: override flags of a tiny model and schedule; tiny_overrides(data_dir, *more) adds the data;
  tiny_config(data_dir): the same as a config, for an in-process Trainer
  make_fixture_data(path): the small learnable dataset (reference layout) the tests train on
"""
import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.data_fixtures import IGNORE_LABEL, write_reference_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'experiments', 'tiny_cpu.py')
SEQ_LEN = 64
ROWS = 4  # packed rows per train step
WINDOW_ROWS = 64  # data.pack_window_rows default
TINY = [
    '--config.model.hidden_size=32', '--config.model.num_heads=2', '--config.model.head_dim=16',
    '--config.model.layers_per_stack=1', '--config.model.H_cycles=1', '--config.model.L_cycles=2',
    '--config.model.vocab_multiple=64',
    f'--config.data.seq_len={SEQ_LEN}', f'--config.train.global_batch_tokens={ROWS * SEQ_LEN}',
    '--config.train.micro_batches=2',
    # One credit horizon (full backprop with 1 H x 2 L cycles): one compile per process.
    '--config.train.horizon.bp_min=3', '--config.train.horizon.bp_max=3',
    '--config.train.steps=12', '--config.train.lr=1e-2', '--config.train.warmup_steps=3',
    '--config.train.ema_decay=0.5',
    '--config.checkpoint.every_steps=4', '--config.checkpoint.keep=2',
    '--config.eval.every_steps=5', '--config.log_every_steps=1',
]


def tiny_overrides(data_dir, *more):
  """TINY on the data at `data_dir`; later flags (`more`) win over earlier ones."""
  return [*TINY, f'--config.data.dir={data_dir}', *more]


def make_fixture_data(path):
  """16 short examples, 2 epochs: batches differ step to step, yet the set is memorizable."""
  return write_reference_dataset(str(path), num_examples=16, epochs=2, vocab_size=300,
                                 max_seq_len=SEQ_LEN + 1, max_inst=12, max_resp=12, seed=0)


def train_env(env=None):
  env = dict(os.environ if env is None else env)
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  return env


def train_command(workdir, *overrides):
  return [sys.executable, '-m', 'hrmtext.train', f'--config={CONFIG}', f'--workdir={workdir}',
          *map(str, overrides)]


def run_train(workdir, *overrides, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *overrides), cwd=REPO, env=train_env(env),
                        capture_output=True, text=True, timeout=timeout)


def start_train(workdir, *overrides, env=None) -> subprocess.Popen:
  """A training process in the background; stdout and stderr go to `<workdir>.log`."""
  log = open(f'{workdir}.log', 'w')
  proc = subprocess.Popen(train_command(workdir, *overrides), cwd=REPO, env=train_env(env),
                          stdout=log, stderr=subprocess.STDOUT, text=True)
  log.close()  # the child holds its own descriptor
  return proc


def log_of(workdir) -> str:
  with open(f'{workdir}.log') as f:
    return f.read()


def metric_rows(workdir) -> list[dict]:
  """Every row of metrics.jsonl in order (a malformed line fails: the file must stay valid)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir) -> dict[int, dict]:
  """{step: row}, a step's train and eval rows merged (a later row wins on shared keys)."""
  rows = {}
  for row in metric_rows(workdir):
    rows.setdefault(row['step'], {}).update(row)
  return rows


def finalized_steps(workdir) -> list[int]:
  """Committed checkpoint steps: Orbax saves into `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` as the last act of a save (after writing commit_success.txt)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def wait_for(condition, proc, what, timeout=240):
  """Polls `condition()` until true; fails if `proc` exits first or time runs out."""
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f'training exited ({proc.returncode}) before {what}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'timed out waiting for {what}')
    time.sleep(0.01)


def assert_ok(result):
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert 'Traceback' not in result.stderr, result.stderr[-5000:]


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0, result.stdout[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-5000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr[-5000:]
  for fragment in fragments:
    assert fragment in last, last


def load(workdir, use_ema):
  from hrmtext.run import Run
  return Run(str(workdir)).load_weights(use_ema=use_ema)


def assert_trees_equal(a, b):
  import jax
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore_opt_step(workdir, step):
  """The optimizer's own update counter (AdamATan2State.step) in a saved checkpoint."""
  import orbax.checkpoint as ocp
  from hrmtext.run import Run
  mngr = Run(str(workdir)).manager(create=False)
  opt_state = mngr.restore(step, args=ocp.args.Composite(
      opt_state=ocp.args.StandardRestore()))['opt_state']
  mngr.close()
  return opt_state


# Every per-step training metric that a resumed run must reproduce exactly.
EXACT_KEYS = ('loss', 'token_accuracy', 'exact_accuracy', 'grad_norm', 'tokens', 'lr', 'bp_steps')
REF_STEPS = 40  # the reference run: long enough to kill mid-run, saves every 5 steps
REF = ['--config.train.steps=40', '--config.checkpoint.every_steps=5']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('train') / 'data'
  make_fixture_data(path)
  return path


@pytest.fixture(scope='module')
def reference_run(data_dir, tmp_path_factory):
  """REF_STEPS uninterrupted steps (async saves, log every step)."""
  workdir = tmp_path_factory.mktemp('train') / 'reference'
  result = run_train(workdir, *tiny_overrides(data_dir, *REF))
  assert_ok(result)
  assert 'done: checkpoints in' in result.stdout
  return workdir


def assert_same_steps(rows, reference, steps):
  for step in steps:
    for key in EXACT_KEYS:
      assert rows[step][key] == reference[step][key], (step, key, rows[step], reference[step])


def test_fixture_trains_memorizes_and_counts_its_tokens(reference_run, data_dir):
  """The reference-layout set is read directly; loss falls on a memorizable set; each step's
  token count is the labelled tokens of that step's packed batch; no held-out data: no eval."""
  from hrmtext.data.pipeline import TrainBatches
  rows = read_metrics(reference_run)
  assert sorted(rows) == list(range(1, REF_STEPS + 1))
  losses = [rows[s]['loss'] for s in sorted(rows)]
  assert all(math.isfinite(x) for x in losses), losses
  assert losses[0] > 0.8 * math.log(300), losses  # starts near uniform over the 300 ids
  assert np.mean(losses[-5:]) < losses[0] / 4, losses
  assert rows[REF_STEPS]['token_accuracy'] > 0.9, rows[REF_STEPS]
  batches = TrainBatches(str(data_dir), seq_len=SEQ_LEN, rows_per_process=ROWS, process_index=0,
                         process_count=1, seed=0, window_rows=WINDOW_ROWS, max_segments=64)
  expected = [int((batches[i]['labels'] != IGNORE_LABEL).sum()) for i in range(REF_STEPS)]
  assert len(set(expected)) > 1  # the batches do differ, so this pins the data order
  assert [rows[s]['tokens'] for s in sorted(rows)] == expected
  assert not any(key.startswith('eval/') for row in rows.values() for key in row)
  assert finalized_steps(reference_run) == [35, 40]  # keep=2
  assert [r['step'] for r in metric_rows(reference_run)] == list(range(1, REF_STEPS + 1))


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(reference_run, data_dir, tmp_path):
  workdir = tmp_path / 'killed'
  overrides = tiny_overrides(data_dir, *REF)
  proc = start_train(workdir, *overrides)
  wait_for(lambda: any(s >= 5 for s in finalized_steps(workdir)), proc, 'checkpoint 5')
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, log_of(workdir)[-3000:]
  resume_from = finalized_steps(workdir)[-1]
  assert resume_from < REF_STEPS, f'run ended before the kill: {finalized_steps(workdir)}'
  killed_rows = len(metric_rows(workdir))
  assert killed_rows >= resume_from

  result = run_train(workdir, *overrides)
  assert_ok(result)
  assert f'resuming from {workdir / "checkpoints"} step {resume_from}' in result.stdout
  # Rows the killed run logged after its last checkpoint are dropped and logged again: one each.
  logged_steps = [row['step'] for row in metric_rows(workdir)]
  assert logged_steps == list(range(1, REF_STEPS + 1)), logged_steps
  rows, reference = read_metrics(workdir), read_metrics(reference_run)
  assert sorted(rows) == sorted(reference)
  # Every step matches: before the kill (same run), and after the resume (exact restore of
  # params, EMA, optimizer moments and counters, and the data iterator's position).
  assert_same_steps(rows, reference, range(1, REF_STEPS + 1))
  for use_ema in (False, True):
    cfg, params, meta = load(workdir, use_ema)
    ref_cfg, ref_params, ref_meta = load(reference_run, use_ema)
    assert cfg == ref_cfg and meta['step'] == ref_meta['step'] == REF_STEPS
    assert_trees_equal(params, ref_params)

  # Re-running a finished run trains nothing and still exits 0.
  logged = len(metric_rows(workdir))
  assert_ok(run_train(workdir, *overrides))
  assert len(metric_rows(workdir)) == logged
  assert finalized_steps(workdir)[-1] == REF_STEPS


@pytest.mark.slow
@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT'])
def test_a_signal_saves_the_current_step_and_exits_then_resumes(reference_run, data_dir, tmp_path,
                                                                 name):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) alike: save the step, exit 0, no traceback."""
  workdir = tmp_path / 'preempted'
  overrides = tiny_overrides(data_dir, *REF)
  proc = start_train(workdir, *overrides)
  wait_for(lambda: len(metric_rows(workdir)) >= 3, proc, 'three logged steps')
  proc.send_signal(getattr(signal, name))
  proc.wait(timeout=120)
  log = log_of(workdir)
  assert proc.returncode == 0, log[-5000:]
  assert 'Traceback' not in log, log[-5000:]
  stopped = max(read_metrics(workdir))
  assert 3 <= stopped < REF_STEPS, f'run ended before {name} took effect: {stopped}'
  assert f'{name}: saved step {stopped}, exiting' in log, log[-3000:]
  assert finalized_steps(workdir)[-1] == stopped  # saved on the spot, not at the last multiple
  logged = len(metric_rows(workdir))

  result = run_train(workdir, *overrides)
  assert_ok(result)
  assert f'resuming from {workdir / "checkpoints"} step {stopped}' in result.stdout
  resumed = [row['step'] for row in metric_rows(workdir)[logged:]]
  assert resumed == list(range(stopped + 1, REF_STEPS + 1)), resumed
  assert_same_steps(read_metrics(workdir), read_metrics(reference_run), range(1, REF_STEPS + 1))
  assert finalized_steps(workdir)[-1] == REF_STEPS


def test_init_from_starts_from_the_ema_with_a_fresh_optimizer(reference_run, data_dir, tmp_path):
  """lr 0 keeps the fine-tuned weights where init_from put them, so they can be compared."""
  workdir = tmp_path / 'sft'
  result = run_train(workdir, *tiny_overrides(
      data_dir, f'--config.init_from={reference_run}', '--config.init_mode=ema',
      '--config.train.lr=0', '--config.train.steps=2', '--config.checkpoint.every_steps=1',
      # How the model runs may differ from the source's; its weights may not.
      '--config.compute.remat_policy=none', '--config.compute.unroll_loops=true'))
  assert_ok(result)
  assert f'starting from the weights of {reference_run}' in result.stdout
  rows, reference = read_metrics(workdir), read_metrics(reference_run)
  assert sorted(rows) == [1, 2]  # a new run: steps count from 0, not from the source's 40
  # Same data and seed: step 1 sees the batch the reference saw at its step 1, from scratch.
  assert rows[1]['tokens'] == reference[1]['tokens']
  assert rows[1]['loss'] < reference[1]['loss'] / 3, (rows[1], reference[1])
  final_regime = max(reference[s]['loss'] for s in range(REF_STEPS - 4, REF_STEPS + 1))
  assert rows[1]['loss'] < 2 * final_regime + 0.1, (rows[1], final_regime)

  _, params, _ = load(workdir, use_ema=False)
  _, ref_ema, _ = load(reference_run, use_ema=True)
  _, ref_params, _ = load(reference_run, use_ema=False)
  assert_trees_equal(params, ref_ema)  # init_mode ema: the source's EMA, not its params
  with pytest.raises(AssertionError):
    assert_trees_equal(ref_params, ref_ema)
  # A fresh optimizer: its counters started at 0 (the source's are at 40, or 0 for leaves that
  # never train, like z_L_init), so after one step they are 1 where the source's are 40.
  import jax
  ref_opt, opt = restore_opt_step(reference_run, REF_STEPS), restore_opt_step(workdir, 1)
  assert int(ref_opt['step']) == REF_STEPS and int(opt['step']) == 1
  ref_counts = [int(c) for c in jax.tree.leaves(ref_opt['count'])]
  assert REF_STEPS in ref_counts and set(ref_counts) <= {0, REF_STEPS}
  assert [int(c) for c in jax.tree.leaves(opt['count'])] == [min(c, 1) for c in ref_counts]


def test_init_from_errors_are_one_line(reference_run, data_dir, tmp_path):
  mismatch = run_train(tmp_path / 'wide', *tiny_overrides(
      data_dir, f'--config.init_from={reference_run}', '--config.model.hidden_size=64'))
  assert_one_line_error(mismatch, 'is another model', 'hidden_size 32 (this run 64)')
  assert finalized_steps(tmp_path / 'wide') == [] and not read_metrics(tmp_path / 'wide')
  missing = run_train(tmp_path / 'nothing', *tiny_overrides(
      data_dir, f'--config.init_from={tmp_path / "nowhere"}'))
  assert_one_line_error(missing, 'init_from', str(tmp_path / 'nowhere'))


def tiny_config(data_dir):
  """The config `tiny_overrides(data_dir)` gives the CLI, for an in-process Trainer."""
  from hrmtext.training.config import experiment_config
  config = experiment_config(CONFIG)
  config.update_from_flattened_dict({
      name[len('--config.'):]: literal(value)
      for name, value in (arg.split('=', 1) for arg in tiny_overrides(data_dir))})
  return config


def literal(text: str):
  """A flag's value as Python: 32 -> int, 1e-2 -> float, a path stays a string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def copy_run(source, workdir, steps):
  """`source`'s metrics and the checkpoints of `steps` in a new workdir (a run interrupted
  after them)."""
  os.makedirs(workdir / 'checkpoints')
  for step in steps:
    shutil.copytree(source / 'checkpoints' / str(step), workdir / 'checkpoints' / str(step))
  shutil.copy(source / 'metrics.jsonl', workdir / 'metrics.jsonl')


def test_resume_refuses_another_model(reference_run, data_dir, tmp_path):
  """A resume with other weights' config stops with one line, the checkpoints untouched (a
  change of how it runs, e.g. its remat policy, does not count)."""
  workdir = tmp_path / 'run'
  copy_run(reference_run, workdir, [35])
  for flag, fragment in [('--config.model.H_cycles=2', 'H_cycles 1 (this run 2)'),
                         ('--config.model.hidden_size=64', 'hidden_size 32 (this run 64)')]:
    result = run_train(workdir, *tiny_overrides(data_dir, *REF, flag))
    assert_one_line_error(result, 'resuming', 'is another model', fragment)
    assert finalized_steps(workdir) == [35]
  assert metric_rows(workdir) == metric_rows(reference_run)


@pytest.mark.slow
def test_resume_after_a_metrics_line_cut_short(reference_run, data_dir, tmp_path):
  """A full disk or a kill mid-append leaves half a line: the resume drops it and redoes the
  steps after its checkpoint, exactly."""
  workdir = tmp_path / 'run'
  copy_run(reference_run, workdir, [35])
  with open(workdir / 'metrics.jsonl') as f:
    text = f.read()
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.write(text[:-40])
  assert_ok(run_train(workdir, *tiny_overrides(data_dir, *REF)))
  assert [row['step'] for row in metric_rows(workdir)] == list(range(1, REF_STEPS + 1))
  assert_same_steps(read_metrics(workdir), read_metrics(reference_run), range(1, REF_STEPS + 1))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference_run, data_dir,
                                                                   tmp_path):
  """Bytes flipped in the largest file of step 40: the rerun warns, sets it aside, resumes from
  step 35 and ends where the uninterrupted run did."""
  workdir = tmp_path / 'run'
  copy_run(reference_run, workdir, [35, 40])
  files = [p for p in (workdir / 'checkpoints' / '40').rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  largest.write_bytes(bytes(data))
  result = run_train(workdir, *tiny_overrides(data_dir, *REF))
  assert_ok(result)
  assert 'warning: checkpoint' in result.stderr and 'is damaged' in result.stderr, result.stderr
  assert f'resuming from {workdir / "checkpoints"} step 35' in result.stdout
  assert finalized_steps(workdir) == [35, 40]
  assert_same_steps(read_metrics(workdir), read_metrics(reference_run), range(1, REF_STEPS + 1))
  for use_ema in (False, True):
    assert_trees_equal(load(workdir, use_ema)[1], load(reference_run, use_ema)[1])


def test_a_failing_eval_loses_no_checkpoint(data_dir, tmp_path, monkeypatch):
  """The checkpoint of a step is saved before its eval: an eval that fails at step 4 leaves
  step 4 saved (in-process, the eval replaced by one that raises)."""
  from hrmtext.training import loop
  config = tiny_config(data_dir)
  config.eval.every_steps = config.checkpoint.every_steps = 4

  def failing_eval(self, params):
    raise RuntimeError('eval failed')

  monkeypatch.setattr(loop.Trainer, 'evaluate', failing_eval)
  workdir = tmp_path / 'run'
  with pytest.raises(RuntimeError, match='eval failed'):
    loop.Trainer(config, str(workdir)).run()
  assert finalized_steps(workdir) == [4]


def test_a_broken_heldout_set_fails_before_any_training(data_dir, tmp_path):
  """The held-out batches are built at start-up: a cut tokens.npy is one line, before step 1."""
  from hrmtext.data import layout
  data = tmp_path / 'data'
  shutil.copytree(data_dir, data)
  source = data / 'tokenized' / 'heldout' / 'task'
  layout.write_tokenized_source(str(source), np.arange(40) % 250 + 5, [5, 5], [15, 15])
  (source / 'tokens.npy').write_bytes((source / 'tokens.npy').read_bytes()[:-50])
  result = run_train(tmp_path / 'run', *tiny_overrides(data), timeout=120)
  assert_one_line_error(result, 'tokens.npy')
  assert finalized_steps(tmp_path / 'run') == [] and not metric_rows(tmp_path / 'run')


def test_help_and_missing_data_dir(tmp_path):
  result = run_train(tmp_path / 'help', '--help', timeout=120)
  assert result.returncode in (0, 1)  # absl exits 1 after printing --help
  assert '--workdir' in result.stdout and '--config' in result.stdout, result.stdout
  assert 'Traceback' not in result.stderr, result.stderr
  assert not (tmp_path / 'help').exists()  # nothing ran
  missing = tmp_path / 'no_data'
  result = run_train(tmp_path / 'run', *tiny_overrides(missing), timeout=120)
  assert_one_line_error(result, str(missing))
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  for args, fragments in [
      (['--config.train.stepz=3'], ['bad --config', 'stepz', 'steps']),  # a typo in a field
      (['--config.train.steps=many'], ['many']),
      (['--bogus'], ['bogus']),
      (['stray'], ['unexpected arguments: stray'])]:
    result = run_train(tmp_path / 'run', *args, timeout=120)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2, args
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_profile_window_time_split_and_time_based_checkpoints(data_dir, tmp_path):
  """A jax.profiler trace of steps 2-3 that TensorBoard's profile plugin reads; per-interval
  data-wait / step / checkpoint times in the metrics; a checkpoint whenever every_minutes passed
  (here: after every step) though every_steps is far away."""
  from jax.profiler import ProfileData
  workdir = tmp_path / 'profiled'
  result = run_train(workdir, *tiny_overrides(
      data_dir, '--config.train.steps=4', '--config.profile.start_step=2',
      '--config.profile.num_steps=2', '--config.checkpoint.every_steps=1000',
      '--config.checkpoint.every_minutes=1e-6', '--config.checkpoint.keep=10'))
  assert_ok(result)
  traces = list((workdir / 'tb' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1, traces
  assert f'profile of steps 2-3 in {workdir / "tb"}' in result.stdout
  profile = ProfileData.from_file(str(traces[0]))
  names = {event.name for plane in profile.planes for line in plane.lines for event in line.events}
  assert any('train_step' in name for name in names), sorted(names)[:50]
  rows = read_metrics(workdir)
  assert sorted(rows) == [1, 2, 3, 4]
  for step, row in rows.items():
    assert row['time/step_s'] > 0 and row['time/data_wait_s'] >= 0, row
  # Saved after every step (each takes more than the 0.06 ms of every_minutes); a row's
  # checkpoint time is that of the save after the step before.
  assert finalized_steps(workdir) == [1, 2, 3, 4]
  assert rows[1]['time/checkpoint_s'] == 0
  assert all(rows[step]['time/checkpoint_s'] > 0 for step in (2, 3, 4))


def prepare_small_builtin(tmp_path):
  """test_data_prepare's small built-in corpus (13 tasks, 4 held-out examples each) prepared in
  tmp_path/data; that folder."""
  from tests.test_data_prepare import SMALL_CONFIG
  (tmp_path / 'small.py').write_text(SMALL_CONFIG)
  data = tmp_path / 'data'
  prepared = subprocess.run([sys.executable, '-m', 'hrmtext.prepare', f'--output={data}',
                             f'--config={tmp_path / "small.py"}'], cwd=REPO, env=train_env(),
                            capture_output=True, text=True, timeout=300)
  assert_ok(prepared)
  return data


@pytest.mark.slow
def test_generation_eval_in_the_loop_equals_the_harness(tmp_path):
  """eval.generate_per_task: the loop's greedy exact match per held-out task is the harness's on
  the saved EMA weights (and, after 40 steps, not all zero, so the comparison means something)."""
  from hrmtext.data.tokenizer import Tokenizer
  from hrmtext.evals import evaluate, heldout_tasks
  from hrmtext.evals.engine import model_fns
  from hrmtext.infer import Engine
  from hrmtext.model import build_model
  data = prepare_small_builtin(tmp_path)
  seq_len, limit = 256, 4
  result = run_train(
      tmp_path / 'run', f'--config.data.dir={data}', f'--config.data.seq_len={seq_len}',
      '--config.model.hidden_size=64', '--config.model.head_dim=32',
      '--config.train.steps=40', '--config.train.lr=3e-3', '--config.train.warmup_steps=4',
      '--config.train.ema_decay=0.5', f'--config.train.global_batch_tokens={8 * seq_len}',
      '--config.train.horizon.bp_min=5', '--config.train.horizon.bp_max=5',  # one compiled step
      '--config.eval.every_steps=40', f'--config.eval.generate_per_task={limit}')
  assert_ok(result)
  logged = {k: v for k, v in read_metrics(tmp_path / 'run')[40].items() if k.startswith('eval_gen/')}

  cfg, params, _ = load(tmp_path / 'run', use_ema=True)
  tok = Tokenizer.load(str(data / 'sampled'))
  tasks = heldout_tasks(str(data), max_new_tokens=seq_len)
  longest = max(len(tok.encode_instruction(e.instruction, e.condition))
                for task in tasks for e in task.examples[:limit])
  engine = Engine(build_model(cfg), params, eoa=tok.eoa, max_len=longest + seq_len,
                  vocab_size=tok.vocab_size)
  want = evaluate(tasks, *model_fns(engine, tok), limit=limit, progress=False)
  assert {f'eval_gen/{task}/exact_match': m['exact_match'] for task, m in want.items()} == {
      k: v for k, v in logged.items() if k.endswith('/exact_match') and k.count('/') == 2}
  assert logged['eval_gen/exact_match'] == pytest.approx(
      np.mean([m['exact_match'] for m in want.values()]))
  assert logged['eval_gen/exact_match'] > 0, logged
  # The teacher-forced eval per task: its exact accuracy is greedy exact match when greedy decoding
  # saw every held-out example (gsm_symbolic aside: 3 of its instructions are longer than the
  # 256-token row, so teacher forcing has no response of theirs to score; generation misses them).
  evaluated = read_metrics(tmp_path / 'run')[40]
  assert all(len(task.examples) == limit for task in tasks)
  assert {k.split('/')[1] for k in evaluated if k.startswith('eval/') and k.count('/') == 2} == \
      {task.name for task in tasks}
  assert {task.name: evaluated[f'eval/{task.name}/exact_accuracy'] for task in tasks
          if task.name != 'gsm_symbolic'} == {
              task.name: logged[f'eval_gen/{task.name}/exact_match'] for task in tasks
              if task.name != 'gsm_symbolic'}
  task_losses = [evaluated[f'eval/{task.name}/loss'] for task in tasks]
  assert min(task_losses) < evaluated['eval/loss'] < max(task_losses)  # their token mean
