"""python -m hrmtext.rl --config experiments/rl.py --workdir runs/rl --config.init_from=runs/tiny

Post-trains the run `init_from` with verifiable rewards (GRPO with DAPO's options; hrmtext.rl.
trainer): rollouts from the engine on the current weights, rewards from each prompt's verifier,
clipped policy-gradient updates. Every config field is a flag (--config.rl.group_size=8,
--config.train.steps=N); re-running the same command resumes the run. Logs go to stdout,
<workdir>/metrics.jsonl (reward/mean, reward/<task>, groups_kept, clip_fraction, kl, entropy,
rollout and train tokens/s, eval_gen/<task>/exact_match) and TensorBoard (<workdir>/tb).
"""
import os

from absl import flags

from hrmtext import cli
from hrmtext.rl.trainer import RLTrainer

_CONFIG = cli.define_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'rl.py'),
    'RL experiment config file (experiments/rl.py[:SIZE]); fields overridable as '
    '--config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/rl', 'Run directory: checkpoints, logs, metrics.')


def main(_):
  trainer = RLTrainer(_CONFIG.value, _WORKDIR.value)
  trainer.run()
  print(f'done: checkpoints in {trainer.run_dir.checkpoints}, logs in {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main)
