r"""Runs a command as N JAX processes on this machine (multi-process runs on one host, tests).

  python -m launch.local --num_processes=2 -- python -m hrmtext.train --config=...

Each process gets JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES
and JAX_PROCESS_ID, which hrmtext.parallel.distributed.initialize() reads. Output lines are
prefixed with the process id. If a process fails, the others are stopped and this exits
with its status.
"""
import shlex
import socket

from absl import app, flags

from hrmtext import cli
from launch import common

_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 2, 'JAX processes to start.')
_PORT = flags.DEFINE_integer('port', 0, 'Coordinator port on localhost; 0 picks a free one.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print each process env and command; run nothing.')


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('', 0))
    return sock.getsockname()[1]


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError('no command given: python -m launch.local [flags] -- COMMAND...')
  if _NUM_PROCESSES.value < 1:
    raise app.UsageError('--num_processes must be at least 1')
  coordinator = f'localhost:{_PORT.value or free_port()}'
  jobs = [(str(i), command, common.process_env(coordinator, _NUM_PROCESSES.value, i))
          for i in range(_NUM_PROCESSES.value)]
  if _DRY_RUN.value:
    for label, job_argv, env in jobs:
      print(f'process {label}: {common.env_assignments(env)} {shlex.join(job_argv)}')
    return
  common.exit_with(common.run_processes(jobs), 'launch.local')


if __name__ == '__main__':
  cli.run(main, extra_args=True)
