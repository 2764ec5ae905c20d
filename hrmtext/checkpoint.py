"""The checkpoint steps of a run (`<run>/checkpoints`, laid out by hrmtext.run): Orbax steps,
their integrity, and reading them back.

`<steps>/<step>/` holds Orbax items: `params`, `ema` (optional), `opt_state` (optional) and
`meta` (JSON: step, model config and what hrmtext.run says). Weights-only checkpoints
(conversion, export) carry just `params` and `meta`. The input pipeline's position is the step
itself (hrmtext.data.pipeline), so it needs no item of its own and a run resumes on any number of
processes. (Checkpoints of older runs may hold a `data` item: the per-process Grain state; it is
not read.)

Integrity: a step also holds `checksums.json`, the sha256 of each file of its items, written as
it is saved; every reader verifies the step before reading it (`verify`) and a resumed run takes
the newest intact one (`latest_intact_step`). A step saved without checksums (by older versions)
is read unverified, and Orbax's failure to read it is reported as damage. A failed save (a full
disk) is one UserError naming the step; the steps saved before it stay.
"""
import contextlib
import gc
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import types

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from hrmtext.errors import UserError
from hrmtext.files import atomic_open
from hrmtext.model import LoraConfig, ModelConfig, build_model, lora as lora_lib
from hrmtext.parallel import mesh as mesh_lib, sharding

CHECKSUMS = 'checksums.json'  # {'sha256': {path in the step folder: hex digest}}
DAMAGED = '.damaged'  # suffix of a damaged step set aside by latest_intact_step
ORBAX_TMP = '.orbax-checkpoint-tmp'  # a step Orbax is writing: <step><ORBAX_TMP>[-<time>]


class DamagedCheckpoint(UserError):
  """A checkpoint step whose files changed, went missing or cannot be read."""


class Manager(ocp.CheckpointManager):
  """Orbax's manager that writes each step's checksums and reports a failed save in one line."""

  def __init__(self, directory: str, *, max_to_keep: int | None, async_save: bool, create: bool):
    _quiet_orbax_failures()
    self.async_save = async_save
    self._step_in_flight = None  # Orbax writes one step at a time
    self.verified_steps = set()
    # Always Orbax's async checkpointer (`save` waits when not async_save) for its
    # post-finalization callback: it runs once, on process 0, after every process's files are
    # final (behind Orbax's barrier) and before the step folder is renamed into place. So the
    # checksums cover all processes' files, are written once, land with the step, and training
    # does not wait for them.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
    super().__init__(directory, options=options)

  def save(self, step: int, *args, **kwargs) -> bool:
    self.wait_until_finished()  # a failure of the previous save is reported as its own
    self._step_in_flight = step
    with self._reporting_failure():
      return super().save(step, *args, **kwargs)

  def wait_until_finished(self) -> None:
    with self._reporting_failure():  # a failure in Orbax's background thread surfaces here
      super().wait_until_finished()

  @contextlib.contextmanager
  def _reporting_failure(self):
    """A storage error (full disk, permissions) as one UserError; the half-written step goes."""
    try:
      yield
    except UserError:
      raise  # reported already
    except Exception as e:  # pylint: disable=broad-except
      reason = _storage_error(e)
      if reason is None:
        raise  # a bug: its traceback
      step, self._step_in_flight = self._step_in_flight, None
      for partial in self._partial_dirs(step):
        shutil.rmtree(partial, ignore_errors=True)
      self.reload()  # Orbax's list of steps already dropped those the save was to replace
      raise UserError(f'saving step {step} to {self.directory} failed: {reason}') from e

  def _partial_dirs(self, step: int) -> list[str]:
    """Orbax's temporary folders of `step`, oldest first (a crash may have left one)."""
    pattern = os.path.join(glob.escape(str(self.directory)), f'{step}{ORBAX_TMP}*')
    return sorted(glob.glob(pattern), key=os.path.getmtime)

  def _write_checksums(self) -> None:
    # The step's files are still in Orbax's temporary folder (in the step folder itself when a
    # storage backend writes in place).
    written = self._partial_dirs(self._step_in_flight)
    folder = written[-1] if written else step_dir(self, self._step_in_flight)
    sums = {name: _sha256(os.path.join(folder, name)) for name in _item_files(folder)}
    with atomic_open(os.path.join(folder, CHECKSUMS)) as f:
      json.dump({'sha256': sums}, f, indent=1, sort_keys=True)


