"""benchmarks/gpu_check.sh, the one GPU check, runs on CPU at its tiny size and writes its report;
its packed attention rows are at the segment bound with the one-token-response cases."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_parts  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_packed_rows_at_the_bound():
  segment_ids, is_instruction = gpu_parts.packed_rows(np.random.default_rng(0), 3, 256, 16)
  counts = [np.unique(row[row > 0]).size for row in segment_ids]
  assert counts[0] == 16 and max(counts) <= 16
  assert segment_ids[-1, -1] == 0 and (segment_ids[0] > 0).all()  # padding in the last row only
  for row, flags in zip(segment_ids, is_instruction):
    for segment in np.unique(row[row > 0]):
      mine = flags[row == segment]
      assert mine[0] and (np.diff(mine.astype(int)) <= 0).all()  # an instruction, then responses
  first, second = (is_instruction[0][segment_ids[0] == s] for s in (1, 2))
  assert first.all()  # a response of 1 token: nothing of it is an input
  assert (~second).sum() == 1  # one response input


@pytest.mark.slow
def test_gpu_check_on_cpu(tmp_path):
  """--tiny: every part's keys, the cuDNN row skipped with its reason, a failing train run
  recorded beside the others' results, one JSON and one markdown table."""
  out = tmp_path / 'out'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO,
         'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']}
  runs = ['--train_runs=tiny=--config experiments/tiny_cpu.py --config.data.seq_len=256 --rows 2',
          '--train_runs=broken=--no_such_flag']
  result = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), str(out),
                           '--tiny', *runs], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert sorted(os.listdir(out)) == ['gpu_check.json', 'gpu_check.md']
  report = json.loads((out / 'gpu_check.json').read_text())
  assert {report[part]['status'] for part in ('environment', 'attention', 'decode')} == {'ok'}
  assert report['environment']['jax'] and report['environment']['platform'] == 'cpu'
  rows = {(r['implementation'], r['dtype']): r for r in report['attention']['rows']}
  assert rows[('cudnn', 'bfloat16')]['status'] == 'skipped'
  assert 'CUDA GPU' in rows[('cudnn', 'bfloat16')]['reason']
  xla = rows[('xla', 'bfloat16')]
  assert xla['passed'] and xla['nans'] == {'out': 0, 'dq': 0, 'dk': 0, 'dv': 0}
  assert max(xla[f'{k}_error'] for k in ('out', 'dq', 'dk', 'dv')) < 0.05
  assert report['attention']['segments_per_row'][0] == 16
  assert report['decode']['rows'][0]['decode_tokens_per_s'] > 0
  tiny, broken = report['train']['tiny'], report['train']['broken']
  assert tiny['status'] == 'ok' and tiny['measured']['tokens_per_s'] > 0
  assert tiny['compiled']['per_device_memory_bytes']['total'] > 0
  assert broken['status'] == 'failed' and 'no_such_flag' in broken['measured']['error']
  table = (out / 'gpu_check.md').read_text().splitlines()
  assert table[2] == '| part | case | status | result |'
  parts = [line.split('|')[1].strip() for line in table[4:]]
  assert parts[0] == 'environment' and parts.count('attention') == 3
  assert parts.count('decode') == 1 and parts.count('train') == 2
