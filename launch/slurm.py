r"""Submits a multi-node GPU job to SLURM: one JAX process per GPU (default) or per node.

  python -m launch.slurm --nodes=2 --partition=gpu -- python -m hrmtext.train --config=...

Writes an sbatch script whose `srun` step gives every task JAX_COORDINATOR_ADDRESS (the
first node of SLURM_JOB_NODELIST), JAX_NUM_PROCESSES (SLURM_NTASKS) and JAX_PROCESS_ID
(SLURM_PROCID), plus CUDA_VISIBLE_DEVICES=SLURM_LOCALID with --process_per=gpu, GPU XLA
flags and NCCL settings, and submits it with sbatch from the current directory (the job's
working directory). --dry_run prints the script followed by, as comments, the env each task
gets on an allocation named node0, node1, ... (the output is itself a valid script).
"""
import shlex
import subprocess
import sys

from absl import app, flags

from hrmtext import cli
from launch import common

_NODES = flags.DEFINE_integer('nodes', 1, 'Nodes to allocate.')
_GPUS_PER_NODE = flags.DEFINE_integer('gpus_per_node', 8, 'GPUs per node.')
_PROCESS_PER = flags.DEFINE_enum('process_per', 'gpu', ['gpu', 'host'],
                                 'One JAX process per GPU, or per node (seeing all its GPUs).')
_PORT = flags.DEFINE_integer('port', 8476, 'JAX coordinator port on the first node.')
_JOB_NAME = flags.DEFINE_string('job_name', 'hrmtext', 'sbatch --job-name.')
_TIME = flags.DEFINE_string('time', '24:00:00', 'sbatch --time limit.')
_PARTITION = flags.DEFINE_string('partition', None, 'sbatch --partition.')
_ACCOUNT = flags.DEFINE_string('account', None, 'sbatch --account.')
_OUTPUT = flags.DEFINE_string('output', '%x-%j.out', 'sbatch --output (log file pattern).')
_SBATCH_ARGS = flags.DEFINE_multi_string('sbatch_arg', [],
                                         'Extra sbatch option, e.g. --sbatch_arg=--qos=high.')
_XLA_FLAGS = flags.DEFINE_string(
    'xla_flags', '', 'XLA_FLAGS for every task, beside (and winning over) the GPU flags every '
    'hrmtext entry point sets itself (hrmtext.parallel.accelerator).')
_ENV = flags.DEFINE_multi_string('env', [], 'Extra KEY=VALUE env for every task, e.g. '
                                 '--env=NCCL_SOCKET_IFNAME=ib0.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the script and per-task env; submit nothing.')

COORDINATOR_HOST_VAR = 'HRMTEXT_COORDINATOR_HOST'
# The XLA flags and GPU memory fraction come from the entry point itself
# (hrmtext.parallel.accelerator), as on one host.
BASE_ENV = {'NCCL_DEBUG': 'WARN'}


def task_env(coordinator_host: str, num_tasks, task_id, local_id, per_gpu: bool) -> dict:
  """One task's env; the script passes SLURM variables, the dry run concrete values."""
  env = common.process_env(f'{coordinator_host}:{_PORT.value}', num_tasks, task_id)
  if per_gpu:
    env['CUDA_VISIBLE_DEVICES'] = str(local_id)
  return env


def sbatch_script(command, per_gpu: bool, job_env: dict) -> str:
  options = {'job-name': _JOB_NAME.value, 'nodes': _NODES.value,
             'ntasks-per-node': _GPUS_PER_NODE.value if per_gpu else 1,
             'gpus-per-node': _GPUS_PER_NODE.value, 'time': _TIME.value, 'output': _OUTPUT.value,
             'partition': _PARTITION.value, 'account': _ACCOUNT.value}
  lines = ['#!/bin/bash', '#SBATCH --exclusive']
  lines += [f'#SBATCH --{name}={value}' for name, value in options.items() if value is not None]
  lines += [f'#SBATCH {arg}' for arg in _SBATCH_ARGS.value]
  lines += ['set -euo pipefail', f'export {common.env_assignments(job_env)}',
            '# Task 0 runs on the first node, which hosts the JAX coordinator.',
            f'export {COORDINATOR_HOST_VAR}='
            '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"']
  env = task_env(f'${COORDINATOR_HOST_VAR}', '$SLURM_NTASKS', '$SLURM_PROCID', '$SLURM_LOCALID',
                 per_gpu)
  exports = ' '.join(f'{key}="{value}"' for key, value in env.items())
  task = f'export {exports}; exec {shlex.join(command)}'
  lines.append(f'srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}')
  return '\n'.join(lines) + '\n'


def describe_tasks(per_gpu: bool) -> str:
  tasks_per_node = _GPUS_PER_NODE.value if per_gpu else 1
  num_tasks = _NODES.value * tasks_per_node
  lines = ['# Per-task env on an allocation node0..:']
  for task_id in range(num_tasks):
    node, local_id = divmod(task_id, tasks_per_node)
    env = task_env('node0', num_tasks, task_id, local_id, per_gpu)
    lines.append(f'# task {task_id} on node{node}: {common.env_assignments(env)}')
  return '\n'.join(lines) + '\n'


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError('no command given: python -m launch.slurm [flags] -- COMMAND...')
  if _NODES.value < 1 or _GPUS_PER_NODE.value < 1:
    raise app.UsageError('--nodes and --gpus_per_node must be at least 1')
  try:
    job_env = {**({'XLA_FLAGS': _XLA_FLAGS.value} if _XLA_FLAGS.value else {}), **BASE_ENV,
               **common.parse_env_flags(_ENV.value)}
  except ValueError as e:
    raise app.UsageError(str(e))
  per_gpu = _PROCESS_PER.value == 'gpu'
  script = sbatch_script(command, per_gpu, job_env)
  if _DRY_RUN.value:
    print(script + describe_tasks(per_gpu), end='')
    return
  try:
    result = subprocess.run(['sbatch'], input=script, text=True)
  except FileNotFoundError:
    cli.fail('sbatch not found; run on a SLURM login node (or use --dry_run)')
  sys.exit(result.returncode)


if __name__ == '__main__':
  cli.run(main, extra_args=True)
