"""The device mesh: axes ('data', 'fsdp', 'tensor'), over every device of every process for
training, over the first devices it asks for to serve a model."""
import math
import types

import jax

from hrmtext.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of mesh_cfg.{data,fsdp,tensor}; one of them may be -1: all the remaining devices."""
  sizes = [int(getattr(mesh_cfg, axis)) for axis in MESH_AXES]
  described = ', '.join(f'{axis}={size}' for axis, size in zip(MESH_AXES, sizes))
  if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
    raise UserError(f'mesh {described}: sizes must be positive, with at most one -1')
  fixed = math.prod(size for size in sizes if size != -1)
  if -1 in sizes and num_devices % fixed == 0:
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(f'mesh {described} does not fit the {num_devices} devices')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all devices of all processes), 'tensor' innermost.

  Axes are Auto (the compiler propagates shardings from in/out shardings and logical
  constraints), as the logical axis rules in `sharding` expect.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def inference_mesh(mesh_cfg=None, devices=None) -> jax.sharding.Mesh:
  """Mesh over the first data * fsdp * tensor of `devices` (all of them where a size is -1):
  serving a model need not take every device. None: the first device alone."""
  devices = jax.devices() if devices is None else devices
  mesh_cfg = mesh_cfg or types.SimpleNamespace(data=1, fsdp=1, tensor=1)
  sizes = [int(getattr(mesh_cfg, axis)) for axis in MESH_AXES]
  if -1 not in sizes and math.prod(sizes) > 0:  # other bad sizes: make_mesh says what is wrong
    devices = devices[:math.prod(sizes)]
  return make_mesh(mesh_cfg, devices)
