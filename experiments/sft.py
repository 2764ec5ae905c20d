r"""Supervised fine-tuning from a pretrain run with the reference SFT recipe (DESIGN §3).

  python -m hrmtext.train --config experiments/sft.py --workdir runs/sft \
      --config.init_from=runs/tiny --config.data.dir=runs/data/my_sft_set
  python -m hrmtext.train --config experiments/sft.py:XL --workdir runs/sft_xl \
      --config.init_from=runs/xl --config.data.dir=SFT_DATA [--config.init_mode=ema]

The argument is `tiny` (the default: the tiny_cpu model, minutes on a CPU) or a size of
experiments/hrm.py (B, L, XL, XXL), whose model it fine-tunes with the reference recipe: lr 3e-5,
no warmup, cosine to 0.1 x lr, 32,768-token global batches, 5 epochs, weight decay 0.1, betas
(0.9, 0.95), EMA 0.999, bp_steps 5 from the first step.

`init_mode` says how the run starts from `init_from` (its latest checkpoint):
  continue  (default, as the reference) the source's params, EMA, optimizer moments and per-leaf
            counts; the step counter and schedules restart at 0 and this recipe's betas, weight
            decay and EMA decay apply.
  ema       the source's EMA weights with a fresh optimizer and EMA (the reference's
            weights_only_resume_from_ema); `params`: the same from its raw weights.
An imported HF checkpoint has weights only: fine-tune it with init_mode ema or params.
Re-running the same command resumes the SFT run itself, exactly.

LoRA instead of full fine-tuning: add --config.lora.rank=16 (alpha 32, every projection and the
LM head by default; hrmtext.model.lora). The weights of `init_from` stay frozen (its EMA with
init_mode ema, else its params) and only the adapters train; the run refers to `init_from`.
"""
import os

from hrmtext.training.config import base_config, experiment_config


def sft_recipe(c, *, lr: float, global_batch_tokens: int, epochs: int, ema_decay: float):
  """The reference SFT schedule on config `c`: no warmup, cosine to 0.1 x lr, full credit
  horizon (train.horizon.bp_max) from the first step, continue from `init_from`."""
  c.train.update(lr=lr, warmup_steps=0, lr_min_ratio=0.1, global_batch_tokens=global_batch_tokens,
                 epochs=epochs, steps=0, weight_decay=0.1, b1=0.9, b2=0.95, ema_decay=ema_decay)
  c.train.horizon.warmup_ratio = 0.0
  c.init_mode = 'continue'
  return c


def pretrain_config(size: str):
  """experiments/hrm.py's config at `size`: the model the fine-tuning starts from."""
  return experiment_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hrm.py'), size)


def get_config(arg: str = 'tiny'):
  if arg == 'tiny':
    c = base_config()
    c.model.update(hidden_size=128, num_heads=2, head_dim=64, layers_per_stack=1)
    c.data.dir = 'runs/data/builtin'
    sft_recipe(c, lr=5e-4, global_batch_tokens=16 * 256, epochs=1, ema_decay=0.99)
    c.train.steps = 200
    c.checkpoint.update(every_steps=100, keep=1)
    c.eval.update(every_steps=50)
    c.init_from = 'runs/tiny'
    return c
  c = sft_recipe(pretrain_config(arg), lr=3e-5, global_batch_tokens=32_768, epochs=5,
                 ema_decay=0.999)
  c.init_from = f'runs/{arg.lower()}'
  return c
