"""The accelerator environment of every entry point: XLA flags and the GPU memory fraction.

`configure_environment()` runs before JAX starts a backend (`hrmtext.cli.run` calls it), so train,
bench, evaluate and the rest, on one host or under a launcher, compile with the same flags.
A user's own setting of a flag (in XLA_FLAGS) or of the memory fraction wins.
"""
import importlib.util
import os

# NVIDIA JAX-Toolbox / MaxText practice for H100 training, each flag known to the XLA of jax
# 0.10.2 to 0.12 (unknown flags would stop XLA); not yet A/B-measured on a GPU here. The
# collective ones pay off with FSDP over several GPUs.
GPU_XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',  # overlap collectives with compute
    '--xla_gpu_enable_triton_gemm=false',  # cuBLAS for the GEMMs
    '--xla_gpu_enable_while_loop_double_buffering=true',  # layer and L-step scans
    '--xla_gpu_enable_pipelined_all_gather=true',  # FSDP: next layer's weights during this one
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864',
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
)
# JAX preallocates this share of each GPU's memory (its default is 0.75); the rest is for the
# CUDA context, cuDNN and cuBLAS workspaces. Memory-fitting (micro-batches, remat) plans for it.
GPU_MEMORY_FRACTION = 0.90
CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin', 'jax_plugins.xla_cuda13',
                'jax_plugins.xla_cuda12')


def cuda_installed() -> bool:
  """A CUDA plugin of JAX is installed: this process may compile for (or run on) GPUs."""
  for name in CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ModuleNotFoundError:  # a parent package missing
      continue
  return False


def configure_environment() -> dict:
  """Sets the GPU XLA flags and memory fraction where JAX may use (or compile for) CUDA, each
  unless the user set it; returns what it set (empty elsewhere)."""
  if not cuda_installed():
    return {}
  user_flags = os.environ.get('XLA_FLAGS', '').split()
  user_names = {flag.split('=', 1)[0] for flag in user_flags}
  added = [flag for flag in GPU_XLA_FLAGS if flag.split('=', 1)[0] not in user_names]
  changed = {}
  if added:
    changed['XLA_FLAGS'] = os.environ['XLA_FLAGS'] = ' '.join(user_flags + added)
  if 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in os.environ:
    changed['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(GPU_MEMORY_FRACTION)
    os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(GPU_MEMORY_FRACTION)
  return changed


def memory_fraction() -> float:
  """The share of a GPU's memory JAX may use, as this process runs."""
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', GPU_MEMORY_FRACTION))
