"""`python -m hrmtext.train` on several device meshes and processes trains the same model.

Every run trains the same tiny HRM for 6 steps on a reference-layout fixture set, in a subprocess
on CPU devices forced by XLA_FLAGS. Against an uninterrupted 1-device run, we compare:
  * 8 devices as data=8 and as fsdp=4 x tensor=2 (per-step losses, token counts, final params);
  * a run checkpointed at step 3 on fsdp=4 x tensor=2 and resumed on data=8;
  * 2 processes through launch/local.py (gloo collectives), with params sharded across them
    and as data=8;
  * step-3 checkpoints resumed on another number of processes (2 -> 1 and 1 -> 2): the data
    pipeline's global batches do not depend on the process count, so the run continues exactly
    as if uninterrupted (batch for batch; values to the tolerances below).
Then preemption: SIGTERM to only one of 2 processes stops both at the same step, each saves it
together with the other, and both exit 0; the rerun continues bitwise like an uninterrupted run.

Tolerances: the meshes split the same float32 sums differently (per-device partial sums, then
all-reduce), so results differ in the last bits. Observed on a 2-core x86 CPU: per-step losses
(~6.5) within 1e-6 absolute, 1.5e-7 relative (up to 3e-7 with the default bp_steps schedule), i.e.
a few float32 ulps; final params within 1.8e-7 absolute (a few ulps of the largest weights).
LOSS_RTOL and PARAM_ATOL leave ~10-30x headroom for other CPUs' vectorized reduction orders, yet
stay far below what a real divergence gives: a different batch moves a step's loss by >1e-2 (and
its labelled-token count, compared exactly), and a few optimizer steps move params by ~1e-3
(checked below by comparing the step-3 and step-6 params of one run).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hrmtext.run import Run
from tests import process_group
from tests.data_fixtures import write_reference_dataset

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, RESUME_AT = 6, 3
ROWS, SEQ_LEN = 8, 64
FIXTURE_VOCAB = 300  # write_reference_dataset's default vocabulary
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-6

# Tiny model; constant bp_steps (one compiled step per run keeps the file at a few minutes);
# a checkpoint every 3 steps (the resume test starts from step 3); no held-out split in the
# fixture, so eval is a no-op, and every_steps keeps it out of the way anyway.
TRAIN_FLAGS = (
    '--config.model.hidden_size=32', '--config.model.num_heads=2', '--config.model.head_dim=16',
    '--config.model.layers_per_stack=1', f'--config.model.vocab_size={FIXTURE_VOCAB}',
    f'--config.data.seq_len={SEQ_LEN}', f'--config.train.global_batch_tokens={ROWS * SEQ_LEN}',
    f'--config.train.steps={STEPS}', '--config.train.warmup_steps=2',
    '--config.train.horizon.bp_min=5', '--config.train.horizon.bp_max=5',
    '--config.log_every_steps=1', '--config.eval.every_steps=1000',
    f'--config.checkpoint.every_steps={RESUME_AT}', '--config.checkpoint.keep=3')

MESHES = {
    'data8': (8, ('--config.mesh.data=8', '--config.mesh.fsdp=1', '--config.mesh.tensor=1')),
    'fsdp4_tensor2': (8, ('--config.mesh.data=1', '--config.mesh.fsdp=-1',
                          '--config.mesh.tensor=2')),
}


def launch_command(processes, command):
  return [sys.executable, '-m', 'launch.local', f'--num_processes={processes}', '--', *command]


def run_env(devices_per_process: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')}
  return {**env, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO,
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}'}


def train(data_dir, workdir, devices_per_process, *flags, processes=1, config=None):
  """Runs the trainer (through launch.local if several processes) on experiment `config` (default:
  the trainer's); returns its stdout."""
  command = [sys.executable, '-m', 'hrmtext.train', *([f'--config={config}'] if config else []),
             f'--workdir={workdir}', f'--config.data.dir={data_dir}', *TRAIN_FLAGS, *flags]
  if processes > 1:
    command = launch_command(processes, command)
  result = process_group.run(command, cwd=REPO, env=run_env(devices_per_process), timeout=600)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  return result.stdout


def metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def per_step(workdir, name):
  """{step: value} of a metric."""
  return {row['step']: row[name] for row in metric_rows(workdir) if name in row}


def final_params(workdir, step=None):
  # Onto this process's 1 device.
  cfg, params, _ = Run(workdir).load_weights(use_ema=False, step=step)
  return cfg, params


def max_diffs(losses, reference):
  steps = sorted(losses)
  a = np.array([losses[s] for s in steps])
  b = np.array([reference[s] for s in steps])
  return float(np.max(np.abs(a - b))), float(np.max(np.abs(a - b) / np.abs(b)))


def assert_same_losses(workdir, reference_dir, steps, label):
  losses, reference = per_step(workdir, 'loss'), per_step(reference_dir, 'loss')
  assert sorted(losses) == list(steps), (label, sorted(losses))
  # Same batches on every step: labelled-token counts are integers and must match exactly.
  tokens, ref_tokens = per_step(workdir, 'tokens'), per_step(reference_dir, 'tokens')
  assert [tokens[s] for s in steps] == [ref_tokens[s] for s in steps], label
  abs_diff, rel_diff = max_diffs(losses, {s: reference[s] for s in steps})
  print(f'\n{label}: loss max |diff| {abs_diff:.3g}, max rel diff {rel_diff:.3g}')
  np.testing.assert_allclose([losses[s] for s in steps], [reference[s] for s in steps],
                             rtol=LOSS_RTOL, atol=0, err_msg=label)


def assert_same_params(workdir, reference_params, label):
  cfg, params = final_params(workdir)
  assert cfg.vocab_size == 512  # the fixture's 300 padded to the config's vocab_multiple (256)
  assert jax.tree.structure(params) == jax.tree.structure(reference_params)
  worst = 0.0
  for (path, x), y in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(reference_params)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    worst = max(worst, float(np.max(np.abs(x - y))))
    np.testing.assert_allclose(x, y, rtol=0, atol=PARAM_ATOL,
                               err_msg=f'{label} {jax.tree_util.keystr(path)}')
  print(f'{label}: params max |diff| {worst:.3g}')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data'))
  write_reference_dataset(path, num_examples=60, seed=1, vocab_size=FIXTURE_VOCAB)
  return path


# Runs by name: (processes, devices per process, mesh flags).
DATA8 = ('--config.mesh.data=8', '--config.mesh.fsdp=1', '--config.mesh.tensor=1')
RUNS = {
    '1dev': (1, 1, ()),
    'data8': (1, 8, DATA8),
    'fsdp4_tensor2': (1, 8, ('--config.mesh.data=1', '--config.mesh.fsdp=-1',
                             '--config.mesh.tensor=2')),
    # 'tensor' within a process, 'fsdp' across the two: params sharded over both processes.
    '2x2dev_fsdp2_tensor2': (2, 2, ('--config.mesh.data=1', '--config.mesh.fsdp=2',
                                    '--config.mesh.tensor=2')),
    # One row per device, 4 devices per process.
    '2x4dev_data8': (2, 4, DATA8),
}


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """name -> (workdir, stdout) of a finished run of RUNS[name] (each run once per module)."""
  done = {}

  def get(name):
    if name not in done:
      workdir = str(tmp_path_factory.mktemp(name))
      processes, devices, flags = RUNS[name]
      done[name] = workdir, train(data_dir, workdir, devices, *flags, processes=processes)
    return done[name]

  return get


@pytest.fixture(scope='module')
def baseline(runs):
  """The uninterrupted 1-device run: (workdir, final params)."""
  workdir, _ = runs('1dev')
  steps = [row['step'] for row in metric_rows(workdir)]
  assert steps == list(range(1, STEPS + 1)), steps
  return workdir, final_params(workdir)[1]


def test_baseline_params_move_far_beyond_the_tolerance(baseline):
  """The param tolerance can fail: 3 optimizer steps move params by orders of magnitude more."""
  workdir, params = baseline
  _, halfway = final_params(workdir, step=RESUME_AT)
  moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(halfway)))
  print(f'\nparams moved by up to {moved:.3g} from step {RESUME_AT} to {STEPS}')
  assert moved > 100 * PARAM_ATOL, moved
  losses = per_step(workdir, 'loss')
  assert max(losses.values()) - min(losses.values()) > 1000 * LOSS_RTOL * losses[1]


