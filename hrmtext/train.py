"""python -m hrmtext.train --config experiments/tiny_cpu.py --workdir runs/tiny

Trains (or resumes, if the workdir holds a checkpoint) the model of an experiment config.
Every config field can be overridden, e.g. --config.train.steps=100. Logs go to stdout,
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tb); checkpoints to <workdir>/checkpoints.

Fine-tuning (experiments/sft.py[:SIZE]): --config.init_from=RUN starts a new run from RUN's latest
checkpoint; --config.init_mode=continue (default, as the reference: its params, EMA, optimizer
moments and counts, step and schedules from 0) | ema | params (those weights, fresh optimizer).
"""
import os

from absl import flags

from hrmtext import cli
from hrmtext.training.loop import Trainer

_CONFIG = cli.define_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'experiments', 'tiny_cpu.py'),
    'Experiment config file (experiments/*.py); fields overridable as --config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny', 'Run directory: checkpoints, logs, metrics.')


def main(_):
  Trainer(_CONFIG.value, _WORKDIR.value).run()
  print(f'done: checkpoints in {os.path.join(_WORKDIR.value, "checkpoints")}, '
        f'logs in {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main, multi_process=True)
