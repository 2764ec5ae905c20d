"""The embedded default: a ~0.8M-parameter HRM on the built-in corpus, minutes on a laptop CPU.

300 steps of 4096 tokens (about 1.2 epochs of the built-in mix) take ~6 minutes on 2 CPU cores.
"""
from hrmtext.training.config import base_config


def get_config():
  c = base_config()
  c.model.update(hidden_size=128, num_heads=2, head_dim=64, layers_per_stack=1)
  c.data.dir = 'runs/data/builtin'
  c.train.update(steps=300, global_batch_tokens=8 * 512, lr=2e-3, warmup_steps=30,
                 lr_min_ratio=0.1, ema_decay=0.99)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=50)
  c.log_every_steps = 10
  return c