@pytest.mark.parametrize('mesh', ['data8', 'fsdp4_tensor2'])
def test_any_mesh_trains_like_one_device(runs, baseline, mesh):
  baseline_dir, baseline_params = baseline
  workdir, _ = runs(mesh)
  assert_same_losses(workdir, baseline_dir, range(1, STEPS + 1), mesh)
  assert_same_params(workdir, baseline_params, mesh)


@pytest.mark.parametrize('source, target', [
    ('fsdp4_tensor2', 'data8'),  # another mesh
    ('2x4dev_data8', 'data8'),  # 2 processes -> 1
    ('data8', '2x4dev_data8'),  # 1 process -> 2
])
def test_resume_on_another_mesh_or_process_count(data_dir, runs, baseline, tmp_path, source,
                                                 target):
  """The step-3 checkpoint of `source`, resumed as `target`, continues like 1 device: the same
  batches (labelled-token counts equal) and values to the tolerances.

  A separate `--config.train.steps=3` run would not do: the LR schedule depends on the total
  number of steps, so its first 3 steps differ from those of a 6-step run. The step-3
  checkpoint of the 6-step run is exactly what that run leaves when interrupted after step 3.
  """
  baseline_dir, baseline_params = baseline
  source_dir, _ = runs(source)
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(os.path.join(source_dir, 'checkpoints', str(RESUME_AT)),
                  os.path.join(workdir, 'checkpoints', str(RESUME_AT)))
  processes, devices, flags = RUNS[target]
  train(data_dir, workdir, devices, *flags, processes=processes)
  # Only steps 4-6 ran (a run from scratch would log from step 1), on the restored state and
  # data position.
  assert [row['step'] for row in metric_rows(workdir)] == list(range(RESUME_AT + 1, STEPS + 1))
  label = f'{source} resumed as {target}'
  assert_same_losses(workdir, baseline_dir, range(RESUME_AT + 1, STEPS + 1), label)
  assert_same_params(workdir, baseline_params, label)


