"""Test-session settings, set before JAX starts in this process or in any process a test spawns.

Most tests run `python -m hrmtext.*` in subprocesses that compile the same tiny programs again
(resumed runs, several processes, the CLI of each verb): JAX's persistent compilation cache lets
every process after the first load them instead. Cached executables are the ones XLA compiled,
so what is tested does not change; the cache key covers jax/XLA versions, flags and devices.
"""
import getpass
import os
import tempfile

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
