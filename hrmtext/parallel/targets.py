"""Devices that are not here, to compile for: TPU slices (libtpu) and CUDA GPUs (deviceless XLA).

  devices('v5p:2x2x2')  # 8 v5p chips (a v5p-16 slice), any libtpu topology: v4:2x2x1, v6e:2x4
  devices('h100:8')     # 8 H100 80GB SXM, 8 per host (h100:16 is 2 hosts)
  devices('h200:8')

They come from `jax.experimental.topologies.get_topology_desc` and are compile-only: a mesh over
them lowers and compiles (`jit(...).lower(...).compile()`, with memory analysis) but runs nothing.
This is how a config is checked before renting the hardware (MaxText's train_compile.py does the
same). The compilers come from PyPI, in the jax version installed (extra `targets`):
  TPU: pip install 'jax[tpu]==<jax>'            (libtpu, about 640 MB)
  GPU: pip install jax-cuda13-plugin==<jax> jax-cuda13-pjrt==<jax>   (about 400 MB; no CUDA
       libraries or cuDNN needed to compile)
Each needs its environment set before JAX first loads the plugin, which `prepare_environment`
does: call it first thing in a process that will compile for a target (before any JAX backend
starts), or export the same variables.
"""
import os
from typing import NamedTuple

import jax
from jax.experimental import topologies

from hrmtext.errors import UserError
from hrmtext.model.kernels.cudnn import COMPILE_ONLY_CUDNN_VERSION

GPUS_PER_HOST = 8  # an HGX/DGX H100 or H200 node


def _gpu_target_config(core_count, fpus_per_core, memory_bandwidth, l2_cache_size,
                       clock_rate_ghz, device_memory_size, description) -> str:
  """A GpuTargetConfigProto (xla/stream_executor/device_description.proto) in text format for a
  compute capability 9.0 (Hopper) GPU, the fields XLA reads for deviceless compilation.

  Per-SM and per-block limits are those of compute capability 9.0 in the CUDA C++ Programming
  Guide ("Technical Specifications per Compute Capability"): 1024 threads per block, warps of 32,
  2048 resident threads and 64K 32-bit registers per SM (and per block), 228 KiB shared memory
  per SM of which 227 KiB can be opted into per block (48 KiB without opting in), grid
  dimensions up to 2^31-1 x 65535 x 65535. The dnn_version_info is the cuDNN this target is
  described with (cudnn.COMPILE_ONLY_CUDNN_VERSION).
  """
  dnn_major, dnn_minor = COMPILE_ONLY_CUDNN_VERSION
  return f'''gpu_device_info {{
  cuda_compute_capability {{ major: 9 minor: 0 }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  threads_per_core_limit: 2048
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  core_count: {core_count}
  fpus_per_core: {fpus_per_core}
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: {l2_cache_size}
  clock_rate_ghz: {clock_rate_ghz}
  device_memory_size: {device_memory_size}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} }}
device_description_str: "{description}"
'''


# The per-device figures: SM count (core_count), FP32 lanes per SM (fpus_per_core), L2 and boost
# clock from NVIDIA's H100 architecture whitepaper (H100 SXM5: 132 SMs, 128 FP32 cores per SM,
# 50 MB L2, 1.98 GHz boost); memory bandwidth from the H100 SXM / H200 SXM datasheets (3.35 and
# 4.8 TB/s); device_memory_size is the total the CUDA driver reports (cudaMemGetInfo), a little
# under the marketed 80 / 141 GB, as XLA's own spec xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb
# has it for the H100; the device name is what the driver calls each GPU (nvidia-smi,
# jax's device_kind).
GPU_MEMORY_BYTES = {'NVIDIA H100 80GB HBM3': 84_978_434_048, 'NVIDIA H200': 150_754_820_096}
GPU_TARGET_CONFIGS = {
    'h100': _gpu_target_config(
        core_count=132, fpus_per_core=128, memory_bandwidth=3_352_320_000_000,
        l2_cache_size=50 * 2**20, clock_rate_ghz=1.98,
        device_memory_size=GPU_MEMORY_BYTES['NVIDIA H100 80GB HBM3'],
        description='NVIDIA H100 80GB HBM3'),
    'h200': _gpu_target_config(
        core_count=132, fpus_per_core=128, memory_bandwidth=4_800_000_000_000,
        l2_cache_size=50 * 2**20, clock_rate_ghz=1.98,
        device_memory_size=GPU_MEMORY_BYTES['NVIDIA H200'], description='NVIDIA H200'),
}


def gpu_memory_bytes(device_kind: str) -> int:
  """The memory of a compile-only GPU target's device (as its driver reports it)."""
  return GPU_MEMORY_BYTES[device_kind]