@pytest.mark.parametrize('name', ['2x2dev_fsdp2_tensor2', '2x4dev_data8'])
def test_processes_train_like_one(runs, baseline, name):
  baseline_dir, baseline_params = baseline
  workdir, stdout = runs(name)
  processes = RUNS[name][0]
  assert f'[0] step {STEPS}/{STEPS} ' in stdout, stdout[-3000:]
  assert not any(f'[{i}] step ' in stdout for i in range(1, processes)), stdout[-3000:]
  # Only process 0 writes metrics: one row per step, no duplicates.
  assert [row['step'] for row in metric_rows(workdir)] == list(range(1, STEPS + 1))
  assert_same_losses(workdir, baseline_dir, range(1, STEPS + 1), name)
  assert_same_params(workdir, baseline_params, name)  # restored in this single process


# --- preemption ---------------------------------------------------------------------------------

PREEMPT_STEPS = 40  # long enough to signal mid-run
PREEMPT_FLAGS = (*DATA8, f'--config.train.steps={PREEMPT_STEPS}',
                 '--config.checkpoint.every_steps=1000', '--config.checkpoint.keep=100')
STOP_BOUND_S = 60  # SIGTERM to both processes' exit


def child_pids(pid):
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    return [int(child) for child in f.read().split()]


def saved_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  """The preemption tests' reference: 2 processes x 4 devices, uninterrupted. It also takes
  time-based checkpoints (every 1.8 s on any process's clock): were the processes to disagree on
  when, one would wait in the collective save while the other went on, and the run would hang."""
  reference = str(tmp_path_factory.mktemp('uninterrupted'))
  train(data_dir, reference, 4, *PREEMPT_FLAGS, '--config.checkpoint.every_minutes=0.03',
        processes=2)
  assert len(saved_steps(reference)) > 1, saved_steps(reference)  # time-based ones, then the last
  return reference


@pytest.mark.parametrize('signalled', ['process 1', 'launcher'])
def test_sigterm_stops_both_processes_at_one_step_and_resumes_bitwise(data_dir, uninterrupted,
                                                                       tmp_path, signalled):
  """SIGTERM to only one of the 2 trainers, or to launch.local (which passes it on): both save
  the same step and exit 0; the rerun continues bitwise like the uninterrupted run."""
  workdir = str(tmp_path / 'preempted')
  command = [sys.executable, '-m', 'hrmtext.train', f'--workdir={workdir}',
             f'--config.data.dir={data_dir}', *TRAIN_FLAGS, *PREEMPT_FLAGS]
  with open(f'{workdir}.log', 'w') as log:
    launcher = process_group.start(launch_command(2, command), cwd=REPO, env=run_env(4), stdout=log,
                               stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while not (os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and
               len(metric_rows(workdir)) >= 3):
      assert launcher.poll() is None and time.monotonic() < deadline, open(f'{workdir}.log').read()
      time.sleep(0.05)
    trainers = child_pids(launcher.pid)
    assert len(trainers) == 2, trainers
    # launch.local starts the processes in order: trainers[1] is process 1.
    os.kill(trainers[1] if signalled == 'process 1' else launcher.pid, signal.SIGTERM)
    signalled_at = time.monotonic()
    launcher.wait(timeout=STOP_BOUND_S + 60)
    stopped_in = time.monotonic() - signalled_at
  finally:
    process_group.kill(launcher)
  output = open(f'{workdir}.log').read()
  assert launcher.returncode == 0, output[-5000:]
  assert stopped_in < STOP_BOUND_S, stopped_in
  said = {int(i): int(step)
          for i, step in re.findall(r'\[(\d)\] SIGTERM: saved step (\d+)', output)}
  assert sorted(said) == [0, 1] and said[0] == said[1], output[-3000:]
  stopped = said[0]
  assert 3 <= stopped < PREEMPT_STEPS, stopped
  assert saved_steps(workdir) == [stopped] and max(per_step(workdir, 'loss')) == stopped
  print(f'\nSIGTERM to {signalled}: both saved step {stopped}, exited in {stopped_in:.1f} s')

  train(data_dir, workdir, 4, *PREEMPT_FLAGS, processes=2)
  assert [row['step'] for row in metric_rows(workdir)] == list(range(1, PREEMPT_STEPS + 1))
  for name in ('loss', 'tokens', 'grad_norm'):
    assert per_step(workdir, name) == per_step(uninterrupted, name), name
  _, params = final_params(workdir)
  _, reference_params = final_params(uninterrupted)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
