"""Every arm of experiments/ablation.py (baselines and switches) trains on 8 fake devices.

Its own file, so that `--dist loadfile` runs it beside test_train_distributed.py (whose fixtures and
helpers it reuses), not after it.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import ablation
from hrmtext.model import architecture_horizon, full_horizon
from tests.test_train import REPO, assert_ok, prepare_small_builtin, read_metrics, train_env
from tests.test_train_distributed import MESHES, data_dir, final_params, per_step, train  # pylint: disable=unused-import

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('arm', [arm for arm in ablation.ARMS if arm != 'hrm'])
def test_every_ablation_arm_trains_on_a_sharded_mesh(data_dir, tmp_path, arm):
  """experiments/ablation.py's arms (at TRAIN_FLAGS' tiny size), 2 steps on fsdp=4 x tensor=2."""
  workdir = str(tmp_path / arm)
  train(data_dir, workdir, 8, '--config.train.steps=2', '--config.checkpoint.every_steps=2',
        *MESHES['fsdp4_tensor2'][1], config=f'{ablation.THIS_FILE}:{arm}')
  losses = per_step(workdir, 'loss')
  assert sorted(losses) == [1, 2] and np.all(np.isfinite(list(losses.values()))), losses
  cfg, _ = final_params(workdir)
  model_settings = {path.split('.')[1]: value for path, value in
                    ablation.SWITCHES.get(arm, {}).items() if path.startswith('model.')}
  architecture = 'transformer' if arm == 'transformer_deep' else (
      arm if arm in ablation.ARCHITECTURE_ARMS else 'hrm')
  assert {'architecture': architecture, **model_settings} == {
      name: getattr(cfg, name) for name in ('architecture', *model_settings)}
  # The loop's horizon: TRAIN_FLAGS fix bp_steps at 5, which a baseline's own horizon ignores;
  # the full_bptt arm's is every application.
  horizon = full_horizon(cfg) if arm == 'full_bptt' else architecture_horizon(cfg, 5)
  assert set(per_step(workdir, 'bp_steps').values()) == {horizon.differentiable}


def test_the_runner_trains_each_arm_once_and_prints_both_tables(tmp_path):
  """The README's `python experiments/ablation.py` on a small built-in corpus, 2 arms of 2 steps
  (no greedy eval: test_train covers the loop's):
  each arm's row and per-task losses, the checkpoint's held-out eval equal to the loop's, and a
  rerun that trains nothing."""
  data, runs = prepare_small_builtin(tmp_path), tmp_path / 'runs'
  command = [sys.executable, ablation.THIS_FILE, f'--workdir={runs}', '--arms=hrm,transformer',
             '--steps=2', '--generate_per_task=0', '--', f'--config.data.dir={data}',
             '--config.data.seq_len=256', '--config.train.global_batch_tokens=1024',
             '--config.model.hidden_size=32', '--config.model.head_dim=16']
  run = lambda: subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True,
                               timeout=600)
  first = run()
  assert_ok(first)
  assert first.stdout.count('== ') == 2  # one training run per arm
  tasks = sorted(path.stem for path in (data / 'raw' / 'heldout').glob('*.jsonl'))
  for arm in ('hrm', 'transformer'):
    result = json.loads((runs / arm / 'result.json').read_text())
    assert result['steps'] == 2 and sorted(result['eval_loss_per_task']) == tasks
    last_eval = read_metrics(runs / arm)[2]  # the loop's final eval, on the same EMA weights
    assert result['eval_loss'] == pytest.approx(last_eval['eval/loss'], rel=1e-5)
    assert result['eval_loss_per_task'] == pytest.approx(
        {task: last_eval[f'eval/{task}/loss'] for task in tasks}, rel=1e-5)
    rows = [cells(line) for line in first.stdout.splitlines() if line.startswith(f'| {arm} |')]
    assert len(rows) == 2, first.stdout  # its comparison row and its per-task loss row
    assert f'{ablation.task_mean(result):.3f}' in rows[0]
    assert rows[0][-1] == '-'  # greedy exact: none asked for, so no per-task greedy columns either
    assert rows[1] == [arm, *(f'{result["eval_loss_per_task"][task]:.3f}' for task in tasks)]
  again = run()
  assert_ok(again)
  tables = lambda out: out[out.index('| arm'):]
  assert '== ' not in again.stdout and tables(again.stdout) == tables(first.stdout)


def cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip().strip('|').split('|')]
