"""Pieces shared by the launchers: the per-process env contract and a parallel process runner."""
import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from hrmtext.errors import UserError

STOP_GRACE_S = 10  # after SIGTERM, how long a stopped process gets before SIGKILL
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith('linux') else None


def process_env(coordinator: str, num_processes, process_id) -> dict:
  """The env hrmtext.parallel.distributed.initialize() reads (values may be shell expressions)."""
  return {'JAX_COORDINATOR_ADDRESS': coordinator, 'JAX_NUM_PROCESSES': str(num_processes),
          'JAX_PROCESS_ID': str(process_id)}


def env_assignments(env: dict) -> str:
  """`KEY=value ...` with each value quoted for a shell."""
  return ' '.join(f'{key}={shlex.quote(str(value))}' for key, value in env.items())


def parse_env_flags(assignments) -> dict:
  """KEY=VALUE strings (repeatable --env flags) as a dict."""
  env = {}
  for assignment in assignments or ():
    key, sep, value = assignment.partition('=')
    if not sep or not key:
      raise UserError(f'--env expects KEY=VALUE, got {assignment!r}')
    env[key] = value
  return env


def _stream(label: str, pipe, lock: threading.Lock):
  for line in pipe:
    with lock:
      sys.stdout.write(f'[{label}] {line}')
      sys.stdout.flush()


def _die_with_parent():
  """In a child, before exec: SIGKILL when the launcher dies, however it dies (Linux). Only a
  call through a function pointer looked up before the fork: the launcher has threads."""
  _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(procs):
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + STOP_GRACE_S
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()


class _Forward:
  """SIGTERM and SIGINT to the launcher go to every process (trainers save and exit 0); a second
  one kills them."""

  def __init__(self, procs):
    self.procs, self.count = procs, 0

  def __call__(self, sig, _):
    self.count += 1
    for proc in self.procs:
      if proc.poll() is None:
        proc.send_signal(sig if self.count == 1 else signal.SIGKILL)

  @contextlib.contextmanager
  def installed(self):
    previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_processes(jobs) -> int:
  """Runs (label, argv, extra_env) jobs at once, output prefixed by label. Returns the first
  non-zero exit status (after stopping the others; negative: killed by that signal) or 0.

  Signals to the launcher are passed on (`_Forward`), and the processes die with it: none is
  left behind when it is killed."""
  lock, procs, readers = threading.Lock(), [], []
  preexec = _die_with_parent if _PRCTL else None
  with _Forward(procs).installed():
    try:
      for label, argv, extra_env in jobs:
        env = {**os.environ, 'PYTHONUNBUFFERED': '1', **extra_env}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors='replace', preexec_fn=preexec)
        procs.append(proc)
        readers.append(threading.Thread(target=_stream, args=(label, proc.stdout, lock),
                                        daemon=True))
        readers[-1].start()
      while True:
        codes = [proc.poll() for proc in procs]
        failed = [code for code in codes if code]
        if failed or None not in codes:
          return failed[0] if failed else 0
        time.sleep(0.1)
    finally:
      _stop(procs)
      for reader in readers:
        reader.join(timeout=1)


def exit_with(status: int, launcher: str):
  """Exits like the failed process did (1 if it was killed by a signal)."""
  if status:
    print(f'{launcher}: a process failed with exit status {status}', file=sys.stderr)
    sys.exit(status if status > 0 else 1)
