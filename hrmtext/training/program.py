"""The one builder of the train step: what the Trainer runs, `bench` times and compiles, and the
target tests compile are the same program for the same config.

Everything that decides the compiled program is made here from the experiment config, the model
config and the mesh: the model, the optimizer and its schedule, the state and batch shardings,
the loss chunking and the jitted step per credit horizon.
"""
import functools

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from hrmtext.data.packing import field_shapes
from hrmtext.model import ComputeConfig, Horizon, ModelConfig, build_model, lora
from hrmtext.parallel import sharding
from hrmtext.training import fit, optimizer, schedules
from hrmtext.training.config import resolve, validate
from hrmtext.training.step import (TrainState, init_state, make_eval_step, make_train_step,
                                   state_shardings)


class TrainProgram:
  """The model, optimizer, shardings and jitted steps of a resolved config (`config.resolve`:
  its train.steps set the learning-rate schedule, a constant of the compiled step, and the
  credit horizon's warmup) on `mesh`."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    tc = config.train
    self.config, self.mesh, self.total_steps = config, mesh, tc.steps
    self.model_cfg = ModelConfig.from_dict(config.model)
    self.compute = ComputeConfig.from_dict(config.compute)
    # LoRA (rank > 0): the adapters train, the base weights stay as loaded (None: full training).
    self.lora = lora.LoraConfig.from_dict(config.get('lora'))
    self.lora = self.lora if self.lora.rank else None
    self.model = build_model(self.model_cfg, self.compute, device=mesh.devices.flat[0],
                             lora=self.lora)
    # step (0-based) -> the credit horizon of its update
    self.horizon = schedules.horizon_schedule(tc.horizon, self.model_cfg, tc.steps)
    self.schedule = schedules.warmup_cosine(tc.lr, tc.warmup_steps, tc.steps, tc.lr_min_ratio)
    self.tx = optimizer.adam_atan2(self.schedule, tc.b1, tc.b2, tc.weight_decay)
    self.state_shardings = state_shardings(self.model, mesh)
    # Of the model's parameters (a LoRA model's: base and adapters), as evals take them.
    self.weight_shardings = self.state_shardings.weights()
    self.row_sharding = sharding.batch_sharding(mesh)  # [rows, len]
    self.batch_sharding = NamedSharding(  # [micro_batches, rows, len]
        mesh, PartitionSpec(None, *self.row_sharding.spec))
    self.loss_chunk_len = tc.loss_chunk_len

  def init_fn(self):
    return init_state(self.model, self.tx, jax.random.key(self.config.train.seed),
                      z_L_init=self.config.train.z_L_init)

  def init_state(self, base: bool = True) -> TrainState:
    """A fresh train state, created sharded; without its (random) LoRA base unless `base`."""
    if base:
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)()
    return jax.jit(lambda: self.init_fn().replace(base=None),
                   out_shardings=self.state_shardings.replace(base=None))()

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the train state on its shardings (nothing allocated)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(self.init_fn), self.state_shardings)

  def abstract_batch(self, rows: int) -> dict:
    """ShapeDtypeStructs of one step's batch: `rows` rows in train.micro_batches micro-batches."""
    micro, data = self.config.train.micro_batches, self.config.data
    shapes = field_shapes(rows // micro, data.seq_len, data.max_segments_per_row)
    return {name: jax.ShapeDtypeStruct((micro, *shape), jax.numpy.int32,
                                       sharding=self.batch_sharding)
            for name, shape in shapes.items()}

  @functools.lru_cache(maxsize=None)
  def train_step(self, horizon: Horizon):
    """(state, batch) -> (state, metrics), jitted; the state is donated."""
    step = make_train_step(self.model, self.tx, horizon, self.config.train.ema_decay,
                           self.loss_chunk_len, self.config.train.seed)
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def step_bytes(self) -> int:
    """Per-device bytes of the compiled train step at the last (largest) credit horizon:
    arguments + outputs - donated + temporaries (XLA's buffer assignment for the mesh's
    devices)."""
    rows = self.config.train.global_batch_tokens // self.config.data.seq_len
    with sharding.activate(self.mesh):
      compiled = self.train_step(self.horizon(self.total_steps - 1)).lower(
          self.abstract_state(), self.abstract_batch(rows)).compile()
    return compiled_bytes(compiled)

  @functools.cached_property
  def eval_step(self):
    """(weights (`TrainState.weights`), batch [rows, len]) -> summed loss/accuracy counts,
    jitted."""
    return jax.jit(make_eval_step(self.model, self.loss_chunk_len),
                   in_shardings=(self.weight_shardings, self.row_sharding))


def compiled_bytes(compiled) -> int:
  """Per-device bytes of a compiled program: arguments + outputs - donated + temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes)


def build_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, vocab_size: int,
                  epoch_tokens: int | None, log=print) -> TrainProgram:
  """The TrainProgram of an experiment config on `mesh`: checked (`config.validate`), every
  default filled (`config.resolve`), micro-batches and remat fitted to the devices' memory
  (`fit.fit`). What the Trainer and bench run; its `config` is what the run's config.json holds."""
  validate(config)
  resolved = resolve(config, vocab_size=vocab_size, epoch_tokens=epoch_tokens,
                     device=mesh.devices.flat[0])
  fitted = fit.fit(resolved, mesh, lambda c: TrainProgram(c, mesh).step_bytes(), log)
  return TrainProgram(fitted, mesh)
