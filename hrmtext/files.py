"""Writing files so that a reader (or a re-run after a crash) never sees half of one."""
import contextlib
import os
import shutil


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields `<path>.tmp` to write (a file, or a folder the block creates); renamed to `path` when
  the block succeeds, removed when it fails."""
  tmp = path + '.tmp'
  _remove(tmp)
  try:
    yield tmp
  except BaseException:
    _remove(tmp)
    raise
  os.replace(tmp, path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs):
  """`open(path, mode)` for writing, through `atomic_path`."""
  with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
    yield f
