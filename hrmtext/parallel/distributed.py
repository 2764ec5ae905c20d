"""Multi-process (multi-host) initialization; call `initialize()` first thing in every entry point.

Environments, in order:
  * JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (set by launch/{local,slurm,tpu});
  * a plain `srun` step of several tasks (JAX auto-detects SLURM: one GPU per task);
  * a Cloud TPU host (JAX reads the slice's hosts from the TPU metadata or GKE env);
  * otherwise a single process: nothing to do.
"""
import glob
import os
import threading
import time

import jax
from jax._src import distributed as jax_distributed  # the coordination service's client

GOOGLE_PCI_VENDOR = '0x1ae0'
WATCH_MS = 300  # how long one wait of the step agreement's watcher lasts (its exit latency)


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


def _no_persistent_cache_on_cpu():
  """Multi-process CPU runs compile every program afresh.

  CPU collectives (gloo) match the processes' ops by the executable's launch id, which jaxlib
  seeds from the executable's fingerprint, and a program loaded from the persistent compilation
  cache has another fingerprint than the same program compiled (seen on jax 0.12.1). On CPU the
  cache key also differs between processes (it hashes process-local devices), and only process 0
  writes entries: with a warm cache process 0 loads its train step while the others compile
  theirs, and the first collective waits for ever. GPU and TPU keys are the same on every
  process, and their collectives do not use the launch id.
  """
  if jax.default_backend() == 'cpu':
    jax.config.update('jax_enable_compilation_cache', False)


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
  else:
    return
  _no_persistent_cache_on_cpu()


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and non-sharded files."""
  return jax.process_index() == 0


class StepAgreement:
  """Decisions that every process takes at the same step: stop, or save now.

  Each process calls `at_step(step, ...)` once per step, right after dispatching it, with its
  own reasons (a signal it got, its clock saying a time-based save is due); the reasons of all
  processes come back at one step S, the same on every process. In one process S is the step
  itself. With several, they agree through the distributed runtime's key-value store, with no
  device work and no wait at an ordinary step:
    * a process with a reason opens a round (one key) and posts its step;
    * every other process's watcher thread sees the round open at once and posts the first
      step whose decision its process has not taken yet, whatever the main thread is doing
      (it may be waiting on the devices, for a step that needs the others' devices too);
    * S is the largest step posted: no process has passed it. A process waits for the others'
      posts only at a check inside an open round.
  Every process also posts to the current round at its last step (`last=True`), so that a round
  opened while another process is finishing still closes: S is then that last step.
  """

  def __init__(self, first_step: int, namespace: str = 'hrmtext/steps',
               timeout_s: float = 600.0):
    self._client = jax_distributed.global_state.client if jax.process_count() > 1 else None
    self._namespace, self._timeout_ms = namespace, int(timeout_s * 1000)
    self._lock = threading.Lock()
    self._next = first_step  # the first step whose decision this process has not taken
    self._round, self._open, self._posted, self._agreed = 0, False, False, None
    self._closed = threading.Event()
    self._watcher = threading.Thread(target=self._watch, daemon=True, name='step-agreement')
    if self._client is not None:
      self._watcher.start()

  def at_step(self, step: int, *, last: bool = False, **reasons: bool) -> set:
    """The names of the reasons (keyword flags) that some process had, at the agreed step;
    an empty set at every other step."""
    said = {name for name, value in reasons.items() if value}
    if self._client is None:
      return said
    with self._lock:  # held while gathering too: the watcher has nothing to post then
      self._next = step
      if not self._posted and (said or last):
        if said:
          self._client.key_value_set(self._key('open'), '1', allow_overwrite=True)
          self._open = True
        self._post(step, said)
      if self._open and self._agreed is None:
        self._agreed = self._gather()
      agreed = set()
      if self._agreed is not None and self._agreed[0] == step:
        agreed = self._agreed[1]
        self._round += 1
        self._open = self._posted = False
        self._agreed = None
      self._next = step + 1
      return agreed

  def __enter__(self) -> 'StepAgreement':
    return self

  def __exit__(self, *_) -> None:
    """Stops the watcher (before the runtime's client shuts down at exit: a thread still in a
    call of the client crashes the process)."""
    self._closed.set()
    if self._watcher.is_alive():
      self._watcher.join()

  def _key(self, name: str) -> str:
    return f'{self._namespace}/{self._round}/{name}'

  def _post(self, step: int, said: set) -> None:
    self._client.key_value_set(self._key(f'at/{jax.process_index()}'),
                               f'{step}:{",".join(sorted(said))}')
    self._posted = True

  def _watch(self) -> None:
    """Posts this process's next step to each round another process opens."""
    while not self._closed.is_set():
      with self._lock:
        key, waiting = self._key('open'), not self._posted
      if not waiting:
        time.sleep(0.05)  # posted: the main thread closes the round at S
        continue
      try:
        self._client.blocking_key_value_get(key, WATCH_MS)
      except Exception:  # pylint: disable=broad-except  (not opened within WATCH_MS)
        continue
      with self._lock:
        if self._key('open') == key and not self._posted:
          self._open = True
          self._post(self._next, set())

  def _gather(self) -> tuple[int, set]:
    """(S, the union of reasons) once every process posted to the round; waits for them."""
    steps, agreed = [], set()
    for process in range(jax.process_count()):
      value = self._client.blocking_key_value_get(self._key(f'at/{process}'), self._timeout_ms)
      step, said = value.split(':')
      steps.append(int(step))
      agreed.update(name for name in said.split(',') if name)
    return max(steps), agreed
