"""Test-session settings, set before JAX starts in this process or in any process a test spawns.

Most tests run `python -m hrmtext.*` in subprocesses that compile the same tiny programs again
(resumed runs, several processes, the CLI of each verb): JAX's persistent compilation cache lets
every process after the first load them instead. Cached executables are the ones XLA compiled,
so what is tested does not change; the cache key covers jax/XLA versions, flags and devices.
"""
import ctypes
import getpass
import glob
import os
import signal
import sys
import tempfile

import pytest

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'hrmtext-tests-jax-cache-{getpass.getuser()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_collection_modifyitems(items):
  """The multi-process and ablation-arm training tests, the longest files, start first so they do
  not end last (`--dist loadfile` in setup.cfg: a file's tests share its module fixtures, e.g. a
  training run, so they run on one worker, which builds them once)."""
  items.sort(key=lambda item: not any(name in item.nodeid for name in (
      'test_train_distributed', 'test_ablation_arms')))


# Processes a test leaves behind (a launcher's trainers after the launcher died) must not outlive
# it: this process adopts the orphans of its descendants (Linux), and each test module ends by
# killing any child still running, as an error of that module.
PR_SET_CHILD_SUBREAPER = 36  # <sys/prctl.h>
if sys.platform.startswith('linux'):
  ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _children() -> list[tuple[int, str]]:
  pids = []
  for task in glob.glob(f'/proc/{os.getpid()}/task/*/children'):
    try:
      with open(task) as f:
        pids += [int(pid) for pid in f.read().split()]
    except FileNotFoundError:  # the thread ended since the glob: it has no children now
      pass
  found = []
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        if f.read().rsplit(')', 1)[1].split()[0] == 'Z':  # exited; an adopted orphan: reap it
          os.waitpid(pid, 0)
          continue
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        command = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except (OSError, ChildProcessError):
      continue  # gone meanwhile
    if 'multiprocessing.resource_tracker' not in command:  # Python's own, ends with us
      found.append((pid, command))
  return found


@pytest.fixture(autouse=True, scope='module')
def no_process_left_behind():
  yield
  leftover = _children()
  for pid, _ in leftover:
    try:
      os.kill(pid, signal.SIGKILL)
      os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
      pass
  assert not leftover, f'processes left running (now killed): {leftover}'
