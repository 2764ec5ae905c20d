"""Fast attention kernels behind `attention.attention(..., implementation)`.

Each computes the same function as `attention.xla_attention` for packed self-attention
(training, scoring): q/k/v [batch, len, heads, head_dim] and an `AttentionMask` whose query and
key sides are the same tokens. Cached decode always uses the XLA path.

A kernel is chosen for, and checks itself against, the devices the computation is compiled for
(`target_device`), not the host's default backend: compiling for TPUs or GPUs that are not here
(`hrmtext.parallel.targets`) takes the kernel those devices run.
"""
import dataclasses

import flax.struct
import jax
# jax.sharding.get_mesh, the public accessor, refuses to run while tracing (jax 0.10 to 0.12).
from jax._src.mesh import get_concrete_mesh


@flax.struct.dataclass
class PackedRuns:
  """A packed row's runs in cuDNN's layout (the packer's data.packing.RUN_FIELDS): each example
  (and the padding) as a causal run, each instruction as a bidirectional one."""
  causal_offsets: jax.Array  # [batch, max_runs + 1], -1 past the last run
  causal_lengths: jax.Array  # [batch, max_runs]
  prefix_offsets: jax.Array
  prefix_lengths: jax.Array

  @classmethod
  def from_batch(cls, batch) -> 'PackedRuns | None':
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(*(batch[name] for name in names)) if all(n in batch for n in names) else None


def target_device():
  """The device the computation being traced is compiled for: the first device of the mesh in
  context (`hrmtext.parallel.sharding.activate`), else the default device.

  It has `platform` ('cpu', 'gpu', 'tpu') and `device_kind`; CUDA devices have
  `compute_capability` ('9.0'). Under an abstract mesh alone (`jax.sharding.use_abstract_mesh`)
  it is the mesh's `AbstractDevice`, which has no compute capability.
  """
  mesh = get_concrete_mesh()
  if mesh is not None and not mesh.empty:
    return mesh.devices.flat[0]
  abstract = jax.sharding.get_abstract_mesh()
  return jax.devices()[0] if abstract.empty else abstract.abstract_device


def compute_capability(device) -> tuple[int, int] | None:
  """(major, minor) of a CUDA device; None for other devices (ROCm names its arch 'gfx942')."""
  try:
    major, minor = str(getattr(device, 'compute_capability', '')).split('.')
    return int(major), int(minor)
  except ValueError:
    return None


def is_compile_only(device) -> bool:
  """A device that is described, not present: compiled for, never run on (see targets)."""
  client = getattr(device, 'client', None)
  return getattr(client, 'runtime_type', '') == 'compile_only_runtime'
