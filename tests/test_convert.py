"""HF <-> hrmtext conversion: exact round trip, CLI direction detection and errors."""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from tests import hf_oracle


def convert(src, dst):
  return subprocess.run([sys.executable, '-m', 'hrmtext.convert', f'--src={src}', f'--dst={dst}'],
                        capture_output=True, text=True)


@hf_oracle.needs_hf
def test_round_trip_is_identical(tmp_path):
  # Settings the reference training code lacks: vocab 300 (not a multiple of 256), L_bp_cycles.
  model = hf_oracle.make_hf_model(vocab=300, L_bp_cycles=(1, 3))
  model.model.z_L_init.data.zero_()  # as released
  hf_dir, ours, back = tmp_path / 'hf', tmp_path / 'ours', tmp_path / 'back'
  model.save_pretrained(hf_dir)
  (hf_dir / 'tokenizer.json').write_text('{"fake": "tokenizer"}')
  for src, dst in ((hf_dir, ours), (ours, back)):
    result = convert(src, dst)
    assert result.returncode == 0, result.stderr
  assert (ours / 'checkpoints' / '0').is_dir()
  a, b = load_file(hf_dir / 'model.safetensors'), load_file(back / 'model.safetensors')
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  assert json.loads((hf_dir / 'config.json').read_text()) == json.loads(
      (back / 'config.json').read_text())
  assert (back / 'tokenizer.json').read_text() == '{"fake": "tokenizer"}'


def test_cli_errors_are_one_line(tmp_path):
  result = convert(tmp_path / 'missing', tmp_path / 'out')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'not a directory' in result.stderr
  (tmp_path / 'out').mkdir()
  result = convert(tmp_path, tmp_path / 'out')
  assert result.returncode != 0 and 'already exists' in result.stderr
  result = convert(tmp_path / 'out', tmp_path / 'new')  # neither HF nor hrmtext
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'new') and not os.path.exists(tmp_path / 'new.partial')
