"""Launchers: a real 2-process CPU run through launch/local.py, and the SLURM/TPU dry runs
(the SLURM script is executed against stand-in srun/scontrol commands)."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
            'CUDA_VISIBLE_DEVICES')

# Each process: 2 CPU devices, so the global mesh has 4.
MULTI_PROCESS_SCRIPT = textwrap.dedent('''
    from types import SimpleNamespace
    import numpy as np
    from hrmtext.parallel import distributed
    distributed.initialize()
    distributed.initialize()  # idempotent
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from hrmtext.parallel import mesh as mesh_lib, sharding

    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    assert distributed.is_main_process() == (jax.process_index() == 0)
    ids = multihost_utils.process_allgather(jnp.array(jax.process_index()))
    assert sorted(ids.tolist()) == [0, 1], ids

    full = np.arange(4 * 3, dtype=np.int32).reshape(4, 3)
    for shape, expected_count in [((2, 1, 2), 2), ((1, 1, 4), 1)]:
      mesh = mesh_lib.make_mesh(SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]))
      index, count = sharding.process_data_shard(mesh)
      assert count == expected_count, (shape, index, count)
      rows = len(full) // count
      batch = sharding.make_global_batch({'inputs': full[index * rows:(index + 1) * rows]}, mesh)
      assert batch['inputs'].shape == full.shape
      total = jax.jit(jnp.sum)(batch['inputs'])  # a cross-process reduction
      assert int(total) == int(full.sum()), (int(total), full.sum())
      gathered = multihost_utils.process_allgather(batch['inputs'], tiled=True)
      np.testing.assert_array_equal(gathered, full)
    print('ok', jax.process_index(), jax.process_count())
''')


def launcher(name, *args, env=None, timeout=120):
  return process_group.run([sys.executable, '-m', f'launch.{name}', *args], cwd=REPO, env=env,
                           timeout=timeout)


def test_local_runs_two_cpu_processes_that_communicate():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  result = launcher('local', '--num_processes=2', '--', sys.executable, '-c', MULTI_PROCESS_SCRIPT,
                    env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[0] ok 0 2' in result.stdout and '[1] ok 1 2' in result.stdout, result.stdout


def test_local_stops_the_others_when_one_fails():
  command = ('import os, sys, time\n'
             'if os.environ["JAX_PROCESS_ID"] == "1": sys.exit(3)\n'
             'time.sleep(60)')
  start = time.monotonic()
  result = launcher('local', '--num_processes=3', '--', sys.executable, '-c', command)
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.monotonic() - start < 30
  assert 'exit status 3' in result.stderr


# Each process says it runs, then waits; on SIGTERM it says so and exits 0, as trainers do.
WAIT_FOR_SIGTERM = textwrap.dedent('''
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: (print('SIGTERM', os.environ['JAX_PROCESS_ID']),
                                              sys.exit(0)))
    print('running', os.environ['JAX_PROCESS_ID'], flush=True)
    time.sleep(120)
''')


def start_waiting_processes(log):
  launcher = process_group.start(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--', sys.executable, '-c',
       WAIT_FOR_SIGTERM], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 60
  while open(log.name).read().count('running') < 2:
    assert launcher.poll() is None and time.monotonic() < deadline, open(log.name).read()
    time.sleep(0.05)
  return launcher, child_pids(launcher.pid)


def child_pids(pid):
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    return [int(child) for child in f.read().split()]


def test_local_passes_sigterm_on_and_exits_like_its_processes(tmp_path):
  with open(tmp_path / 'log', 'w') as log:
    launcher, children = start_waiting_processes(log)
    try:
      launcher.send_signal(signal.SIGTERM)
      assert launcher.wait(timeout=30) == 0
    finally:
      process_group.kill(launcher)
  output = open(tmp_path / 'log').read()
  assert '[0] SIGTERM 0' in output and '[1] SIGTERM 1' in output, output
  assert not any(os.path.exists(f'/proc/{pid}') for pid in children)


def test_local_processes_die_with_the_launcher(tmp_path):
  """SIGKILL to the launcher alone (its process group untouched): the processes go too."""
  with open(tmp_path / 'log', 'w') as log:
    launcher, children = start_waiting_processes(log)
    try:
      launcher.kill()
      launcher.wait(timeout=10)
      deadline = time.monotonic() + 10
      while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, [pid for pid in children if alive(pid)]
        time.sleep(0.05)
    finally:
      process_group.kill(launcher)


def alive(pid) -> bool:
  """Running, not a zombie (an adopted orphan that exited stays one until reaped)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def test_local_dry_run():
  result = launcher('local', '--num_processes=2', '--port=1234', '--dry_run', '--',
                    'train', '--x=1')
  assert result.returncode == 0, result.stderr
  for i in range(2):
    assert (f'process {i}: JAX_COORDINATOR_ADDRESS=localhost:1234 JAX_NUM_PROCESSES=2 '
            f'JAX_PROCESS_ID={i} train --x=1') in result.stdout


def parse_env(text):
  return dict(re.findall(r'(\w+)=(\S+)', text))


FAKE_SRUN = '''#!/bin/bash
while [[ $1 == -* ]]; do shift; done
for ((i = 0; i < FAKE_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % FAKE_TASKS_PER_NODE)) SLURM_NTASKS=$FAKE_NTASKS \
      "$@" || exit 1
done
'''
FAKE_SCONTROL = '''#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'node0\\nnode1\\n'
'''


