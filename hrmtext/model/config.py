"""Model hyper-parameters: one frozen dataclass shared by every model and tool."""
import dataclasses

# DESIGN §1 sizes: n_layers is split evenly between the H and L stacks.
SIZES = {
    'B': dict(n_layers=12, hidden_size=1024, num_heads=8),
    'L': dict(n_layers=24, hidden_size=1280, num_heads=10),
    'XL': dict(n_layers=32, hidden_size=1536, num_heads=12),
    'XXL': dict(n_layers=72, hidden_size=1792, num_heads=14),
}


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: str = 'hrm'  # 'hrm' | 'transformer'
  vocab_size: int = 256  # rows of the embedding table (already padded)
  hidden_size: int = 128
  num_heads: int = 2
  head_dim: int = 64
  intermediate_size: int = 0  # 0: round_up(round(expansion * hidden * 2/3), 256)
  expansion: float = 4.0
  layers_per_stack: int = 2  # blocks in each of H and L (the Transformer's only stack)
  H_cycles: int = 2
  L_cycles: int = 3
  # Credit horizon mode: empty -> `bp_steps` (reference training code); otherwise the HF
  # release's per-H-cycle list of differentiable L steps, left-padded with 1s.
  L_bp_cycles: tuple = ()
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  embedding_scale: float = 0.0  # 0: sqrt(hidden_size), the inverse of the init std
  z_L_init: str = 'truncated_normal'  # 'truncated_normal' (reference training) | 'zeros' (HF)
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat_policy: str = 'nothing_saveable'  # see layers.REMAT_POLICIES
  attention: str = 'xla'  # attention kernel, see attention.IMPLEMENTATIONS
  # Unroll the layer and L-step loops: more room for XLA scheduling, exact cost analysis.
  unroll_loops: bool = False

  def __post_init__(self):
    if self.architecture not in ('hrm', 'transformer'):
      raise ValueError(f'unknown architecture {self.architecture!r}')
    if self.z_L_init not in ('truncated_normal', 'zeros'):
      raise ValueError(f'unknown z_L_init {self.z_L_init!r}')
    object.__setattr__(self, 'L_bp_cycles', tuple(self.L_bp_cycles))

  @property
  def mlp_size(self) -> int:
    if self.intermediate_size:
      return self.intermediate_size
    return round_up(round(self.expansion * self.hidden_size * 2 / 3), 256)

  @property
  def scale(self) -> float:
    return self.embedding_scale or self.hidden_size**0.5

  @classmethod
  def from_dict(cls, d) -> 'ModelConfig':
    """Builds from a (ConfigDict) mapping, expanding `size: 'XL'` and `vocab_multiple`."""
    d = dict(d)
    size = d.pop('size', None)
    vocab_multiple = d.pop('vocab_multiple', 1)
    if size:
      preset = dict(SIZES[size])
      n_layers = preset.pop('n_layers')
      layers = n_layers if d.get('architecture') == 'transformer' else n_layers // 2
      d = {**preset, 'layers_per_stack': layers, 'head_dim': 128, **d}
    d['vocab_size'] = round_up(d['vocab_size'], vocab_multiple)
    return cls(**d)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['L_bp_cycles'] = list(self.L_bp_cycles)
    return d
