"""The embedded default: a ~1M-parameter HRM on the built-in corpus, minutes on a laptop CPU."""
from hrmtext.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(hidden_size=128, num_heads=2, head_dim=64, layers_per_stack=1)
  c.data.dir = 'runs/data/builtin'
  c.train.update(steps=600, global_batch_tokens=16 * 256, lr=2e-3, warmup_steps=50,
                 lr_min_ratio=0.1, ema_decay=0.99)
  c.checkpoint.update(every_steps=200, keep=2)
  c.eval.update(every_steps=100)
  c.log_every_steps = 10
  return c
