"""Baseline: a plain 24-layer Transformer with the HRM L size and the same training stack."""
from hrmtext.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(size='L', architecture='transformer', dtype='bfloat16')
  c.data.seq_len = 4096
  c.data.tokenizer.vocab_size = 65_536
  c.train.update(lr=2.5e-4, global_batch_tokens=172_032)
  return c
