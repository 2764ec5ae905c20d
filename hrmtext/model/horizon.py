"""Credit horizon (truncated backprop): which stack applications are differentiable."""
import dataclasses

from hrmtext.cli import UserError
from hrmtext.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Horizon:
  L: tuple  # per L application, in order (H_cycles * L_cycles): differentiable?
  H: tuple  # per H application (H_cycles)

  @property
  def embedding_has_gradient(self) -> bool:
    """Follows gradient reach from the embedding through the applications to the logits."""
    L_cycles = len(self.L) // len(self.H)
    z_H, z_L = True, False  # which states depend differentiably on the embedding
    for h, h_diff in enumerate(self.H):
      for l_diff in self.L[h * L_cycles:(h + 1) * L_cycles]:
        z_L = (z_L or z_H) and l_diff
      z_H = (z_H or z_L) and h_diff
    return z_H


def credit_horizon(cfg: ModelConfig, bp_steps: int | None = None) -> Horizon:
  """DESIGN §1. `bp_steps=None` makes every application differentiable."""
  n_H, n_L = cfg.H_cycles, cfg.H_cycles * cfg.L_cycles
  if cfg.L_bp_cycles:  # HF release: every H application, trailing k L steps per H cycle
    raw = cfg.L_bp_cycles
    padded = (1,) * max(0, n_H - len(raw)) + tuple(raw)
    L = tuple(l >= cfg.L_cycles - padded[h] for h in range(n_H) for l in range(cfg.L_cycles))
    return Horizon(L=L, H=(True,) * n_H)
  if bp_steps is None:
    return Horizon(L=(True,) * n_L, H=(True,) * n_H)
  H_bp = min(n_H, bp_steps - 1)
  L_bp = bp_steps - H_bp
  if H_bp < 1 or not 1 <= L_bp <= n_L:
    raise UserError(f'bp_steps={bp_steps} outside [2, {n_H + n_L}]')
  return Horizon(L=tuple(k >= n_L - L_bp for k in range(n_L)),
                 H=tuple(i >= n_H - H_bp for i in range(n_H)))
