"""Every arm of experiments/ablation.py (baselines and switches) trains on 8 fake devices.

Its own file, so that `--dist loadfile` runs it beside test_train_distributed.py (whose fixtures and
helpers it reuses), not after it.
"""
import numpy as np
import pytest

from experiments import ablation
from hrmtext.model import credit_horizon
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
  # The loop's horizon: TRAIN_FLAGS fix bp_steps at 5, which a baseline's own horizon ignores.
  assert set(per_step(workdir, 'bp_steps').values()) == {credit_horizon(cfg, 5).differentiable}
