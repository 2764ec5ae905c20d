"""Credit horizon (truncated backprop): which stack applications are differentiable.

A Horizon says it per application. The functions below make the ones DESIGN §1 describes; which
one a train step uses is the run's choice (`hrmtext.training.schedules.horizon_schedule`).
"""
import dataclasses

from hrmtext.errors import UserError
from hrmtext.model.config import ARCHITECTURES, ModelConfig


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


def fixed_horizon(cfg: ModelConfig, H_bp: int, L_bp: int) -> Horizon:
  """The last H_bp H applications and the last L_bp L applications differentiable (the
  output depends on them; the baselines' reference horizons)."""
  n_L, n_H = cfg.applications
  if cfg.architecture == 'transformer':
    return full_horizon(cfg)
  if not (1 <= L_bp <= n_L and (1 <= H_bp <= n_H if n_H else H_bp == 0)):
    raise UserError(f'horizon H_bp={H_bp}, L_bp={L_bp}: {cfg.architecture} needs 1 <= L_bp <= '
                    f'{n_L} and ' + (f'1 <= H_bp <= {n_H}' if n_H else 'H_bp=0 (it has no H)'))
  return Horizon(L=tuple(k >= n_L - L_bp for k in range(n_L)),
                 H=tuple(i >= n_H - H_bp for i in range(n_H)))


def bp_steps_horizon(cfg: ModelConfig, bp_steps: int) -> Horizon:
  """HRM's horizon of `bp_steps` differentiable applications: H first (at most H_cycles, at
  least one L), then L (DESIGN §1)."""
  n_L, n_H = cfg.applications
  if cfg.architecture == 'transformer':
    return full_horizon(cfg)
  H_bp = min(n_H, bp_steps - 1)
  L_bp = bp_steps - H_bp
  if (n_H and H_bp < 1) or not 1 <= L_bp <= n_L:
    raise UserError(f'bp_steps={bp_steps} outside [{2 if n_H else 1}, {n_H + n_L}]')
  return fixed_horizon(cfg, H_bp, L_bp)


def per_cycle_horizon(cfg: ModelConfig, L_bp_cycles) -> Horizon:
  """The HF release's: every H application, and per H cycle its trailing L steps,
  `L_bp_cycles` left-padded with 1s."""
  n_L, n_H = cfg.applications
  padded = (1,) * max(0, n_H - len(L_bp_cycles)) + tuple(L_bp_cycles)
  L = tuple(l >= cfg.L_cycles - padded[h] for h in range(n_H) for l in range(cfg.L_cycles))
  return Horizon(L=L, H=(True,) * n_H)


def architecture_horizon(cfg: ModelConfig, bp_steps: int) -> Horizon:
  """The horizon `cfg`'s architecture trains with (ARCHITECTURES) where HRM's schedule is at
  `bp_steps`: HRM's bp_steps one, the Transformer's full one, the other baselines' fixed reference
  ones (whatever bp_steps)."""
  default = ARCHITECTURES[cfg.architecture].horizon
  if default == 'warmup':
    return bp_steps_horizon(cfg, bp_steps)
  if default == 'full':
    return full_horizon(cfg)
  return fixed_horizon(cfg, *default)
