"""python -m hrmtext.rl --config experiments/rl.py --workdir runs/rl --config.init_from=runs/tiny

Post-trains the run `init_from` with verifiable rewards (GRPO with DAPO's options; hrmtext.rl.
trainer): rollouts from the engine on the current weights, rewards from each prompt's verifier,
clipped policy-gradient updates. Every config field is a flag (--config.rl.group_size=8,
--config.train.steps=N); re-running the same command resumes the run. Logs go to stdout,
<workdir>/metrics.jsonl (reward/mean, reward/<task>, groups_kept, clip_fraction, kl, entropy,
rollout and train tokens/s, eval_gen/<task>/exact_match) and TensorBoard (<workdir>/tb).

  python -m hrmtext.rl --config experiments/rl.py:XL --compile_only --target h100:1

compiles what such a run runs (the update, the engine's prefill and decode, on one mesh) for
devices that need not be here, and reports each program's memory per device; no run is needed.
"""
import os

from absl import flags

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.parallel import targets
from hrmtext.parallel.mesh import make_mesh
from hrmtext.rl.config import validate_rl
from hrmtext.rl.program import RLProgram
from hrmtext.rl.trainer import RLTrainer

_CONFIG = cli.define_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'rl.py'),
    'RL experiment config file (experiments/rl.py[:SIZE]); fields overridable as '
    '--config.a.b=value.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/rl', 'Run directory: checkpoints, logs, metrics.')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Only compile the update and the engine on abstract inputs and report '
    'their per-device memory (nothing is allocated; no init_from run is read).')
_TARGET = flags.DEFINE_string(
    'target', '', 'With --compile_only: compile for these devices instead of this machine\'s, '
    'e.g. h100:1 or v5p:2x2x1 (hrmtext.parallel.targets; the targets extra).')
_VOCAB = flags.DEFINE_integer('vocab', 65536, 'With --compile_only: the vocabulary size when '
                              'config.model.vocab_size is unset.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 1024, 'With --compile_only: the longest prompt.')


def compile_only(config) -> None:
  validate_rl(config)
  mesh = make_mesh(config.mesh, targets.devices(_TARGET.value) if _TARGET.value else None)
  program = RLProgram(config, mesh, vocab_size=_VOCAB.value, eoa=0,
                      max_prompt_len=_PROMPT_LEN.value)
  memory = program.memory()
  c = program.config
  print(f'{mesh.devices.flat[0].device_kind} x {mesh.devices.size}, mesh {dict(mesh.shape)}: '
        f'{program.rows} rows x {c.data.seq_len} tokens in {c.train.micro_batches} micro-batches, '
        f'remat {c.compute.remat_policy}, attention {c.compute.attention}; engine '
        f'{program.engine.slots} slots x {program.engine.max_len} tokens')
  print('memory per device: ' + ', '.join(f'{name} {b / 2**30:.1f} GiB'
                                          for name, b in memory.items()))


def main(_):
  if _TARGET.value:  # before a JAX backend starts: the target's compiler reads its environment
    if not _COMPILE_ONLY.value:
      raise UserError('--target needs --compile_only (the target\'s devices are not here)')
    targets.prepare_environment(_TARGET.value)
  if _COMPILE_ONLY.value:
    return compile_only(_CONFIG.value)
  trainer = RLTrainer(_CONFIG.value, _WORKDIR.value)
  trainer.run()
  print(f'done: checkpoints in {trainer.run_dir.checkpoints}, logs in {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main)
