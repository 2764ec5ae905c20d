"""RL with verifiable rewards (hrmtext.rl): GRPO with DAPO's options from a trained run.

  python -m hrmtext.rl --config experiments/rl.py --workdir runs/rl --config.init_from=runs/tiny

'tiny' (default): the quick start's model on syllogism, the one built-in task whose sampled
answers depend on the prompt at that size (experiments/rl_probe.py), 16 prompts x 8 samples a
step, 60 steps at lr 3e-4 (the README's two seeds; --config.rl.tasks=... for others). B/L/XL/XXL:
experiments/sft.py's model of that size (init_from runs/<size>_sft), 4096-token rows,
micro-batches fitted to the devices, 16 engine slots (an H100 holds their cache beside the state).
"""
import os

from hrmtext.rl.config import rl_config
from hrmtext.training.config import experiment_config


def get_config(arg: str = 'tiny'):
  c = rl_config()
  if arg == 'tiny':
    c.init_from = 'runs/tiny'
    c.rl.tasks = 'syllogism'
    c.train.update(steps=60, lr=3e-4)
    return c
  sized = experiment_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft.py'),
                            arg)
  c.model, c.compute, c.mesh = sized.model, sized.compute, sized.mesh
  c.data.seq_len = sized.data.seq_len
  c.init_from = f'runs/{arg.lower()}_sft'
  c.train.update(steps=500, lr=1e-6, global_batch_tokens=64 * sized.data.seq_len, micro_batches=0)
  # 16 slots x 2048 tokens: the engine's KV cache (about 0.75 MB a token at XL) beside the
  # train state on one H100 (python -m hrmtext.rl --compile_only --target h100:1).
  c.rl.update(prompts_per_step=64, group_size=16, max_new_tokens=1024, slots=16)
  return c
