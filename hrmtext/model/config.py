"""Model hyper-parameters: one frozen dataclass shared by every model and tool."""
import dataclasses
from typing import NamedTuple

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


class Architecture(NamedTuple):
  """How an architecture spends a size's n_layers and runs its recurrence (DESIGN §1; the
  reference's models/baselines): `layer_divisor` stacks' worth of n_layers go to each stack
  (2: half-depth stacks), `defaults` fill the recurrence fields left at 0."""
  layer_divisor: int
  defaults: dict


ARCHITECTURES = {
    'hrm': Architecture(2, dict(H_cycles=2, L_cycles=3)),  # credit horizon: train.bp_*
    'transformer': Architecture(1, dict(H_cycles=2, L_cycles=3)),  # one application; cycles unused
    # One shared full-depth stack: z = core(z + x), 4 times; the last 2 differentiable.
    'ut': Architecture(1, dict(H_cycles=1, L_cycles=4, L_bp=2)),
    # HRM's loop with one shared full-depth stack as both L and H.
    'trm': Architecture(1, dict(H_cycles=2, L_cycles=1, H_bp=1, L_bp=1)),
    # The same with half-depth layers and HRM's cycles: HRM's FLOPs, half its parameters.
    'trm_match': Architecture(2, dict(H_cycles=2, L_cycles=3, H_bp=2, L_bp=3)),
    # 7 x z_L = L(z_L + x), the last 4 differentiable, then one H(z_L) without injection.
    'rins': Architecture(2, dict(H_cycles=1, L_cycles=7, H_bp=1, L_bp=4)),
}
SINGLE_STACK = ('transformer', 'ut', 'trm', 'trm_match')  # one stack, named 'stack'


