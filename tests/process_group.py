"""Subprocesses that a test can always end: each in a process group of its own, killed whole.

`subprocess.run(..., timeout=...)` kills only the process it started and then waits for its
output pipes to close; the trainers a launcher started keep them open, so a hung multi-process
run would hold the test for ever. Here a timeout kills the whole group and fails the test.
"""
import os
import signal
import subprocess


def start(args, **kwargs) -> subprocess.Popen:
  """Popen in a new session (its own process group); end it with `kill`."""
  return subprocess.Popen(args, start_new_session=True, **kwargs)


def kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run(args, *, timeout: float, input=None, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(args, capture_output=True, text=True, ...)` that, on timeout, kills every
  process of the group and raises subprocess.TimeoutExpired."""
  kwargs.setdefault('text', True)
  with start(args, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
             stderr=subprocess.PIPE, **kwargs) as proc:
    try:
      stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
      kill(proc)
      proc.communicate()
      raise
    finally:
      kill(proc)  # whatever it left running
  return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
