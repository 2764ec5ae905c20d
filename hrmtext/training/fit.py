"""Micro-batches and remat that fit the devices' memory: `train.micro_batches=0` and
`compute.remat_policy='auto'` (the size configs' defaults).

The compiled train step's own memory analysis decides (XLA's buffer assignment for those devices,
a compile-only target's too): the fewest micro-batches whose step fits, then, for remat 'auto',
the policy that recomputes least (config.REMAT_POLICIES, in order) and still fits at that
micro-batching. "Fits": the step's per-device bytes within the devices' usable memory less
HEADROOM. The choice is cached per (config, devices, jax version) in FIT_CACHE: each try is a
compile, minutes for the real sizes.
"""
import hashlib
import json
import os
import re

import jax
import ml_collections

from hrmtext.errors import UserError
from hrmtext.files import atomic_open
from hrmtext.model.config import REMAT_POLICIES
from hrmtext.model.kernels import is_compile_only
from hrmtext.parallel import accelerator, targets

HEADROOM = 0.05  # of the usable memory: what XLA's accounting leaves out (fragmentation, ...)
FIT_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                         'hrmtext', 'fit.json')
# HBM per chip in GB, from the generations' datasheets (libtpu's compile-only devices do not
# say); a GB is 10^9 bytes there, the smaller reading.
TPU_MEMORY_BYTES = {'TPU v4': 32 * 10**9, 'TPU v5': 95 * 10**9, 'TPU v5 lite': 16 * 10**9,
                    'TPU v6 lite': 32 * 10**9}


def usable_memory_bytes(device) -> int | None:
  """What JAX may use of `device`'s memory; None where there is no limit to plan for (CPU)."""
  if device.platform == 'cpu':
    return None
  if is_compile_only(device):
    if device.platform == 'tpu':
      return TPU_MEMORY_BYTES.get(device.device_kind)
    return int(targets.gpu_memory_bytes(device.device_kind) * accelerator.memory_fraction())
  return (device.memory_stats() or {}).get('bytes_limit')


def micro_batch_choices(rows: int, batch_shards: int) -> list[int]:
  """Micro-batch counts that split `rows` evenly, each micro-batch over the batch shards."""
  return [m for m in range(1, rows + 1) if rows % (m * batch_shards) == 0]


def fit(config: ml_collections.ConfigDict, mesh, step_bytes, log=print
        ) -> ml_collections.ConfigDict:
  """A resolved `config` with micro_batches 0 and remat 'auto' chosen for `mesh`'s devices (the
  others as given); logs the choice and its memory. `step_bytes(config)`: the per-device bytes of
  a config's compiled train step."""
  tc, compute = config.train, config.compute
  if tc.micro_batches and compute.remat_policy != 'auto':
    return config
  device = mesh.devices.flat[0]
  limit = usable_memory_bytes(device)
  if limit is None:  # nothing to fit: one micro-batch, the most frugal remat
    return _with(config, tc.micro_batches or 1, _frugal(compute.remat_policy))
  key = _cache_key(config, mesh)
  cached = _read_cache().get(key)
  if cached:
    log(f'fit (cached): {_describe(cached, limit)}')
    return _with(config, cached['micro_batches'], cached['remat_policy'])
  budget = int(limit * (1 - HEADROOM))
  rows = tc.global_batch_tokens // config.data.seq_len
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  choices = [tc.micro_batches] if tc.micro_batches else micro_batch_choices(rows, shards)
  if not choices:
    raise UserError(f'{rows} rows per step do not split over {shards} batch shards')
  measure = lambda micro, remat: _bytes_or_oom(step_bytes, _with(config, micro, remat))
  micro, used = _fewest_fitting(choices, lambda m: measure(m, _frugal(compute.remat_policy)),
                                budget)
  if micro is None:
    raise UserError(f'the train step does not fit {device.device_kind} ({limit / 2**30:.1f} GiB '
                    f'usable) even at {choices[-1]} micro-batches: {used / 2**30:.1f} GiB')
  remat = _frugal(compute.remat_policy)
  if compute.remat_policy == 'auto':
    for policy in REMAT_POLICIES[:REMAT_POLICIES.index(remat)]:  # cheaper ones first
      size = measure(micro, policy)
      if size <= budget:
        remat, used = policy, size
        break
  choice = {'micro_batches': micro, 'remat_policy': remat, 'bytes': used}
  _write_cache(key, choice)
  log(f'fit: {_describe(choice, limit)}')
  return _with(config, micro, remat)


def _bytes_or_oom(step_bytes, config) -> float:
  """`step_bytes(config)`, or what a compiler that refuses a step too large for the devices (the
  TPU's: 'RESOURCE_EXHAUSTED ... required ... (173.79G)') says it needs."""
  try:
    return step_bytes(config)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    needed = re.search(r'required[^(]*\(([\d.]+)G\)', str(e))
    return float(needed.group(1)) * 2**30 if needed else float('inf')


def _fewest_fitting(choices, size_of, budget):
  """(the first of ascending `choices` whose size fits `budget`, its size): a binary search, as
  more micro-batches never need more memory; (None, the last size) if none fits."""
  low, high, found, size = 0, len(choices) - 1, None, None
  while low <= high:
    middle = (low + high) // 2
    size_middle = size_of(choices[middle])
    if size_middle <= budget:
      found, size, high = choices[middle], size_middle, middle - 1
    else:
      low = middle + 1
      size = size if found else size_middle
  return found, size


def _frugal(remat: str) -> str:
  return REMAT_POLICIES[-1] if remat == 'auto' else remat


def _with(config, micro: int, remat: str) -> ml_collections.ConfigDict:
  """`config` with these micro-batches and remat (and eval rows, if left to them)."""
  fitted = ml_collections.ConfigDict(config.to_dict())
  fitted.train.micro_batches, fitted.compute.remat_policy = micro, remat
  rows = fitted.train.global_batch_tokens // fitted.data.seq_len
  fitted.eval.rows = fitted.eval.rows or max(1, rows // micro)
  return fitted


def _describe(choice: dict, limit: int) -> str:
  return (f'{choice["micro_batches"]} micro-batches, remat {choice["remat_policy"]}: '
          f'{choice["bytes"] / 2**30:.1f} GiB per device of {limit / 2**30:.1f} GiB usable '
          f'({HEADROOM:.0%} kept free)')


def _cache_key(config, mesh) -> str:
  what = {'config': config.to_dict(), 'device': mesh.devices.flat[0].device_kind,
          'mesh': dict(mesh.shape), 'jax': jax.__version__, 'headroom': HEADROOM,
          'memory_fraction': accelerator.memory_fraction()}
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _read_cache() -> dict:
  try:
    with open(FIT_CACHE) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_cache(key: str, choice: dict) -> None:
  try:
    os.makedirs(os.path.dirname(FIT_CACHE), exist_ok=True)
    with atomic_open(FIT_CACHE) as f:
      json.dump({**_read_cache(), key: choice}, f, indent=1)
  except OSError:
    pass  # a cache: the next run measures again