def stack_layers(n_layers: int, architecture: str) -> int:
  """Blocks per stack of `architecture` for a model of `n_layers` (the size table's column)."""
  if architecture not in ARCHITECTURES:
    raise UserError(f'unknown architecture {architecture!r}; have {", ".join(ARCHITECTURES)}')
  return max(1, n_layers // ARCHITECTURES[architecture].layer_divisor)


def size_preset(size: str, architecture: str) -> dict:
  """ModelConfig fields of a DESIGN §1 size ('' for none): HRM and RINS split n_layers between
  their two stacks, TRM-match's one stack has n_layers/2, the Transformer, UT and TRM stack all
  n_layers in one (so all but TRM-match have HRM's non-embedding parameters)."""
  if not size:
    return {}
  if size not in SIZES:
    raise UserError(f'unknown model size {size!r}; have {sorted(SIZES)}')
  preset = dict(SIZES[size])
  layers = stack_layers(preset.pop('n_layers'), architecture)
  return {**preset, 'layers_per_stack': layers, 'head_dim': 128}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: str = 'hrm'  # one of ARCHITECTURES
  vocab_size: int = 256  # rows of the embedding table (already padded)
  hidden_size: int = 128
  num_heads: int = 2
  head_dim: int = 64
  intermediate_size: int = 0  # 0: round_up(round(expansion * hidden * 2/3), 256)
  expansion: float = 4.0
  layers_per_stack: int = 2  # blocks in each stack (HRM: each of H and L)
  # Recurrence (0: the architecture's default, ARCHITECTURES). UT and RINS have one H cycle.
  H_cycles: int = 0
  L_cycles: int = 0
  # Credit horizon. A fixed one: the last H_bp H and the last L_bp L applications are
  # differentiable (0: the architecture's default; HRM's, both 0, follows train.bp_min/bp_max).
  H_bp: int = 0
  L_bp: int = 0
  # HRM only: the HF release's per-H-cycle list of differentiable L steps, left-padded with 1s
  # (every H application differentiable); empty: the horizon above.
  L_bp_cycles: tuple = ()
  full_bptt: bool = False  # every application differentiable, whatever the horizon says
  # Blocks: 'pre' (x += f(rms(x))) or 'post' (x = rms(x + f(x))), the reference's norm_type.
  norm_type: str = 'pre'
  # Stacks that end with MagicNorm's RMSNorm: 'all', 'none', 'H' or 'L'; '': the reference's
  # rule, all for pre-norm blocks and none for post-norm ones.
  final_norm: str = ''
  # 'prefixlm': instruction tokens attend to the whole instruction; 'causal': causally too.
  attn_type: str = 'prefixlm'
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
    if self.architecture not in ARCHITECTURES:
      raise UserError(f'unknown architecture {self.architecture!r}; have '
                      f'{", ".join(ARCHITECTURES)}')
    for name, value in ARCHITECTURES[self.architecture].defaults.items():
      if not getattr(self, name):
        object.__setattr__(self, name, value)
    choices = dict(z_L_init=('truncated_normal', 'zeros'), dtype=('float32', 'bfloat16', 'float16'),
                   norm_type=('pre', 'post'), attn_type=('prefixlm', 'causal'),
                   final_norm=('', 'all', 'none') + (() if self.single_stack else ('H', 'L')))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise UserError(f'model.{name} {getattr(self, name)!r} is not one of {allowed} '
                        f'(architecture {self.architecture})')
    sizes = ('vocab_size', 'hidden_size', 'num_heads', 'head_dim', 'layers_per_stack',
             'H_cycles', 'L_cycles')
    for name in sizes:
      if getattr(self, name) < 1:
        raise UserError(f'model.{name} must be >= 1, not {getattr(self, name)}')
    if min(self.H_bp, self.L_bp) < 0:
      raise UserError('model.H_bp and model.L_bp must be >= 0')
    if self.architecture in ('ut', 'rins') and self.H_cycles != 1:
      raise UserError(f'{self.architecture} has one H cycle, not H_cycles={self.H_cycles}')
    if self.L_bp_cycles and self.architecture != 'hrm':
      raise UserError('model.L_bp_cycles is for HRM; the baselines take H_bp and L_bp')
    if self.expansion <= 0 or self.intermediate_size < 0:
      raise UserError('model.expansion must be > 0 and model.intermediate_size >= 0')
    object.__setattr__(self, 'L_bp_cycles', tuple(self.L_bp_cycles))

  # Fields that choose how a model is run or trained, not its weights or what they compute: a
  # checkpoint can start (init_from) a run that differs from it in these alone.
  RUN_FIELDS = ('dtype', 'remat_policy', 'attention', 'unroll_loops', 'L_bp_cycles', 'z_L_init',
                'H_bp', 'L_bp', 'full_bptt')

  def weight_differences(self, other: 'ModelConfig') -> dict:
    """{field: (self's, other's)} of the fields where the two models' weights differ in shape or
    meaning (the embedding scale compared as the value it resolves to)."""
    mine, theirs = (dict(dataclasses.asdict(c), embedding_scale=c.scale,
                         intermediate_size=c.mlp_size) for c in (self, other))
    return {name: (mine[name], theirs[name]) for name in mine
            if name not in self.RUN_FIELDS and mine[name] != theirs[name]}

  @property
  def single_stack(self) -> bool:
    return self.architecture in SINGLE_STACK

  @property
  def applications(self) -> tuple[int, int]:
    """(L, H) stack applications per forward pass, by role: a shared stack plays L (UT) or both
    (TRM); the Transformer's one application counts as H."""
    if self.architecture == 'transformer':
      return 0, 1
    return self.H_cycles * self.L_cycles, 0 if self.architecture == 'ut' else self.H_cycles

  def has_final_norm(self, stack: str) -> bool:
    """Does stack `stack` ('L', 'H' or a single stack's 'stack') end with MagicNorm's RMSNorm?"""
    if not self.final_norm:
      return self.norm_type == 'pre'
    return self.final_norm in ('all', stack)

  def with_cycles(self, H_cycles: int, L_cycles: int) -> 'ModelConfig':
    """This model run with other cycle counts (test-time depth); 0 keeps a count."""
    if self.architecture == 'transformer':
      raise UserError('the Transformer has no cycles to change')
    return dataclasses.replace(self, H_cycles=H_cycles or self.H_cycles,
                               L_cycles=L_cycles or self.L_cycles)

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
