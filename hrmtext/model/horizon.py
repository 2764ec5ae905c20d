"""Credit horizon (truncated backprop): which stack applications are differentiable."""
import dataclasses

from hrmtext.cli import UserError
from hrmtext.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Horizon:
  L: tuple  # per L application, in order (H_cycles * L_cycles): differentiable?
  H: tuple  # per H application (HRM: H_cycles)

  @property
  def differentiable(self) -> int:
    """Differentiable applications (HRM: its bp_steps)."""
    return sum(self.L) + sum(self.H)


def full_horizon(cfg: ModelConfig) -> Horizon:
  """Every application differentiable."""
  n_L, n_H = cfg.applications
  return Horizon(L=(True,) * n_L, H=(True,) * n_H)


def credit_horizon(cfg: ModelConfig, bp_steps: int | None = None) -> Horizon:
  """DESIGN §1: the horizon of a train step at `bp_steps` (HRM's warmup schedule), or the
  model's fixed one (`L_bp_cycles`; `H_bp`/`L_bp`, the baselines' reference values), or with
  `full_bptt` every application. `bp_steps=None` (no truncation asked for) makes every
  application differentiable except in the L_bp_cycles mode."""
  n_L, n_H = cfg.applications
  if cfg.full_bptt or cfg.architecture == 'transformer':
    return full_horizon(cfg)
  if cfg.L_bp_cycles:  # HF release: every H application, trailing k L steps per H cycle
    raw = cfg.L_bp_cycles
    padded = (1,) * max(0, n_H - len(raw)) + tuple(raw)
    L = tuple(l >= cfg.L_cycles - padded[h] for h in range(n_H) for l in range(cfg.L_cycles))
    return Horizon(L=L, H=(True,) * n_H)
  if bp_steps is None:
    return full_horizon(cfg)
  if cfg.H_bp or cfg.L_bp:
    H_bp, L_bp = cfg.H_bp, cfg.L_bp
    # Differentiable applications are the last ones: the output depends on them.
    if not (1 <= L_bp <= n_L and (1 <= H_bp <= n_H if n_H else H_bp == 0)):
      raise UserError(f'model.H_bp={H_bp}, L_bp={L_bp}: {cfg.architecture} needs 1 <= L_bp <= '
                      f'{n_L} and ' + (f'1 <= H_bp <= {n_H}' if n_H else 'H_bp=0 (it has no H)'))
  else:  # HRM's bp_steps: H first, at least one L
    H_bp = min(n_H, bp_steps - 1)
    L_bp = bp_steps - H_bp
    if H_bp < 1 or not 1 <= L_bp <= n_L:
      raise UserError(f'bp_steps={bp_steps} outside [2, {n_H + n_L}]')
  return Horizon(L=tuple(k >= n_L - L_bp for k in range(n_L)),
                 H=tuple(i >= n_H - H_bp for i in range(n_H)))
