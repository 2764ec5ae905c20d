"""Multi-process (multi-host) initialization; call `initialize()` first thing in every entry point.

Environments, in order:
  * JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (set by launch/{local,slurm,tpu});
  * a plain `srun` step of several tasks (JAX auto-detects SLURM: one GPU per task);
  * a Cloud TPU host (JAX reads the slice's hosts from the TPU metadata or GKE env);
  * otherwise a single process: nothing to do.
"""
import glob
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

GOOGLE_PCI_VENDOR = '0x1ae0'


def _enable_cpu_collectives():
  """Cross-process collectives on CPU need an implementation; gloo unless the env picks one."""
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _on_cloud_tpu() -> bool:
  for vendor_file in glob.glob('/sys/bus/pci/devices/*/vendor'):
    with open(vendor_file) as f:
      if f.read().strip() == GOOGLE_PCI_VENDOR:
        return True
  return False


def initialize() -> None:
  """Joins the processes of a multi-process run; a no-op for one process or when called again."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if int(env.get('JAX_NUM_PROCESSES', '1')) > 1:
    _enable_cpu_collectives()
    # Detection off: under SLURM it would otherwise restrict each process to GPU SLURM_LOCALID,
    # wrong for one process per host (launch/slurm.py sets CUDA_VISIBLE_DEVICES when it wants that).
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']),
                               cluster_detection_method='deactivate')
  elif int(env.get('SLURM_STEP_NUM_TASKS', '1')) > 1 or _on_cloud_tpu():
    _enable_cpu_collectives()
    jax.distributed.initialize()


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and non-sharded files."""
  return jax.process_index() == 0


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over all processes: decisions (stop, save now) every process takes together.

  A collective: every process must call it at the same point of its program.
  """
  local = np.array(flags, np.int32)
  if jax.process_count() > 1:
    local = multihost_utils.process_allgather(local).max(axis=0)
  return tuple(bool(flag) for flag in local)
