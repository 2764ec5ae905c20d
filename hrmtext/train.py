"""python -m hrmtext.train --config experiments/tiny_cpu.py --workdir runs/tiny

Trains (or resumes, if the workdir holds a checkpoint) the model of an experiment config.
Every config field can be overridden, e.g. --config.train.steps=100. Logs go to stdout,
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tb); checkpoints to <workdir>/checkpoints, with
the resolved config (config.json) and a copy of the data's tokenizer (tokenizer/): the run needs
its data only to train on (hrmtext.run).

Fine-tuning (experiments/sft.py[:SIZE]): --config.init_from=RUN starts a new run from RUN's latest
checkpoint; --config.init_mode=continue (default, as the reference: its params, EMA, optimizer
moments and counts, step and schedules from 0) | ema | params (those weights, fresh optimizer).
"""
import os

import jax
from absl import flags

from hrmtext import cli
from hrmtext.data import pipeline
from hrmtext.evals.engine import HeldoutGeneration
from hrmtext.training.loop import Trainer

_CONFIG = cli.define_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'experiments', 'tiny_cpu.py'),
    'Experiment config file (experiments/*.py); fields overridable as --config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/tiny', 'Run directory: checkpoints, logs, metrics.')


def generation_eval(trainer: Trainer) -> HeldoutGeneration | None:
  """eval.generate_per_task: greedy exact match per held-out task at each eval, on the training
  mesh (the engine serves one process's devices: single-process runs only)."""
  config = trainer.config
  if not config.eval.generate_per_task:
    return None
  if jax.process_count() > 1:
    trainer.say('eval.generate_per_task is skipped in multi-process runs; use hrmtext.evaluate')
    return None
  return HeldoutGeneration.build(
      trainer.program.model, config.data.dir, pipeline.sampled_dir(config.data),
      every_steps=config.eval.every_steps, limit=config.eval.generate_per_task,
      max_new_tokens=config.data.seq_len, mesh=trainer.mesh)


def main(_):
  trainer = Trainer(_CONFIG.value, _WORKDIR.value)
  generation = generation_eval(trainer)
  if generation is not None:
    trainer.evaluators.append(generation)
  trainer.run()
  print(f'done: checkpoints in {trainer.run_dir.checkpoints}, logs in {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main, multi_process=True)
