"""The RL experiment schema: base_config's (model, compute, train, mesh, checkpoint, eval) plus
`rl`, the rollout and objective settings. experiments/rl.py starts from `rl_config()`."""
import ml_collections

from hrmtext.errors import UserError
from hrmtext.model import ModelConfig
from hrmtext.training.config import base_config


def rl_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.rl = ml_collections.ConfigDict(dict(
      # A JSONL/Parquet file or folder of prompt rows (hrmtext.rl.prompts); '': the built-in RL
      # split of the data root (data.dir; unset: the one init_from trained on).
      prompts='',
      tasks='',  # comma-separated: only these tasks' prompts (and held-out evals); '': all
      prompts_per_step=16,
      group_size=8,  # sampled responses per prompt (GRPO's G)
      temperature=1.0, top_p=1.0, max_new_tokens=32,
      slots=128,  # the engine's concurrent sequences (also the held-out eval's)
      inner_steps=2,  # optimizer updates per rollout batch (the first one's ratio is exactly 1)
      clip_low=0.2, clip_high=0.28,  # DAPO's asymmetric clipping
      token_level=True,  # DAPO's token-level normalisation; False: GRPO's per response
      # DAPO's dynamic sampling: groups whose rewards are all equal are dropped and refilled by
      # drawing more prompts, up to max_draws draws a step.
      dynamic_sampling=True, max_draws=4,
      drop_overlong=True,  # responses cut by max_new_tokens get no gradient
      kl_coef=0.0,  # > 0: k3 KL to the frozen init_from weights
      # 'H,L': the policy's recurrence depth, H_cycles and L_cycles (0 keeps one), for rollouts,
      # updates and evals alike: test-time depth, trained on; '': init_from's.
      cycles='',
  ))
  c.init_mode = 'ema'  # the policy starts from init_from's EMA weights (or 'params')
  # RL defaults: a constant learning rate, the horizon of SFT (bp_max from the first step), the
  # EMA equal to the policy (decay 0: evals, saves and exports see what was sampled from).
  c.train.update(lr=1e-4, warmup_steps=0, lr_min_ratio=1.0, ema_decay=0.0, micro_batches=1,
                 global_batch_tokens=32 * 256, weight_decay=0.0)
  c.train.horizon.warmup_ratio = 0.0
  c.data.dir = ''  # unset: init_from's data root
  c.data.seq_len = 256
  c.eval.update(every_steps=10, generate_per_task=64)
  c.checkpoint.update(every_steps=10, keep=2)
  c.log_every_steps = 1
  return c


_RULES = (
    ('prompts_per_step', 1), ('group_size', 2), ('max_new_tokens', 1), ('slots', 1),
    ('inner_steps', 1), ('max_draws', 1),
)


def validate_rl(config: ml_collections.ConfigDict) -> None:
  """UserError naming the first `rl` or run field that cannot work."""
  if not config.init_from:
    raise UserError('config init_from is unset: RL starts from a trained run '
                    '(--config.init_from=RUN)')
  if config.init_mode not in ('ema', 'params'):
    raise UserError(f"config init_mode={config.init_mode!r}: must be 'ema' or 'params'")
  if not config.train.steps:
    raise UserError('config train.steps=0: RL has no epochs; give the number of steps')
  for field, low in _RULES:
    if config.rl[field] < low:
      raise UserError(f'config rl.{field}={config.rl[field]!r}: must be >= {low}')
  if not 0 < config.rl.top_p <= 1 or config.rl.temperature < 0:
    raise UserError('config rl.top_p must be in (0, 1] and rl.temperature >= 0')
  if config.rl.clip_low < 0 or config.rl.clip_high < 0 or config.rl.kl_coef < 0:
    raise UserError('config rl.clip_low, rl.clip_high and rl.kl_coef must be >= 0')
  policy_cycles(config)


def policy_cycles(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """rl.cycles as (H_cycles, L_cycles), 0 keeping a count; None when unset."""
  if not config.rl.cycles:
    return None
  counts = str(config.rl.cycles).split(',')
  if len(counts) != 2 or not all(c.strip().isdigit() for c in counts):
    raise UserError(f'config rl.cycles={config.rl.cycles!r}: give H,L (e.g. 3,4; 0 keeps one)')
  return int(counts[0]), int(counts[1])


def with_policy_depth(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its model's cycle counts set by rl.cycles (a copy; unset: `config`)."""
  cycles = policy_cycles(config)
  if cycles is None:
    return config
  deeper = ModelConfig.from_dict(config.model.to_dict()).with_cycles(*cycles)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(H_cycles=deeper.H_cycles, L_cycles=deeper.L_cycles)
  return config
