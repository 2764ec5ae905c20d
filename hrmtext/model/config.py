"""Model hyper-parameters: one frozen dataclass shared by every model and tool."""
import dataclasses

from hrmtext.cli import UserError

# DESIGN §1 sizes: n_layers is split evenly between the H and L stacks.
SIZES = {
    'B': dict(n_layers=12, hidden_size=1024, num_heads=8),
    'L': dict(n_layers=24, hidden_size=1280, num_heads=10),
    'XL': dict(n_layers=32, hidden_size=1536, num_heads=12),
    'XXL': dict(n_layers=72, hidden_size=1792, num_heads=14),
}


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def size_preset(size: str, architecture: str) -> dict:
  """ModelConfig fields of a DESIGN §1 size ('' for none): HRM splits n_layers between H and
  L, the Transformer baseline stacks them all (equal non-embedding parameters)."""
  if not size:
    return {}
  if size not in SIZES:
    raise UserError(f'unknown model size {size!r}; have {sorted(SIZES)}')
  preset = dict(SIZES[size])
  n_layers = preset.pop('n_layers')
  layers = n_layers if architecture == 'transformer' else n_layers // 2
  return {**preset, 'layers_per_stack': layers, 'head_dim': 128}


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
  attention: str = 'xla'  # attention kernel: one of attention.IMPLEMENTATIONS or 'auto'
  # Unroll the layer and L-step loops: more room for XLA scheduling, exact cost analysis.
  unroll_loops: bool = False

  def __post_init__(self):
    if self.architecture not in ('hrm', 'transformer'):
      raise UserError(f'unknown architecture {self.architecture!r}')
    if self.z_L_init not in ('truncated_normal', 'zeros'):
      raise UserError(f'unknown z_L_init {self.z_L_init!r}')
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise UserError(f'unknown dtype {self.dtype!r}')
    sizes = ('vocab_size', 'hidden_size', 'num_heads', 'head_dim', 'layers_per_stack',
             'H_cycles', 'L_cycles')
    for name in sizes:
      if getattr(self, name) < 1:
        raise UserError(f'model.{name} must be >= 1, not {getattr(self, name)}')
    if self.expansion <= 0 or self.intermediate_size < 0:
      raise UserError('model.expansion must be > 0 and model.intermediate_size >= 0')
    object.__setattr__(self, 'L_bp_cycles', tuple(self.L_bp_cycles))

  # Fields that choose how a model is run or trained, not its weights or what they compute: a
  # checkpoint can start (init_from) a run that differs from it in these alone.
  RUN_FIELDS = ('dtype', 'remat_policy', 'attention', 'unroll_loops', 'L_bp_cycles', 'z_L_init')

  def weight_differences(self, other: 'ModelConfig') -> dict:
    """{field: (self's, other's)} of the fields where the two models' weights differ in shape or
    meaning (the embedding scale compared as the value it resolves to)."""
    mine, theirs = (dict(dataclasses.asdict(c), embedding_scale=c.scale,
                         intermediate_size=c.mlp_size) for c in (self, other))
    return {name: (mine[name], theirs[name]) for name in mine
            if name not in self.RUN_FIELDS and mine[name] != theirs[name]}

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
    """Builds from a (ConfigDict) mapping: `size` ('B', 'L', 'XL', 'XXL') sets the preset
    sizes, then every field that is not None overrides it; `vocab_multiple` pads the vocab."""
    d = {name: value for name, value in dict(d).items() if value is not None}
    size = d.pop('size', '')
    vocab_multiple = d.pop('vocab_multiple', 1)
    d = {**size_preset(size, d.get('architecture', 'hrm')), **d}
    d['vocab_size'] = round_up(d.get('vocab_size', cls.vocab_size), vocab_multiple)
    return cls(**d)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['L_bp_cycles'] = list(self.L_bp_cycles)
    return d
