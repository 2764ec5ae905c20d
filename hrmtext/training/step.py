"""Train and eval steps: micro-batch gradient accumulation, AdamATan2 + EMA update.

A LoRA model (hrmtext.model.lora) trains its adapters: they are the state's params (with their
EMA and moments) and its frozen base weights ride along in `base`; a step's loss is of
`lora.combine(base, params)`."""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from hrmtext.model import Horizon, LanguageModel, summarize, zero_sums
from hrmtext.model import lora
from hrmtext.parallel import sharding
from hrmtext.training import optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # what trains: the model's parameters, or a LoRA model's adapters
  ema: Any
  opt_state: Any
  base: Any = None  # a LoRA model's frozen weights (not saved: the run refers to their run)

  def weights(self, ema: bool = True):
    """The model's parameters: the EMA (or raw) ones, with a LoRA model's base."""
    return lora.combine(self.base, self.ema if ema else self.params)


def init_state(model: LanguageModel, tx, rng, z_L_init: str = 'truncated_normal') -> TrainState:
  params, base = nn.unbox(model.init(rng, z_L_init)), None
  if model.lora:
    base, params = lora.split(params)
    base = model.frozen_base(base)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                    opt_state=tx.init(params), base=base)


def state_shardings(model: LanguageModel, mesh) -> TrainState:
  """Params (and EMA, moments, a LoRA base) sharded by their logical axes; counters
  replicated."""
  params = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0)), mesh)
  base = None
  if model.lora:
    base, params = lora.split(params)
  return TrainState(step=sharding.replicated(mesh), params=params, ema=params,
                    opt_state=optimizer.state_shardings(params), base=base)


def grad_mask(model: LanguageModel, horizon: Horizon, params) -> dict:
  """Static per-leaf bools: does this horizon give the leaf a gradient?"""
  has = model.has_gradient(horizon)
  return {name: jax.tree.map(lambda _, h=has[name]: h, sub) for name, sub in params.items()}


def loss_chunk_len(setting: int, vocab_size: int, seq_len: int) -> int:
  """`train.loss_chunk_len` resolved: -1 (auto) chunks the cross-entropy by 512 positions where
  one row's float32 logits take 128 MiB or more (a vocab of 8192 or more at 4096 tokens)."""
  if setting >= 0:
    return setting
  return 512 if vocab_size * seq_len * 4 >= 2**27 and seq_len > 512 else 0


def dropout_keys(model: LanguageModel, seed: int, step, micro_batches: int):
  """The LoRA dropout's key of each micro-batch of `step` (None without dropout): a function of
  the step, so a resumed run draws the same masks."""
  if not (model.lora and model.lora.dropout):
    return None
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), micro_batches)


def make_train_step(model: LanguageModel, tx, horizon: Horizon, ema_decay: float,
                    loss_chunk_len: int = 0, seed: int = 0):
  """(state, batch) -> (state, metrics); batch leaves are [micro_batches, rows, len]. `seed`:
  of the LoRA adapters' dropout."""

  def micro_step(params, base, carry, micro_batch, rng):
    def loss_fn(p):
      sums = model.loss_sums(lora.combine(base, p), micro_batch, horizon, loss_chunk_len, rng)
      return sums['loss_sum'], sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  def train_step(state: TrainState, batch):
    zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums())
    keys = dropout_keys(model, seed, state.step, jax.tree.leaves(batch)[0].shape[0])
    (grads, sums), _ = jax.lax.scan(
        lambda c, xs: micro_step(state.params, state.base, c, *xs), zeros, (batch, keys))
    # Summed token losses / global labelled-token count == the mean over the whole batch.
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums['tokens'], 1), grads)
    mask = grad_mask(model, horizon, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_mask=mask)
    params = optax.apply_updates(state.params, updates)
    ema = optimizer.ema_update(state.ema, params, ema_decay, mask)
    metrics = {**summarize(sums), 'grad_norm': optax.global_norm(grads), 'tokens': sums['tokens']}
    return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: LanguageModel, loss_chunk_len: int = 0):
  """(params, batch [rows, len]) -> summed loss/accuracy counts (teacher forcing).

  Teacher-forced exact accuracy equals greedy exact match: every response token is the
  argmax given the correct prefix iff greedy decoding reproduces the response.
  """
  def eval_step(params, batch):
    return model.loss_sums(params, batch, loss_chunk_len=loss_chunk_len)

  return eval_step


def heldout_metrics(eval_step, params, batches: dict[str, list], put=lambda batch: batch) -> dict:
  """Teacher-forced metrics of `make_eval_batches` batches, over all tasks and per task.

  Keys 'eval/<metric>' (token means over every task) and 'eval/<task>/<metric>'; `put` places a
  host batch as `eval_step` takes it. Empty without batches.
  """
  per_task = {}
  for task, task_batches in batches.items():
    sums = zero_sums()
    for batch in task_batches:
      sums = jax.tree.map(jnp.add, sums, eval_step(params, put(batch)))
    per_task[task] = sums
  if not per_task:
    return {}
  total = jax.tree.map(lambda *task_sums: sum(task_sums), *per_task.values())
  metrics = {f'eval/{k}': float(v) for k, v in summarize(total).items()}
  for task, sums in per_task.items():
    metrics.update({f'eval/{task}/{k}': float(v) for k, v in summarize(sums).items()})
  return metrics
