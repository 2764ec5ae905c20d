"""HRM-Text L with the reference recipe (DESIGN §3): 4096-token rows, bf16 compute."""
from hrmtext.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(size='L', dtype='bfloat16')
  c.data.seq_len = 4096
  c.data.tokenizer.vocab_size = 65_536
  c.train.update(lr=2.5e-4, global_batch_tokens=172_032)
  return c
