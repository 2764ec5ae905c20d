"""`python -m hrmtext.bench` on tiny configs on CPU: the summary line parses and adds up."""
import os
import subprocess
import sys

import numpy as np
import pytest

from hrmtext import bench
from tests import hf_oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ('params_m', 'compile_s', 'step_s', 'tokens_per_s', 'tokens_per_s_per_device',
            'tflops_per_device', 'loss')


def run_bench(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'hrmtext.bench', *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('config, architecture', [('experiments/tiny_cpu.py', 'hrm'),
                                                  ('experiments/hrm.py:L', 'transformer')])
def test_bench_reports_positive_numbers(config, architecture):
  tiny = ['--config.model.size=', '--config.model.layers_per_stack=1',
          '--config.model.hidden_size=64', '--config.model.num_heads=2',
          '--config.model.head_dim=32', '--config.compute.dtype=float32']
  result = run_bench(f'--config={config}', *tiny, f'--config.model.architecture={architecture}',
                     '--config.data.seq_len=128', '--rows=2',
                     '--steps=2', '--warmup=1', '--vocab=256', '--bp_steps=3',
                     '--max_example_len=100')
  assert result.returncode == 0, result.stdout + result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith('bench: ')]
  assert len(lines) == 1, result.stdout
  fields = dict(item.split('=', 1) for item in lines[0][len('bench: '):].split())
  for name in POSITIVE:
    assert float(fields[name]) > 0, (name, fields)
  assert np.isfinite(float(fields['loss']))
  assert fields['architecture'] == architecture
  # bp_steps: the differentiable stack applications, HRM's 3 of --bp_steps, the Transformer's one
  assert (fields['rows'], fields['seq_len']) == ('2', '128')
  assert fields['bp_steps'] == ('3' if architecture == 'hrm' else '1')
  assert int(fields['devices']) == 1 and fields['device_kind'] == 'cpu'
  assert fields['mfu'] == fields['peak_memory_gib'] == 'n/a'  # no peak FLOP/s, memory stats
  assert 0 < float(fields['packing']) <= 1
  tokens_per_s = float(fields['tokens_per_s'])
  assert abs(tokens_per_s * float(fields['step_s']) - 2 * 128) < 1e-3 * 2 * 128


def test_bench_rejects_rows_that_do_not_split():
  result = run_bench('--rows=3', '--config.train.micro_batches=2', '--vocab=256')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'error: 3 rows per step do not split into 2 micro-batches over 1 batch shards')


def test_synthetic_rows_are_packed_examples():
  batch = bench.synthetic_rows(rows=6, seq_len=512, vocab_size=100, min_len=64, max_len=300,
                               instruction_fraction=0.3, window_rows=4, max_segments=64,
                               seed=0)
  segment_ids, is_instruction = batch['segment_ids'], batch['is_instruction'].astype(bool)
  assert segment_ids.shape == (6, 512) and (segment_ids > 0).mean() > 0.8
  for row in range(6):
    for segment in set(segment_ids[row][segment_ids[row] > 0]):
      where = np.flatnonzero(segment_ids[row] == segment)
      assert 64 <= len(where) <= 300 and np.all(np.diff(where) == 1)
      prefix = is_instruction[row, where]
      instruction = prefix.sum()
      assert 1 <= instruction < len(where) and prefix[:instruction].all()
      assert 0.1 < instruction / len(where) < 0.5
  assert batch['inputs'].max() < 100 and (batch['labels'] != -100).any()


@hf_oracle.needs_hf
def test_decode_bench_matches_transformers():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-m', 'hrmtext.bench_decode', '--batch=1,3',
                           '--new_tokens=5', '--prompt_len=7', '--vocab_size=512', '--hlo'], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = [dict(item.split('=', 1) for item in line.split()[1:] if '=' in item)
           for line in result.stdout.splitlines() if line.startswith('bench: engine=')]
  assert [(line['engine'], line['batch']) for line in lines] == [
      ('hrmtext', '1'), ('hf', '1'), ('hrmtext', '3'), ('hf', '3')], result.stdout
  for line in lines:
    assert float(line['decode_tokens_per_s']) > 0 and line['new_tokens'] == '5'
  # --hlo with a prompt shorter than the engine's smallest window (a crash once).
  assert all(float(line['decode_step_copies_mib']) >= 0 for line in lines
             if line['engine'] == 'hrmtext')
  # Greedy tokens of the weights exported to transformers are those hrmtext generated.
  assert all(line['same_tokens_as_hrmtext'] == '1.000' for line in lines if line['engine'] == 'hf')


def test_bench_and_train_compile_the_same_program(tmp_path):
  """For one config, the Trainer's train step and bench's lower to the same module: both come
  from training.program.TrainProgram, with the same schedule, shardings and loss chunking."""
  from hrmtext.parallel import sharding
  from hrmtext.training.loop import Trainer
  from tests.test_train import make_fixture_data, tiny_config
  make_fixture_data(tmp_path / 'data')
  config = tiny_config(tmp_path / 'data')
  trainer = Trainer(config, str(tmp_path / 'run'))
  bench_program = bench.build_program(config, trainer.mesh, vocab_size=300)  # the fixture's
  rows = trainer.global_rows
  texts = []
  for program in (trainer.program, bench_program):
    horizon = program.horizon(0)
    with sharding.activate(program.mesh):
      lowered = program.train_step(horizon).lower(program.abstract_state(),
                                                  program.abstract_batch(rows))
    texts.append(lowered.as_text())
  assert texts[0] == texts[1]
  assert trainer.program.model_cfg == bench_program.model_cfg
  assert trainer.config.to_dict() == bench_program.config.to_dict()  # resolved alike
