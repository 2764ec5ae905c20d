"""Checkpoint integrity: checksums written at save and verified by every reader, a damaged newest
step skipped on resume, and a failed save (full disk) said in one line with the steps before it
kept."""
import errno
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from hrmtext.errors import UserError
from hrmtext.model import ModelConfig, build_model
from hrmtext import checkpoint
from hrmtext.run import Run
from tests.test_infer_cli import assert_one_line_error, cli

CFG = ModelConfig(vocab_size=512, hidden_size=32, num_heads=2, head_dim=16, intermediate_size=64,
                  layers_per_stack=1)


def tiny_params(seed):
  return nn.unbox(build_model(CFG).init(jax.random.key(seed)))


def save_steps(run, steps, *, async_save=True, **items):
  mngr = Run(str(run)).manager(async_save=async_save)
  for step in steps:
    checkpoint.save(mngr, step, meta={'model': CFG.to_dict()}, **items)
  mngr.close()


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """A run with steps 1 and 2 (params and EMA), saved asynchronously."""
  run = tmp_path_factory.mktemp('integrity') / 'run'
  save_steps(run, (1, 2), params=tiny_params(0), ema=tiny_params(1))
  return run


@pytest.fixture
def run(pristine, tmp_path):
  shutil.copytree(pristine, tmp_path / 'run')
  return tmp_path / 'run'


def largest_file(step_dir):
  files = [os.path.join(parent, name) for parent, _, names in os.walk(step_dir) for name in names]
  return max(files, key=os.path.getsize)


def flip_bytes(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def assert_same_tree(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checksums_cover_every_file_of_the_items(pristine):
  step = pristine / 'checkpoints' / '2'
  sums = checkpoint._checksums(str(step))  # pylint: disable=protected-access
  files = {os.path.relpath(os.path.join(parent, name), step)
           for parent, _, names in os.walk(step) for name in names}
  items = {name for name in files if '/' in name}
  assert set(sums) == items and any(name.startswith('ema/') for name in items)
  assert files - items == {checkpoint.CHECKSUMS, '_CHECKPOINT_METADATA', 'commit_success.txt'}


@pytest.mark.parametrize('damage', [flip_bytes, truncate, os.remove])
def test_damaged_file_stops_load_weights(run, damage):
  damaged = largest_file(run / 'checkpoints' / '2')
  damage(damaged)
  with pytest.raises(checkpoint.DamagedCheckpoint, match='checkpoint .*/2 is damaged: ') as error:
    Run(str(run)).load_weights()
  assert os.path.relpath(damaged, run / 'checkpoints' / '2') in str(error.value)
  assert isinstance(error.value, UserError)
  mngr = Run(str(run)).manager(create=False)
  with pytest.raises(checkpoint.DamagedCheckpoint):
    checkpoint.read_meta(mngr, 2)  # the step as a whole, whichever item a reader wants
  checkpoint.read_meta(mngr, 1)


def test_step_without_checksums_loads_and_truncation_is_one_error(run):
  """Checkpoints saved before checksums (or by hand) load unverified; Orbax's failure to read a
  truncated file of one is a DamagedCheckpoint, not its traceback."""
  os.remove(run / 'checkpoints' / '2' / checkpoint.CHECKSUMS)
  cfg, params, meta = Run(str(run)).load_weights()
  assert cfg == CFG and meta['step'] == 2
  assert_same_tree(params, tiny_params(1))
  truncate(largest_file(run / 'checkpoints' / '2' / 'ema'))
  with pytest.raises(checkpoint.DamagedCheckpoint, match='/2 cannot be read'):
    Run(str(run)).load_weights()


def test_latest_intact_step_sets_a_damaged_step_aside(run, capsys):
  flip_bytes(largest_file(run / 'checkpoints' / '2'))
  mngr = Run(str(run)).manager(max_to_keep=None)
  assert checkpoint.latest_intact_step(mngr) == 1
  warning = capsys.readouterr().err
  assert warning.startswith('warning: checkpoint ') and '/2 is damaged' in warning
  assert '2.damaged' in warning and 'resuming from step 1' in warning
  assert mngr.latest_step() == 1 and (run / 'checkpoints' / '2.damaged').is_dir()
  checkpoint.save(mngr, 2, meta={'model': CFG.to_dict()}, params=tiny_params(2))  # saved again
  mngr.close()
  assert checkpoint.latest_intact_step(Run(str(run)).manager(create=False)) == 2
  assert_same_tree(Run(str(run)).load_weights()[1], tiny_params(2))


def test_latest_intact_step_without_any(run, tmp_path):
  assert checkpoint.latest_intact_step(Run(str(tmp_path / 'new')).manager()) is None
  for step in (1, 2):
    truncate(largest_file(run / 'checkpoints' / str(step)))
  with pytest.raises(checkpoint.DamagedCheckpoint, match='no intact checkpoint'):
    checkpoint.latest_intact_step(Run(str(run)).manager())
  assert sorted(os.listdir(run / 'checkpoints')) == ['1', '2']  # nothing moved


@pytest.mark.parametrize('verb', ['generate', 'score', 'evaluate', 'convert'])
def test_damaged_checkpoint_stops_each_cli(run, tmp_path, verb):
  flip_bytes(largest_file(run / 'checkpoints' / '2'))
  (tmp_path / 'in.jsonl').write_text('{"instruction_ids": [5, 6], "response_ids": [7]}\n')
  out = tmp_path / 'out'
  args = {'generate': ['--checkpoint', run, '--prompt', 'x'],
          'score': ['--checkpoint', run, '--input', tmp_path / 'in.jsonl', '--output', out],
          'evaluate': ['--checkpoint', run],
          'convert': [f'--src={run}', f'--dst={out}']}[verb]
  result = cli(verb, *args)
  assert_one_line_error(result, 'is damaged', str(run / 'checkpoints' / '2'))
  assert result.returncode == 1 and result.stderr.count('error:') == 1
  assert not out.exists()


@pytest.mark.parametrize('checksums', [True, False], ids=['checksums', 'no_checksums'])
def test_truncated_file_is_one_line(run, checksums):
  if not checksums:
    os.remove(run / 'checkpoints' / '2' / checkpoint.CHECKSUMS)
  truncate(largest_file(run / 'checkpoints' / '2' / 'ema'))
  result = cli('generate', '--checkpoint', run, '--prompt', 'x')
  assert_one_line_error(result, str(run / 'checkpoints' / '2'))
  assert result.returncode == 1 and result.stderr.count('error:') == 1
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def fail_checksums_write(monkeypatch):
  """The last write of a save (its checksums) fails as on a full disk."""
  def full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(checkpoint, 'atomic_open', full)


def file_size_limit(monkeypatch):
  """Writes of more than 50 kB fail (EFBIG) in TensorStore itself, as ENOSPC would."""
  resource = pytest.importorskip('resource')
  signal = pytest.importorskip('signal')
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  monkeypatch.setattr(checkpoint.Manager, 'save', limited(checkpoint.Manager.save, resource,
                                                          signal, limits))


def limited(save, resource, signal, limits):
  def save_limited(self, *args, **kwargs):
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limits[1]))
    try:
      save(self, *args, **kwargs)
      self.wait_until_finished()
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, limits)
      signal.signal(signal.SIGXFSZ, handler)
  return save_limited


