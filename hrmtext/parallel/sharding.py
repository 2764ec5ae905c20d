"""Logical axis rules (the one place that maps model axis names to mesh axes) and helpers."""
import contextlib

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

BATCH_AXES = ('data', 'fsdp')

# (logical name, mesh axes); names not listed are replicated. Params are sharded FSDP-style
# over their 'embed' dim and Megatron-style over heads/mlp/vocab; activations over the batch.
LOGICAL_AXIS_RULES = (
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('act_batch', BATCH_AXES),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_head_dim', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # KV cache (hrmtext.model.cache), after MaxText's cache_* rules: rows as the batch, heads as
    # the attention's, so a device holds the keys/values its attention shard reads.
    ('cache_layers', None),
    ('cache_batch', BATCH_AXES),
    ('cache_heads', 'tensor'),
    ('cache_sequence', None),
    ('cache_kv', None),
)


def param_shardings(boxed_params, mesh: jax.sharding.Mesh):
  """NamedShardings (unboxed structure) for params boxed in nn.LogicallyPartitioned, e.g.
  `jax.eval_shape(model.init, ...)`; leaves without axis metadata are replicated."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, LOGICAL_AXIS_RULES)


def logical_sharding(mesh: jax.sharding.Mesh, axes: tuple) -> NamedSharding:
  """The sharding of an array whose dims have the logical names `axes`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, LOGICAL_AXIS_RULES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch rows split over ('data', 'fsdp'), replicated over 'tensor'."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def make_global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Global arrays from each process's rows (its share of the global batch, in process order)."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, rows)
          for name, rows in local_batch.items()}


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh):
  """Makes `mesh` and the rules current so nn.with_logical_constraint takes effect; trace
  (call) jitted functions inside."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def process_data_shard(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(index, count): which of `count` equal slices of the global batch this process feeds to
  make_global_batch. Processes whose devices hold the same rows (a 'tensor' axis spanning
  hosts) get the same index and must load the same rows."""
  batch_blocks = mesh.devices.reshape(-1, mesh.shape['tensor'])  # row-major over (data, fsdp)
  blocks_of = {}
  for block, devices in enumerate(batch_blocks):
    for device in devices:
      blocks_of.setdefault(device.process_index, set()).add(block)
  groups = sorted({frozenset(blocks) for blocks in blocks_of.values()}, key=min)
  return groups.index(frozenset(blocks_of[jax.process_index()])), len(groups)
