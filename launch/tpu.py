r"""Runs a command on every host of a Cloud TPU slice: over gcloud ssh (TPU VM) or as a GKE JobSet.

  python -m launch.tpu --mode=vm --name=my-v5p-32 --zone=us-east5-a --num_workers=4 \
      --workdir=hrmtext -- python -m hrmtext.train --config=...
  python -m launch.tpu --mode=gke --name=hrm-xl --num_workers=4 --image=IMAGE \
      --tpu_accelerator=tpu-v5p-slice --tpu_topology=2x2x4 -- python -m hrmtext.train ...

Worker i runs as JAX process i (gcloud's worker number = the TPU runtime's), with
JAX_COORDINATOR_ADDRESS on worker 0, which hrmtext.parallel.distributed.initialize() reads.
vm: one `gcloud compute tpus tpu-vm ssh --worker=i` per worker, in parallel, output
prefixed by worker; worker 0's internal IP comes from `gcloud ... describe` unless
--coordinator is given. gke: a JobSet (one Indexed Job, a pod per host) applied with
kubectl; the process id is the pod's completion index and the coordinator its pod 0.
--dry_run prints the per-worker commands (vm) or the manifest (gke) and each worker's env.
"""
import json
import shlex
import subprocess
import sys

from absl import app, flags

from hrmtext import cli
from launch import common

_MODE = flags.DEFINE_enum('mode', 'vm', ['vm', 'gke'], 'TPU VM over gcloud ssh, or a GKE JobSet.')
_NAME = flags.DEFINE_string('name', None, 'TPU VM name (vm) or JobSet name (gke).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Hosts in the slice.')
_PORT = flags.DEFINE_integer('port', 8476, 'JAX coordinator port on worker 0.')
_ENV = flags.DEFINE_multi_string('env', [], 'Extra KEY=VALUE env for every worker.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print what would run; run nothing.')
# vm
_ZONE = flags.DEFINE_string('zone', None, 'vm: gcloud --zone (default: gcloud config).')
_PROJECT = flags.DEFINE_string('project', None, 'vm: gcloud --project (default: gcloud config).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'vm: directory to run in (relative to the home).')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   "vm: worker 0's internal IP (default: ask gcloud).")
# gke
_IMAGE = flags.DEFINE_string('image', None, 'gke: container image holding the code.')
_ACCELERATOR = flags.DEFINE_string('tpu_accelerator', 'tpu-v5p-slice',
                                   'gke: cloud.google.com/gke-tpu-accelerator node label.')
_TOPOLOGY = flags.DEFINE_string('tpu_topology', None, 'gke: slice topology, e.g. 2x2x4.')
_CHIPS_PER_HOST = flags.DEFINE_integer('chips_per_host', 4, 'gke: google.com/tpu chips per pod.')

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def gcloud_tpu(verb: str, *args) -> list:
  scope = [f'--{name}={flag.value}' for name, flag in (('zone', _ZONE), ('project', _PROJECT))
           if flag.value]
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, _NAME.value, *scope, *args]


def worker0_ip_command() -> list:
  return gcloud_tpu('describe', '--format=value(networkEndpoints[0].ipAddress)')


def vm_jobs(command, coordinator_ip: str, extra_env: dict) -> list:
  """(label, gcloud ssh argv, {}) per worker."""
  jobs = []
  for worker in range(_NUM_WORKERS.value):
    env = {**common.process_env(f'{coordinator_ip}:{_PORT.value}', _NUM_WORKERS.value, worker),
           **extra_env}
    remote = f'{common.env_assignments(env)} {shlex.join(command)}'
    if _WORKDIR.value:
      remote = f'cd {shlex.quote(_WORKDIR.value)} && {remote}'
    ssh = gcloud_tpu('ssh', f'--worker={worker}', f'--command={remote}')
    jobs.append((f'worker {worker}', ssh, {}))
  return jobs


