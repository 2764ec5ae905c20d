"""One checkpoint layout for training, conversion and inference.

`<run>/checkpoints/<step>/` holds Orbax items: `params`, `ema` (optional), `opt_state`
(optional) and `meta` (JSON: step, model config and, for imported checkpoints, the original HF
config). Weights-only checkpoints (conversion, export) carry just `params` and `meta`. The input
pipeline's position is the step itself (hrmtext.data.pipeline), so it needs no item of its own and
a run resumes on any number of processes. (Checkpoints of older runs may hold a `data` item: the
per-process Grain state; it is not read.)
"""
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from hrmtext.model import ModelConfig, build_model


def checkpoint_dir(path: str) -> str:
  """`<run>/checkpoints`, or `path` itself when it already is a checkpoints directory."""
  path = os.path.abspath(path)
  is_steps_dir = os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path))
  return path if is_steps_dir or os.path.basename(path) == 'checkpoints' else os.path.join(
      path, 'checkpoints')


def manager(path: str, *, max_to_keep: int | None = 3, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(path), options=options)


def save(mngr: ocp.CheckpointManager, step: int, *, meta: dict, **items) -> None:
  """Saves `meta` plus any of params/ema/opt_state (pytrees)."""
  args = {name: ocp.args.StandardSave(item) for name, item in items.items() if item is not None}
  args['meta'] = ocp.args.JsonSave({**meta, 'step': step})
  mngr.save(step, args=ocp.args.Composite(**args), force=True)


def saved_items(mngr: ocp.CheckpointManager, step: int) -> set:
  step_dir = os.path.join(str(mngr.directory), str(step))
  return {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(mngr: ocp.CheckpointManager, step: int, **abstract) -> dict:
  """Restores the named items onto the shardings of their abstract trees."""
  args = {name: ocp.args.StandardRestore(item) for name, item in abstract.items()}
  return dict(mngr.restore(step, args=ocp.args.Composite(**args)))


def abstract_params(cfg: ModelConfig, shardings=None):
  """ShapeDtypeStructs of the model's parameters on `shardings` (a pytree; default one device)."""
  # Unbox while tracing: under sharding.activate (the train loop) unboxing applies logical
  # sharding constraints, which fail on the bare ShapeDtypeStructs eval_shape returns.
  shapes = jax.eval_shape(lambda key: nn.unbox(build_model(cfg).init(key)), jax.random.key(0))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def load_weights(path: str, *, use_ema: bool = True, step: int | None = None, shardings=None):
  """(ModelConfig, params, meta) of the latest (or given) step; EMA weights when saved."""
  mngr = manager(path, create=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {checkpoint_dir(path)}')
  meta = read_meta(mngr, step)
  cfg = ModelConfig(**meta['model'])
  item = 'ema' if use_ema and 'ema' in saved_items(mngr, step) else 'params'
  params = restore(mngr, step, **{item: abstract_params(cfg, shardings)})[item]
  mngr.close()
  return cfg, params, meta