class TpuGeneration(NamedTuple):
  host_bounds: tuple  # the chips one host holds (libtpu's chips_per_host_bounds)
  accelerator_type: str  # that host's, as GCE names it
  chip_config: str  # 'megacore': one JAX device per chip, as JAX runs v4 (v5p is so by default)


# libtpu's generation names; v4 and v5p hosts hold 2x2x1 chips, v5e and v6e hosts up to 2x4.
TPU_GENERATIONS = {
    'v4': TpuGeneration((2, 2, 1), 'v4-8', 'megacore'),
    'v5p': TpuGeneration((2, 2, 1), 'v5p-8', 'default'),
    'v5e': TpuGeneration((2, 4, 1), 'v5litepod-8', 'default'),
    'v6e': TpuGeneration((2, 4, 1), 'v6e-8', 'default'),
}


def parse(name: str) -> tuple[str, str]:
  """'v5p:2x2x2' -> ('v5p', '2x2x2'), 'h100:8' -> ('h100', '8'); ValueError if malformed."""
  kind, _, shape = name.lower().partition(':')
  known = sorted(TPU_GENERATIONS) + sorted(GPU_TARGET_CONFIGS)
  if kind not in known:
    raise UserError(f'unknown target {name!r}: want one of {", ".join(known)} then ":" and a '
                    f'shape, e.g. v5p:2x2x2, v6e:2x4, h100:8')
  dims = shape.split('x')
  if not all(d.isdigit() and int(d) > 0 for d in dims) or (
      kind in GPU_TARGET_CONFIGS and len(dims) != 1) or (
      kind in TPU_GENERATIONS and len(dims) not in (2, 3)):
    example = 'h100:8' if kind in GPU_TARGET_CONFIGS else 'v5p:2x2x2 or v6e:2x4'
    raise UserError(f'bad shape in target {name!r}: e.g. {example}')
  if kind in GPU_TARGET_CONFIGS and int(shape) > GPUS_PER_HOST and int(shape) % GPUS_PER_HOST:
    raise UserError(f'target {name!r}: more than {GPUS_PER_HOST} GPUs come in whole hosts of '
                    f'{GPUS_PER_HOST}')
  return kind, shape


def prepare_environment(name: str) -> None:
  """Sets (unless set) what target `name`'s compiler plugin reads when it starts; call it before
  a JAX backend starts.

  The host's own backends: CPU only (JAX_PLATFORMS), as compiling for a target runs nothing here
  and the other plugins then do not start (and warn) at all. TPU: libtpu otherwise probes the
  GCE metadata server for the accelerator type and the worker hostnames (and warns at length),
  and takes /tmp/libtpu_lockfile, which would refuse a second process on this machine. GPU:
  jax's CUDA plugin otherwise refuses to start without the CUDA libraries it would run with,
  which compiling does not need.
  """
  kind = name.lower().partition(':')[0]
  if kind in TPU_GENERATIONS or kind in GPU_TARGET_CONFIGS:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    # The CUDA plugin starts (for a GPU target's compiler, or just because it is installed)
    # without the CUDA libraries it would run with.
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  if kind in TPU_GENERATIONS:
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', TPU_GENERATIONS[kind].accelerator_type)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def devices(name: str) -> list:
  """The compile-only devices of target `name` (see the module docstring), in topology order.

  ValueError for a malformed name, or where the target's compiler is not installed or did not
  start (call `prepare_environment` before JAX starts its backends).
  """
  kind, shape = parse(name)
  try:
    if kind in TPU_GENERATIONS:
      generation = TPU_GENERATIONS[kind]
      dims = [int(d) for d in shape.split('x')]
      bounds = tuple(min(h, d) for h, d in zip(generation.host_bounds, dims + [1]))
      topology = topologies.get_topology_desc(
          topology_name=f'{kind}:{shape}', platform='tpu', chip_config_name=generation.chip_config,
          chips_per_host_bounds=bounds, num_slices=1)
    else:
      count = int(shape)
      per_host = min(count, GPUS_PER_HOST)
      topology = topologies.get_topology_desc(
          kind, 'cuda', target_config=GPU_TARGET_CONFIGS[kind],
          topology=f'1x{count // per_host}x{per_host}')
  except (RuntimeError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
    package = ("'jax[tpu]'" if kind in TPU_GENERATIONS else
               'jax-cuda13-plugin and jax-cuda13-pjrt')
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'cannot compile for {name}: {first_line} (needs {package} of jax '
                    f'{jax.__version__}; see hrmtext.parallel.targets)') from e
  return list(topology.devices)

