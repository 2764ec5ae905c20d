r"""HRM-Text at a DESIGN §1 size with the reference pretraining recipe (DESIGN §3).

  python -m hrmtext.train --config experiments/hrm.py:XL --workdir runs/xl --config.data.dir=DATA
  python -m hrmtext.bench --config experiments/hrm.py:L --compile_only
  python -m hrmtext.bench --config experiments/hrm.py:L --config.model.architecture=transformer

The argument is the size: B, L, XL (the default; 1.18B parameters at a 65,536 vocabulary) or XXL.
`--config.model.architecture=transformer` gives the baseline: the same recipe and blocks with all
n_layers of the size in one stack, so its non-embedding parameters equal HRM's.
4096-token rows, bf16 compute with fp32 master weights, AdamATan2, EMA 0.9999, credit horizon
warming up from 2 to 5 steps over the first 20% of training.
"""
from hrmtext.training.config import base_config

# Per size: (peak lr, global batch tokens). The reference trains L at 2.5e-4 on 42 x 4096-token
# rows, every other size at 2.2e-4 on 48 rows.
RECIPES = {'B': (2.2e-4, 196_608), 'L': (2.5e-4, 172_032), 'XL': (2.2e-4, 196_608),
           'XXL': (2.2e-4, 196_608), 'XXL_wide': (2.2e-4, 196_608)}


def get_config(size: str = 'XL'):
  if size not in RECIPES:
    raise ValueError(f'unknown size {size!r}; have {sorted(RECIPES)}')
  lr, batch_tokens = RECIPES[size]
  c = base_config()
  c.model.size = size
  # bf16 compute; the fewest micro-batches and the cheapest remat that fit the devices' memory
  # (hrmtext.training.fit); the attention kernel for the devices (compute.attention 'auto').
  c.compute.update(dtype='bfloat16', remat_policy='auto')
  c.train.micro_batches = 0
  c.data.seq_len = 4096
  c.data.tokenizer.vocab_size = 65_536
  c.train.update(lr=lr, global_batch_tokens=batch_tokens)
  return c
