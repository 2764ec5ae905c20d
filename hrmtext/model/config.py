"""Model hyper-parameters: one frozen dataclass shared by every model and tool."""
import dataclasses
from typing import NamedTuple

from hrmtext.errors import UserError

# DESIGN §1 sizes: n_layers is split evenly between the H and L stacks.
SIZES = {
    'B': dict(n_layers=12, hidden_size=1024, num_heads=8),
    'L': dict(n_layers=24, hidden_size=1280, num_heads=10),
    'XL': dict(n_layers=32, hidden_size=1536, num_heads=12),
    'XXL': dict(n_layers=72, hidden_size=1792, num_heads=14),
    'XXL_wide': dict(n_layers=32, hidden_size=2560, num_heads=20),
}


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class Architecture(NamedTuple):
  """How an architecture spends a size's n_layers and runs its recurrence (DESIGN §1; the
  reference's models/baselines): `layer_divisor` stacks' worth of n_layers go to each stack
  (2: half-depth stacks), `cycles` are its (H_cycles, L_cycles), `horizon` its credit horizon
  unless the run says otherwise: 'warmup' (HRM's bp_steps schedule), 'full', or (H_bp, L_bp)
  fixed, the last H_bp H and L_bp L applications differentiable."""
  layer_divisor: int
  cycles: tuple
  horizon: str | tuple


ARCHITECTURES = {
    'hrm': Architecture(2, (2, 3), 'warmup'),
    'transformer': Architecture(1, (2, 3), 'full'),  # one application; cycles unused
    # One shared full-depth stack: z = core(z + x), 4 times; the last 2 differentiable.
    'ut': Architecture(1, (1, 4), (0, 2)),
    # HRM's loop with one shared full-depth stack as both L and H.
    'trm': Architecture(1, (2, 1), (1, 1)),
    # The same with half-depth layers and HRM's cycles: HRM's FLOPs, half its parameters.
    'trm_match': Architecture(2, (2, 3), (2, 3)),
    # 7 x z_L = L(z_L + x), the last 4 differentiable, then one H(z_L) without injection.
    'rins': Architecture(2, (1, 7), (1, 4)),
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
  """What the weights are and what they compute: two checkpoints with equal ModelConfigs are
  interchangeable. How a model is run (dtype, kernels, remat) is `ComputeConfig`."""
  architecture: str = 'hrm'  # one of ARCHITECTURES
  vocab_size: int = 256  # rows of the embedding table (already padded)
  hidden_size: int = 128
  num_heads: int = 2
  head_dim: int = 64
  intermediate_size: int = 0  # 0: round_up(round(expansion * hidden * 2/3), 256)
  expansion: float = 4.0
  layers_per_stack: int = 2  # blocks in each stack (HRM: each of H and L)
  # Recurrence (0: the architecture's, ARCHITECTURES; `from_dict` fills them). UT and RINS have
  # one H cycle.
  H_cycles: int = 0
  L_cycles: int = 0
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

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise UserError(f'unknown architecture {self.architecture!r}; have '
                      f'{", ".join(ARCHITECTURES)}')
    if not self.H_cycles or not self.L_cycles:  # a config built directly, not by from_dict
      H_cycles, L_cycles = ARCHITECTURES[self.architecture].cycles
      object.__setattr__(self, 'H_cycles', self.H_cycles or H_cycles)
      object.__setattr__(self, 'L_cycles', self.L_cycles or L_cycles)
    choices = dict(norm_type=('pre', 'post'), attn_type=('prefixlm', 'causal'),
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
    if self.architecture in ('ut', 'rins') and self.H_cycles != 1:
      raise UserError(f'{self.architecture} has one H cycle, not H_cycles={self.H_cycles}')
    if self.expansion <= 0 or self.intermediate_size < 0:
      raise UserError('model.expansion must be > 0 and model.intermediate_size >= 0')

  def weight_differences(self, other: 'ModelConfig') -> dict:
    """{field: (self's, other's)} of the fields where the two differ (the embedding scale and
    the MLP size compared as the values they resolve to)."""
    mine, theirs = (dict(dataclasses.asdict(c), embedding_scale=c.scale,
                         intermediate_size=c.mlp_size) for c in (self, other))
    return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}

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
    """Builds from a (ConfigDict) mapping: `size` ('B', 'L', 'XL', 'XXL', 'XXL_wide') sets the
    preset sizes, then every field that is not None overrides it; `vocab_multiple` pads the
    vocab; fields of older checkpoints' model configs (now ComputeConfig's or the run's credit
    horizon) are left out."""
    d = {name: value for name, value in dict(d).items() if value is not None}
    size = d.pop('size', '')
    vocab_multiple = d.pop('vocab_multiple', 1)
    d = {**size_preset(size, d.get('architecture', 'hrm')), **d}
    d['vocab_size'] = round_up(d.get('vocab_size', cls.vocab_size), vocab_multiple)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in d.items() if name in names})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# What a rematerialised block keeps from its forward pass for the backward pass, by name
# (layers.REMAT_POLICIES maps each to its jax.checkpoint policy), from the most kept (least
# recomputed) to the least: 'none' is no rematerialisation. 'auto' (training only) takes the
# first that fits the devices' memory (training.fit).
REMAT_POLICIES = ('none', 'save_projections', 'dots_saveable', 'save_attention',
                  'dots_with_no_batch_dims_saveable', 'nothing_saveable')


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
  """How a model runs, not what its weights are: any checkpoint runs under any of these."""
  dtype: str = 'float32'  # activations and matmuls; parameters stay float32
  remat_policy: str = 'nothing_saveable'  # one of REMAT_POLICIES
  # The attention kernel (attention.IMPLEMENTATIONS) or 'auto': the one for the devices the
  # model is built for (models.build_model resolves it).
  attention: str = 'auto'
  # Unroll the layer and L-step loops: more room for XLA scheduling, exact cost analysis.
  unroll_loops: bool = False

  def __post_init__(self):
    choices = dict(dtype=('float32', 'bfloat16', 'float16'),
                   remat_policy=REMAT_POLICIES + ('auto',))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise UserError(f'compute.{name} {getattr(self, name)!r} is not one of {allowed}')

  @classmethod
  def from_dict(cls, d) -> 'ComputeConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in dict(d).items()
                  if name in names and value is not None})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