def _storage_error(error: BaseException) -> str | None:
  """What failed in storage, from an OSError or a TensorStore error in `error`'s chain."""
  while error is not None:
    if isinstance(error, OSError):
      return error.strerror or str(error)
    code = re.search(r"os_error_code='(\d+)'", str(error))  # TensorStore's ValueError
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


def _quiet_orbax_failures() -> None:
  """Orbax reports a failed save or restore in hundreds of lines before its caller gets the
  error (and says it in one line, or with its traceback if it is a bug): each of its threads
  logs it with a traceback, and the reads and writes it abandons fail again as they end or are
  collected. Mutes those."""
  global _previous_unraisablehook
  for logger in ('absl', 'asyncio'):
    logging.getLogger(logger).addFilter(_not_orbax_noise)  # once: the same object
  if sys.unraisablehook is not _mute_abandoned_io:
    _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _mute_abandoned_io


def _not_orbax_noise(record: logging.LogRecord) -> bool:
  orbax_traceback = (record.exc_info and record.levelno >= logging.ERROR and
                     f'{os.sep}orbax{os.sep}' in record.pathname)
  abandoned = record.name == 'asyncio' and 'exception was never retrieved' in record.getMessage()
  return not (orbax_traceback or abandoned)


_previous_unraisablehook = None


def _mute_abandoned_io(unraisable) -> None:
  orbax_io = (isinstance(unraisable.object, types.CoroutineType) and
              f'{os.sep}orbax{os.sep}' in unraisable.object.cr_code.co_filename)
  loop_gone = (isinstance(unraisable.exc_value, RuntimeError) and
               str(unraisable.exc_value) == 'Event loop is closed')
  if not (orbax_io or loop_gone):
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def _item_files(folder: str) -> list[str]:
  """Paths (with '/') of the files of the step's items: Orbax changes its own files at the top
  level (step metadata, commit marker) after this."""
  return sorted(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, '/')
                for item in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, item)) and not item.startswith('.')
                for parent, _, names in os.walk(os.path.join(folder, item)) for name in names)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)  # releases the GIL: training goes on while a save is hashed
  return digest.hexdigest()


def manager(directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
            create: bool = True) -> Manager:
  """The manager of the steps in `directory` (a run's: hrmtext.run.Run.manager)."""
  return Manager(os.path.abspath(directory), max_to_keep=max_to_keep, async_save=async_save,
                 create=create)


def save(mngr: Manager, step: int, *, meta: dict, **items) -> None:
  """Saves `meta` plus any of params/ema/opt_state (pytrees)."""
  args = {name: ocp.args.StandardSave(item) for name, item in items.items() if item is not None}
  args['meta'] = ocp.args.JsonSave({**meta, 'step': step})
  mngr.save(step, args=ocp.args.Composite(**args), force=True)
  if not mngr.async_save:
    mngr.wait_until_finished()


def step_dir(mngr: Manager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def saved_items(mngr: Manager, step: int) -> set:
  path = step_dir(mngr, step)  # hidden folders are temporary (files.atomic_path), not items
  return {name for name in os.listdir(path)
          if os.path.isdir(os.path.join(path, name)) and not name.startswith('.')}


def _checksums(path: str) -> dict | None:
  """The checksums saved in step folder `path`; None for a step saved without them."""
  try:
    with open(os.path.join(path, CHECKSUMS)) as f:
      return json.load(f)['sha256']
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError) as e:
    raise DamagedCheckpoint(f'checkpoint {path} is damaged: unreadable {CHECKSUMS} ({e})') from None


def digest(mngr: Manager, step: int) -> str | None:
  """The sha256 of `step`'s checksums.json, which names every file of it: a fingerprint of the
  step's bytes (None for a step saved without checksums)."""
  path = os.path.join(step_dir(mngr, step), CHECKSUMS)
  return _sha256(path) if os.path.isfile(path) else None


