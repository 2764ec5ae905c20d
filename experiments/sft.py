"""Supervised fine-tuning of a pretrained run: same loop, EMA weights in, fresh optimizer.

  python -m hrmtext.train --config experiments/sft.py --workdir runs/sft \
      --config.init_from=runs/tiny --config.data.dir=runs/data/my_sft_set
"""
from hrmtext.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(hidden_size=128, num_heads=2, head_dim=64, layers_per_stack=1)
  c.init_from = 'runs/tiny'
  c.init_use_ema = True
  c.data.dir = 'runs/data/builtin'
  c.train.update(steps=200, global_batch_tokens=16 * 256, lr=5e-4, warmup_steps=20,
                 bp_min=5, bp_max=5, ema_decay=0.99)
  c.checkpoint.update(every_steps=100, keep=1)
  c.eval.update(every_steps=50)
  return c