def gke_coordinator() -> str:
  # JobSet pods are reachable as <jobset>-<replicated job>-<job index>-<pod index>.<jobset>.
  return f'{_NAME.value}-workers-0-0.{_NAME.value}:{_PORT.value}'


def jobset_manifest(command, extra_env: dict) -> dict:
  shared_env = {**common.process_env(gke_coordinator(), _NUM_WORKERS.value, 0), **extra_env}
  env = [{'name': key, 'value': value} for key, value in shared_env.items()
         if key != 'JAX_PROCESS_ID']  # per pod: its completion index
  env.append({'name': 'JAX_PROCESS_ID', 'valueFrom': {'fieldRef': {'fieldPath': COMPLETION_INDEX}}})
  container = {'name': 'hrmtext', 'image': _IMAGE.value, 'command': list(command), 'env': env,
               'ports': [{'containerPort': _PORT.value}],
               'resources': {'limits': {'google.com/tpu': _CHIPS_PER_HOST.value}}}
  pod = {'restartPolicy': 'Never', 'containers': [container],
         'nodeSelector': {'cloud.google.com/gke-tpu-accelerator': _ACCELERATOR.value,
                          'cloud.google.com/gke-tpu-topology': _TOPOLOGY.value}}
  job = {'parallelism': _NUM_WORKERS.value, 'completions': _NUM_WORKERS.value,
         'completionMode': 'Indexed', 'backoffLimit': 0, 'template': {'spec': pod}}
  return {'apiVersion': 'jobset.x-k8s.io/v1alpha2', 'kind': 'JobSet',
          'metadata': {'name': _NAME.value, 'annotations': {
              'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}},
          'spec': {'failurePolicy': {'maxRestarts': 0},
                   'replicatedJobs': [{'name': 'workers', 'replicas': 1,
                                       'template': {'spec': job}}]}}


def run_vm(command, extra_env: dict):
  coordinator_ip = _COORDINATOR.value
  if coordinator_ip is None and _DRY_RUN.value:
    coordinator_ip = 'WORKER0_IP'
    print(f'# {coordinator_ip}: output of {shlex.join(worker0_ip_command())}')
  elif coordinator_ip is None:
    found = subprocess.run(worker0_ip_command(), capture_output=True, text=True)
    coordinator_ip = found.stdout.strip()
    if found.returncode or not coordinator_ip:
      cli.fail(f"could not get worker 0's IP: {' '.join(found.stderr.split())}")
  jobs = vm_jobs(command, coordinator_ip, extra_env)
  if _DRY_RUN.value:
    for label, argv, _ in jobs:
      print(f'# {label}\n{shlex.join(argv)}')
    return
  common.exit_with(common.run_processes(jobs), 'launch.tpu')


def run_gke(command, extra_env: dict):
  if not _IMAGE.value or not _TOPOLOGY.value:
    raise app.UsageError('--mode=gke needs --image and --tpu_topology')
  manifest = json.dumps(jobset_manifest(command, extra_env), indent=2)
  if _DRY_RUN.value:
    print(manifest)
    for worker in range(_NUM_WORKERS.value):
      env = common.process_env(gke_coordinator(), _NUM_WORKERS.value, worker)
      print(f'# worker {worker} (pod {_NAME.value}-workers-0-{worker}): '
            f'{common.env_assignments(env)}')
    return
  sys.exit(subprocess.run(['kubectl', 'apply', '-f', '-'], input=manifest, text=True).returncode)


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError('no command given: python -m launch.tpu [flags] -- COMMAND...')
  if not _NAME.value or not _NUM_WORKERS.value or _NUM_WORKERS.value < 1:
    raise app.UsageError('--name and --num_workers (at least 1) are required')
  try:
    extra_env = common.parse_env_flags(_ENV.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  try:
    (run_vm if _MODE.value == 'vm' else run_gke)(command, extra_env)
  except FileNotFoundError as e:
    cli.fail(f'{e.filename} not found (install it, or use --dry_run)')


if __name__ == '__main__':
  cli.run(main, extra_args=True)