def verify(mngr: Manager, step: int) -> None:
  """DamagedCheckpoint unless every file of `step` holds the bytes it was saved with (hashed once
  per manager). A step saved without checksums passes."""
  if step in mngr.verified_steps:
    return
  path = step_dir(mngr, step)
  for name, digest in (_checksums(path) or {}).items():
    try:
      intact = _sha256(os.path.join(path, name)) == digest
    except FileNotFoundError:
      raise DamagedCheckpoint(f'checkpoint {path} is damaged: {name} is missing') from None
    if not intact:
      raise DamagedCheckpoint(f'checkpoint {path} is damaged: {name} changed since it was saved')
  mngr.verified_steps.add(step)


def latest_intact_step(mngr: Manager) -> int | None:
  """The newest step that verifies (None without steps): where a run resumes. Each damaged newer
  step is renamed `<step>.damaged`, with a warning: kept to look at, out of Orbax's sight so
  that the run can save that step again. DamagedCheckpoint when no step is intact. All processes
  call it."""
  damaged, intact = [], None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      verify(mngr, step)
    except DamagedCheckpoint as e:
      damaged.append((step, e))
      continue
    intact = step
    break
  if damaged and intact is None:
    raise DamagedCheckpoint(f'no intact checkpoint under {mngr.directory}: {damaged[0][1]}')
  if damaged:
    # Each process verified the same files; process 0 moves them once none still reads them.
    steps = [step for step, _ in damaged]
    ocp.multihost.sync_global_processes(f'hrmtext_verified_{steps}')
    if jax.process_index() == 0:
      for step, error in damaged:
        print(f'warning: {error}; set aside as {step}{DAMAGED}, resuming from step {intact}',
              file=sys.stderr)
        shutil.rmtree(step_dir(mngr, step) + DAMAGED, ignore_errors=True)  # from an earlier run
        os.rename(step_dir(mngr, step), step_dir(mngr, step) + DAMAGED)
    ocp.multihost.sync_global_processes(f'hrmtext_set_aside_{steps}')
    mngr.reload()
  return intact


def _restore(mngr: Manager, step: int, **args) -> dict:
  """The named items of `step` (verified first)."""
  path = step_dir(mngr, step)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint step {step} under {mngr.directory}')
  verify(mngr, step)
  try:
    return dict(mngr.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # pylint: disable=broad-except
    if _checksums(path) is not None:
      raise  # its bytes are as saved: not damage
    cause = e
    while cause.__cause__ is not None:  # e.g. TensorStore's 'OUT_OF_RANGE: ...' of a cut file
      cause = cause.__cause__
    reason = (str(cause).strip() or type(cause).__name__).splitlines()[0]
  gc.collect()  # Orbax's abandoned reads: now, muted, rather than at exit
  raise DamagedCheckpoint(f'checkpoint {path} cannot be read (a damaged file?): {reason}')


def read_meta(mngr: Manager, step: int) -> dict:
  return _restore(mngr, step, meta=ocp.args.JsonRestore())['meta']


def restore(mngr: Manager, step: int, **abstract) -> dict:
  """Restores the named items onto the shardings of their abstract trees."""
  return _restore(mngr, step, **{name: ocp.args.StandardRestore(item)
                                 for name, item in abstract.items()})


def abstract_params(cfg: ModelConfig, shardings=None, lora: LoraConfig | None = None):
  """ShapeDtypeStructs of the model's parameters on `shardings`: a pytree of shardings, or a mesh
  (the params' logical shardings on it, as training and the inference engine lay them out).
  None: the mesh of the first device alone (hrmtext.parallel.mesh.inference_mesh). With `lora`,
  those of its adapters alone, on the mesh of `shardings`."""
  model = build_model(cfg, lora=lora)
  if lora is not None and shardings is not None and not isinstance(shardings, jax.sharding.Mesh):
    shardings = jax.tree.leaves(shardings)[0].mesh
  # Unbox while tracing: under sharding.activate (the train loop) unboxing applies logical
  # sharding constraints, which fail on the bare ShapeDtypeStructs eval_shape returns.
  shapes = jax.eval_shape(lambda key: nn.unbox(model.init(key)), jax.random.key(0))
  if shardings is None:
    shardings = mesh_lib.inference_mesh()
  if isinstance(shardings, jax.sharding.Mesh):
    shardings = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0)), shardings)
  tree = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
  return tree if lora is None else lora_lib.split(tree)[1]
