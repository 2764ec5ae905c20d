"""What an RL run compiles, on one mesh: the train program (model, optimizer, state shardings:
training.program), the policy-gradient steps, and the rollout engine serving the same weights.
Built from the config alone, so `python -m hrmtext.rl --compile_only --target h100:1` compiles
it for devices that are not here and reports its memory."""
import jax
import ml_collections
import numpy as np

from hrmtext.data.packing import field_shapes
from hrmtext.errors import UserError
from hrmtext.infer import Engine, Sampling
from hrmtext.infer.engine import bucket
from hrmtext.parallel import sharding
from hrmtext.rl.config import with_policy_depth
from hrmtext.rl.step import make_rl_step
from hrmtext.training.program import build_program, compiled_bytes

FLOAT_FIELDS = ('advantages', 'weights', 'old_logp', 'ref_logp')


class RLProgram:
  """`vocab_size`: the tokenizer's (config.model's vocab_size when set wins); `eoa`: its
  end-of-answer id; `max_prompt_len`: the longest instruction, in tokens."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, *, vocab_size: int, eoa: int,
               max_prompt_len: int, log=print):
    self.train = build_program(with_policy_depth(config), mesh, vocab_size=vocab_size,
                               epoch_tokens=None, log=log)
    self.config = config = self.train.config
    self.mesh = mesh
    self.rows = config.train.global_batch_tokens // config.data.seq_len
    if self.rows % config.train.micro_batches:
      raise UserError(f'{self.rows} rows per step do not split into '
                      f'{config.train.micro_batches} micro-batches')
    rl = config.rl
    self.engine = Engine(self.train.model, None, eoa=eoa, slots=rl.slots,
                         max_len=max_prompt_len + rl.max_new_tokens, vocab_size=vocab_size,
                         mesh=mesh)
    self._steps = {}

  def rl_step(self, horizon, with_old_logp: bool):
    """(state, batch) -> (state, metrics, logp), jitted, the state donated; `with_old_logp`: the
    batch holds the sampling policy's log-probs (the inner updates after the first)."""
    key = (horizon, with_old_logp)
    if key not in self._steps:
      rl, tc = self.config.rl, self.config.train
      step = make_rl_step(self.train.model, self.train.tx, horizon, tc.ema_decay,
                          chunk_len=tc.loss_chunk_len, clip_low=rl.clip_low,
                          clip_high=rl.clip_high, kl_coef=rl.kl_coef)
      batch = self.train.batch_sharding
      self._steps[key] = jax.jit(step, in_shardings=(self.train.state_shardings, batch),
                                 out_shardings=(self.train.state_shardings, None, batch),
                                 donate_argnums=0)
    return self._steps[key]

  def abstract_batch(self, with_old_logp: bool) -> dict:
    """ShapeDtypeStructs of one step's packed rollouts, [micro_batches, rows, len] each."""
    micro, data = self.config.train.micro_batches, self.config.data
    shapes = field_shapes(self.rows // micro, data.seq_len, data.max_segments_per_row)
    floats = ['advantages', 'weights'] + ['old_logp'] * with_old_logp + (
        ['ref_logp'] if self.config.rl.kl_coef else [])
    shapes.update(dict.fromkeys(floats, shapes['labels']))
    return {name: jax.ShapeDtypeStruct(
        (micro, *shape), np.float32 if name in FLOAT_FIELDS else np.int32,
        sharding=self.train.batch_sharding) for name, shape in shapes.items()}

  def device_batch(self, batch: dict) -> dict:
    """Host arrays [rows, len] -> [micro_batches, rows / micro_batches, len] on the mesh."""
    micro = self.config.train.micro_batches
    return {name: jax.device_put(x.reshape(micro, -1, *x.shape[1:]), self.train.batch_sharding)
            for name, x in batch.items()}

  def memory(self) -> dict[str, int]:
    """Per-device bytes (arguments + outputs - donated + temporaries) of each compiled program at
    its largest: the update at the last credit horizon, a prefill of every slot with the longest
    prompt, a decode chunk over the whole cache; `rollout_peak` adds the train state the engine
    does not read (its weights are the state's params), `peak` is the larger of it and the
    update's."""
    engine, horizon = self.engine, self.train.horizon(self.train.total_steps - 1)
    abstract = self.train.abstract_state()
    params = abstract.weights(ema=False)  # what the engine reads: a LoRA model's base too
    prompt_len = min(bucket(engine.max_len - self.config.rl.max_new_tokens), engine.max_len)
    sampling = Sampling(self.config.rl.temperature, self.config.rl.top_p)
    with sharding.activate(self.mesh):
      update = self.rl_step(horizon, True).lower(abstract, self.abstract_batch(True)).compile()
    prefill, decode = (p.compile() for p in engine.lower(sampling, prompt_len=prompt_len,
                                                         params=params))
    # While the engine runs, the rest of the train state (EMA, moments) stays on the devices.
    held = _device_bytes(abstract) - _device_bytes(params)
    rollout = max(compiled_bytes(prefill), compiled_bytes(decode)) + held
    return {'update': compiled_bytes(update), 'prefill': compiled_bytes(prefill),
            'decode': compiled_bytes(decode), 'rollout_peak': rollout,
            'peak': max(rollout, compiled_bytes(update))}


def _device_bytes(tree) -> int:
  """Bytes of one device's shards of the abstract arrays `tree` (each with its sharding)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))