@pytest.mark.parametrize('process_per, tasks_per_node', [('host', 1), ('gpu', 2)])
def test_slurm_script_gives_each_task_its_env(tmp_path, process_per, tasks_per_node):
  print_env = f'import os; print("task", *(f"{{k}}={{os.environ.get(k)}}" for k in {ENV_KEYS}))'
  result = launcher('slurm', '--nodes=2', '--gpus_per_node=2', f'--process_per={process_per}',
                    '--partition=gpu', '--xla_flags=--xla_dump_to=/tmp/hlo', '--dry_run', '--',
                    sys.executable, '-c', print_env)
  assert result.returncode == 0, result.stderr
  script = result.stdout
  for line in ['#SBATCH --nodes=2', f'#SBATCH --ntasks-per-node={tasks_per_node}',
               '#SBATCH --gpus-per-node=2', '#SBATCH --partition=gpu',
               'XLA_FLAGS=--xla_dump_to=/tmp/hlo']:
    assert line in script

  num_tasks = 2 * tasks_per_node
  described = {}
  for task, node, env in re.findall(r'^# task (\d+) on node(\d+): (.*)$', script, re.M):
    described[int(task)] = parse_env(env)
    assert int(node) == int(task) // tasks_per_node
  assert sorted(described) == list(range(num_tasks))
  for task, env in described.items():
    assert env['JAX_COORDINATOR_ADDRESS'] == 'node0:8476'
    assert env['JAX_NUM_PROCESSES'] == str(num_tasks) and env['JAX_PROCESS_ID'] == str(task)
    assert env.get('CUDA_VISIBLE_DEVICES') == (str(task % 2) if process_per == 'gpu' else None)

  # Run the script itself as SLURM would (stand-ins print a 2-node allocation).
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in [('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)]:
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(0o755)
  (tmp_path / 'job.sh').write_text(script)
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_NODELIST': 'node[0-1]',
         'FAKE_NTASKS': str(num_tasks), 'FAKE_TASKS_PER_NODE': str(tasks_per_node)}
  run = subprocess.run(['bash', str(tmp_path / 'job.sh')], env=env, capture_output=True, text=True,
                       timeout=60)
  assert run.returncode == 0, run.stderr
  seen = [{k: v for k, v in parse_env(line).items() if v != 'None'}
          for line in run.stdout.splitlines() if line.startswith('task ')]
  assert seen == [described[task] for task in range(num_tasks)]


def test_tpu_vm_dry_run_has_one_ssh_per_worker():
  result = launcher('tpu', '--mode=vm', '--name=pod', '--zone=us-east5-a', '--num_workers=4',
                    '--coordinator=10.0.0.2', '--workdir=hrm', '--dry_run', '--',
                    'python', '-m', 'hrmtext.train')
  assert result.returncode == 0, result.stderr
  ssh_lines = [line for line in result.stdout.splitlines() if line.startswith('gcloud')]
  assert len(ssh_lines) == 4
  for worker, line in enumerate(ssh_lines):
    assert line.startswith('gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a')
    assert f'--worker={worker} ' in line and f'JAX_PROCESS_ID={worker} ' in line
    assert 'cd hrm && JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 JAX_NUM_PROCESSES=4' in line
    assert line.endswith("python -m hrmtext.train'")


def test_tpu_gke_dry_run_manifest():
  result = launcher('tpu', '--mode=gke', '--name=hrm', '--num_workers=4', '--image=img:1',
                    '--tpu_topology=2x2x4', '--env=LIBTPU_INIT_ARGS=--x', '--dry_run', '--',
                    'python', '-m', 'hrmtext.train')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  manifest = json.loads('\n'.join(line for line in lines if not line.startswith('#')))
  job = manifest['spec']['replicatedJobs'][0]['template']['spec']
  assert job['parallelism'] == job['completions'] == 4 and job['completionMode'] == 'Indexed'
  pod = job['template']['spec']
  assert pod['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '2x2x4'
  container = pod['containers'][0]
  assert container['command'] == ['python', '-m', 'hrmtext.train']
  env = {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}
  assert env['JAX_COORDINATOR_ADDRESS'] == 'hrm-workers-0-0.hrm:8476'
  assert env['JAX_NUM_PROCESSES'] == '4' and env['LIBTPU_INIT_ARGS'] == '--x'
  assert 'job-completion-index' in env['JAX_PROCESS_ID']['fieldRef']['fieldPath']
  for worker in range(4):
    assert f'# worker {worker} (pod hrm-workers-0-{worker}): ' in result.stdout
    assert f'JAX_PROCESS_ID={worker}' in lines[len(lines) - 4 + worker]


@pytest.mark.parametrize('name', ['local', 'slurm', 'tpu'])
def test_launchers_explain_themselves_and_reject_bad_input(name):
  help_text = launcher(name, '--help').stdout  # absl exits 1 after --help
  assert f'python -m launch.{name}' in help_text and 'dry_run' in help_text
  for args, fragment in ((['--dry_run'], 'no command given'),  # no command
                         (['--bogus', '--', 'true'], "Unknown command line flag 'bogus'")):
    result = launcher(name, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.startswith('error: ') and fragment in result.stderr, result.stderr
