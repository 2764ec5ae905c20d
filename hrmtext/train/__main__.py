"""python -m hrmtext.train --config experiments/tiny_cpu.py --workdir runs/tiny

Trains (or resumes, if the workdir holds a checkpoint) the model of an experiment config.
Every config field can be overridden, e.g. --config.train.steps=100. Logs go to stdout,
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tb); checkpoints to <workdir>/checkpoints.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hrmtext.cli import quiet_logs
from hrmtext.train.loop import Trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'tiny_cpu.py'),
    'Experiment config file (experiments/*.py); fields overridable as --config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny', 'Run directory: checkpoints, logs, metrics.')


def main(argv):
  quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  trainer.run()  # returning its metrics would make app.run exit 1 (sys.exit(dict))
  print(f'done: checkpoints in {os.path.join(_WORKDIR.value, "checkpoints")}, '
        f'logs in {_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main)
