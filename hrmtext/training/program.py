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

from hrmtext.data.packing import FIELDS
from hrmtext.model import Horizon, ModelConfig, build_model
from hrmtext.parallel import sharding
from hrmtext.training import optimizer, schedules
from hrmtext.training.step import (TrainState, init_state, loss_chunk_len, make_eval_step,
                                   make_train_step, state_shardings)


class TrainProgram:
  """The model, optimizer, shardings and jitted steps of `config` on `mesh`.

  `total_steps` sets the learning-rate schedule (a constant of the compiled step).
  """

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
               mesh: jax.sharding.Mesh, total_steps: int):
    tc = config.train
    self.config, self.mesh, self.total_steps = config, mesh, total_steps
    self.model = build_model(model_cfg)
    self.model_cfg = self.model.cfg
    self.schedule = schedules.warmup_cosine(tc.lr, tc.warmup_steps, total_steps, tc.lr_min_ratio)
    self.tx = optimizer.adam_atan2(self.schedule, tc.b1, tc.b2, tc.weight_decay)
    self.state_shardings = state_shardings(self.model, mesh)
    self.row_sharding = sharding.batch_sharding(mesh)  # [rows, len]
    self.batch_sharding = NamedSharding(  # [micro_batches, rows, len]
        mesh, PartitionSpec(None, *self.row_sharding.spec))
    self.loss_chunk_len = loss_chunk_len(tc.loss_chunk_len, self.model_cfg.vocab_size,
                                         config.data.seq_len)

  def init_fn(self):
    return init_state(self.model, self.tx, jax.random.key(self.config.train.seed))

  def init_state(self) -> TrainState:
    """A fresh train state, created sharded."""
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)()

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the train state on its shardings (nothing allocated)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(self.init_fn), self.state_shardings)

  def abstract_batch(self, rows: int) -> dict:
    """ShapeDtypeStructs of one step's batch: `rows` rows in train.micro_batches micro-batches."""
    micro = self.config.train.micro_batches
    shape = (micro, rows // micro, self.config.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=self.batch_sharding)
            for name in FIELDS}

  @functools.lru_cache(maxsize=None)
  def train_step(self, horizon: Horizon):
    """(state, batch) -> (state, metrics), jitted; the state is donated."""
    step = make_train_step(self.model, self.tx, horizon, self.config.train.ema_decay,
                           self.loss_chunk_len)
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  @functools.cached_property
  def eval_step(self):
    """(params, batch [rows, len]) -> summed loss/accuracy counts, jitted."""
    return jax.jit(make_eval_step(self.model, self.loss_chunk_len),
                   in_shardings=(self.state_shardings.params, self.row_sharding))
