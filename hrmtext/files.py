"""Writing files so that a reader (or a re-run after a crash) never sees half of one, and checking
before any work that an output can be written at all."""
import contextlib
import os
import shutil
import tempfile

from hrmtext.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path to write (a file, or a folder the block creates), renamed to `path`
  when the block succeeds and removed when it fails.

  The temporary path lies in a folder this call creates next to `path` (`.<name>.<random>.tmp`),
  so a user's own `<path>.tmp` is never touched and concurrent writers never share one.
  """
  parent, name = os.path.split(os.path.abspath(path))
  own = tempfile.mkdtemp(prefix=f'.{name[:100]}.', suffix='.tmp', dir=parent)
  try:
    tmp = os.path.join(own, name)
    yield tmp
    os.replace(tmp, path)
  finally:
    shutil.rmtree(own, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **kwargs):
  """`open(path, mode)` for writing, through `atomic_path`."""
  with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
    yield f


def check_writable(path: str, *, folder: bool = False) -> None:
  """UserError unless `path` can be written: a file, whose folder must exist, or (`folder`) a
  folder, created with its missing parents later. Call it before any work, so a bad output path
  fails in seconds, not after hours. Creates (and removes) a file of its own there: permissions,
  read-only mounts and ACLs all count, for root too."""
  path = os.path.abspath(path)
  what = f'cannot write {"into " if folder else ""}{path}'
  if folder:
    if os.path.lexists(path) and not os.path.isdir(path):
      raise UserError(f'{what}: it is a file')
    where = path
    while not os.path.isdir(where):  # the nearest existing folder: the rest gets created
      where = os.path.dirname(where)
      if os.path.lexists(where) and not os.path.isdir(where):
        raise UserError(f'{what}: {where} is a file')
  else:
    if os.path.isdir(path):
      raise UserError(f'{what}: it is a folder')
    where = os.path.dirname(path)
    if not os.path.isdir(where):
      raise UserError(f'{what}: no folder {where}')
  try:
    fd, probe = tempfile.mkstemp(prefix='.hrmtext-write-check-', dir=where)
  except OSError as e:
    raise UserError(f'{what}: {e.strerror or e} ({where})') from None
  os.close(fd)
  os.remove(probe)