@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
@pytest.mark.parametrize('failure, reason', [(fail_checksums_write, 'No space left on device'),
                                             (file_size_limit, 'File too large')],
                         ids=['enospc', 'tensorstore'])
def test_failed_save_is_one_line_and_keeps_the_previous_step(tmp_path, monkeypatch, caplog,
                                                             async_save, failure, reason):
  run = tmp_path / 'run'
  params = tiny_params(0)
  mngr = Run(str(run)).manager(max_to_keep=1, async_save=async_save)
  checkpoint.save(mngr, 1, meta={'model': CFG.to_dict()}, params=params, ema=params)
  mngr.wait_until_finished()
  failure(monkeypatch)
  with pytest.raises(UserError) as error:
    checkpoint.save(mngr, 2, meta={'model': CFG.to_dict()}, params=params, ema=params)
    # An async save's failure surfaces at the next save (or wait_until_finished), as its own.
    checkpoint.save(mngr, 3, meta={'model': CFG.to_dict()}, params=params, ema=params)
  assert str(error.value) == f'saving step 2 to {run / "checkpoints"} failed: {reason}'
  assert not [record for record in caplog.records if record.exc_info]  # Orbax's tracebacks
  monkeypatch.undo()
  assert os.listdir(run / 'checkpoints') == ['1']  # no half-written step 2, step 1 kept
  assert mngr.latest_step() == 1
  mngr.close()
  assert checkpoint.latest_intact_step(Run(str(run)).manager(create=False)) == 1
  assert_same_tree(Run(str(run)).load_weights()[1], params)
