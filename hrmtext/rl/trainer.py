"""The RL loop: each step samples G responses to a draw of prompts from the inference engine on
the current parameters (on the training mesh, no copy), rewards them with their verifiers, keeps
the informative groups (dynamic sampling) and takes `rl.inner_steps` clipped policy-gradient
updates on them (AdamATan2 and EMA as training's).

A step's prompts and sampling streams are pure functions of (seed, step), and the state is the
training state: a run killed at any point resumes from its last checkpoint bitwise.
"""
import os
import time

import jax
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter

from hrmtext import checkpoint
from hrmtext.errors import UserError
from hrmtext.evals.engine import HeldoutGeneration
from hrmtext.evals.loaders import heldout_files, heldout_tasks
from hrmtext.infer import Sampling
from hrmtext.model import ModelConfig
from hrmtext.parallel import distributed, sharding
from hrmtext.parallel.mesh import make_mesh
from hrmtext.rl import objective, prompts, rollout
from hrmtext.rl.config import policy_cycles, validate_rl
from hrmtext.rl.program import FLOAT_FIELDS, RLProgram
from hrmtext.rl.step import make_logp
from hrmtext.run import Run
from hrmtext.training.config import validate
from hrmtext.training.loop import TrainStateStore, stop_signals
from hrmtext.training.step import TrainState


class RLTrainer(TrainStateStore):
  """Everything an RL run needs, built from the config; `run()` trains to train.steps. The state
  starts, resumes and saves as a training run's (TrainStateStore): with `lora.rank` > 0 only
  adapters of init_from's frozen weights train."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    validate_rl(config)
    distributed.initialize()
    if jax.process_count() > 1:
      raise UserError('hrmtext.rl runs in one process (its engine serves that process\'s devices)')
    self.run_dir, self.workdir = Run(workdir), workdir
    source = Run(config.init_from)
    try:
      source_meta = source.meta()
    except FileNotFoundError as e:
      raise UserError(f'init_from: {e}') from None
    self.tokenizer = source.tokenizer(source_meta)
    if self.tokenizer is None:
      raise UserError(f'init_from {config.init_from} keeps no tokenizer')
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(ModelConfig.from_dict(source_meta['model']).to_dict())
    config.data.dir = config.data.dir or source.data_dir(source_meta) or ''
    self.mesh = make_mesh(config.mesh)
    prompt_path = config.rl.prompts or prompts.builtin_split(config.data.dir)
    if not config.rl.prompts and not os.path.isdir(prompt_path):
      raise UserError(f'no RL prompts in {prompt_path}: re-run `python -m hrmtext.prepare '
                      f'--output {config.data.dir}` (it adds the split), or set rl.prompts')
    self.prompts = prompts.load(prompt_path, config.rl.tasks)
    self.instructions = [self.tokenizer.encode_instruction(r['instruction'], r['condition'])
                         for r in self.prompts]
    self.rl = RLProgram(config, self.mesh, vocab_size=self.tokenizer.vocab_size,
                        eoa=self.tokenizer.eoa, max_prompt_len=max(map(len, self.instructions)),
                        log=self.say)
    self.program = self.rl.train
    self.config = config = self.rl.config
    self.model_cfg, self.total_steps = self.program.model_cfg, config.train.steps
    self.engine, self.rows = self.rl.engine, self.rl.rows
    self.sampling = Sampling(config.rl.temperature, config.rl.top_p)
    self.mngr = self.run_dir.manager(max_to_keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
    self.resume_step = checkpoint.latest_intact_step(self.mngr)
    self.base_ref = None
    if self.resume_step is not None:
      self._check_resumed_model()
    else:
      self._check_init_from()
    self.evaluator = self._heldout_generation()
    self._signals = set()

  def _heldout_generation(self) -> HeldoutGeneration | None:
    """Greedy exact match on the held-out rows of the tasks trained on, every eval.every_steps."""
    cfg = self.config
    available = heldout_files(cfg.data.dir)
    names = sorted({r['task'] for r in self.prompts} & set(available))
    if not cfg.eval.generate_per_task or not names:
      return None
    tasks = heldout_tasks(cfg.data.dir, names=names, max_new_tokens=cfg.rl.max_new_tokens)
    return HeldoutGeneration(self.program.model, tasks, self.tokenizer,
                             every_steps=cfg.eval.every_steps, limit=cfg.eval.generate_per_task,
                             max_new_tokens=cfg.rl.max_new_tokens, mesh=self.mesh,
                             slots=cfg.rl.slots)

  def _check_same_model(self, saved: ModelConfig, what: str) -> None:
    if policy_cycles(self.config):  # init_from's weights at another depth: only cycles differ
      saved = saved.with_cycles(self.model_cfg.H_cycles, self.model_cfg.L_cycles)
    super()._check_same_model(saved, what)

  # ---- one step ---------------------------------------------------------------------------

  def rollouts(self, state: TrainState, step: int) -> tuple[list, dict]:
    """The groups of `step` (informative ones only, with dynamic sampling) and their metrics."""
    rl = self.config.rl
    self.engine.params = state.weights(ema=False)  # the policy, already on the mesh: no copy
    kept, sampled = [], []
    for attempt in range(rl.max_draws if rl.dynamic_sampling else 1):
      chosen = prompts.step_prompts(len(self.prompts), rl.prompts_per_step,
                                    seed=self.config.train.seed, step=step, attempt=attempt)
      groups = rollout.sample_groups(
          self.engine, self.tokenizer, [self.prompts[i] for i in chosen],
          group_size=rl.group_size, sampling=self.sampling, max_new_tokens=rl.max_new_tokens,
          seed=self.config.train.seed, step=step, first_prompt=attempt * rl.prompts_per_step)
      sampled += groups
      rewards = np.concatenate([g.rewards for g in groups])
      informative = (objective.informative_groups(rewards, rl.group_size)
                     if rl.dynamic_sampling else np.ones(len(groups), bool))
      kept += [g for g, keep in zip(groups, informative) if keep]
      if len(kept) >= rl.prompts_per_step:
        break
    kept = kept[:rl.prompts_per_step]
    return kept, self._rollout_metrics(sampled, kept)

  def _rollout_metrics(self, sampled, kept) -> dict:
    rewards = np.concatenate([g.rewards for g in sampled])
    metrics = {'reward/mean': float(rewards.mean()), 'reward/std': float(rewards.std()),
               'groups_kept': len(kept) / len(sampled),
               'response_len': float(np.mean([len(r) for g in sampled for r in g.responses])),
               'overlong': float(np.mean([~g.finished for g in sampled]))}
    for task in sorted({g.row['task'] for g in sampled}):
      mine = np.concatenate([g.rewards for g in sampled if g.row['task'] == task])
      metrics[f'reward/{task}'] = float(mine.mean())
    return metrics

  def update(self, state: TrainState, step: int, groups: list) -> tuple[TrainState, dict]:
    """rl.inner_steps updates on the packed groups; the later ones against the log-probs the
    first one computed (the sampling policy's, in the train forward's numerics)."""
    rl, data = self.config.rl, self.config.data
    batch = rollout.training_batch(
        groups, self.tokenizer.eoa, rows=self.rows, seq_len=data.seq_len,
        max_segments=data.max_segments_per_row, token_level=rl.token_level,
        drop_overlong=rl.drop_overlong)
    batch = self.rl.device_batch(batch)
    if rl.kl_coef:
      batch['ref_logp'] = self._reference_logp(state, batch)
    horizon = self.program.horizon(step - 1)
    per_update = []
    for inner in range(rl.inner_steps):
      state, metrics, logp = self.rl.rl_step(horizon, inner > 0)(state, batch)
      if inner == 0:
        batch['old_logp'] = logp
      per_update.append(metrics)
    # The mean over the updates (the first one's clip fraction is 0: its ratio is exactly 1).
    per_update = jax.device_get(per_update)
    return state, {k: float(np.mean([m[k] for m in per_update])) for k in per_update[0]}

  def _reference_logp(self, state: TrainState, batch: dict):
    """The frozen init_from weights' log-probs of the batch, per micro-batch: a LoRA run's base
    with fresh adapters (B is 0: the base's function), else init_from's EMA or params."""
    if not hasattr(self, '_reference'):
      if self.program.lora:  # the adapters alone: the base is the state's (donated each step)
        self._reference = self.program.init_state(base=False).params
      else:
        self._reference = Run(self.config.init_from).load_weights(
            use_ema=self.config.init_mode == 'ema',
            shardings=self.program.state_shardings.params)[1]
      self._ref_fn = jax.jit(jax.vmap(make_logp(self.program.model, self.program.horizon(0),
                                                self.config.train.loss_chunk_len),
                                      in_axes=(None, 0)))
    fields = {k: v for k, v in batch.items() if k not in FLOAT_FIELDS}
    weights = state.replace(params=self._reference).weights(ema=False)
    return self._ref_fn(weights, fields)

  def run(self) -> dict:
    with sharding.activate(self.mesh), stop_signals(self._signals):
      try:
        return self._run()
      finally:
        self.mngr.wait_until_finished()
        self.mngr.close()

  def _run(self) -> dict:
    config = self.config
    state, start = self._initial_state()
    self.run_dir.write_config(config)
    if not self.run_dir.has_tokenizer():
      self.run_dir.save_tokenizer(self.tokenizer)
    self.run_dir.drop_metrics_after(start)
    writer = SummaryWriter(self.run_dir.tensorboard_dir)
    self.say(f'RL from {config.init_from}: {len(self.prompts)} prompts, '
             f'{config.rl.prompts_per_step} x {config.rl.group_size} responses a step, '
             f'{config.train.steps} steps; mesh {dict(self.mesh.shape)}, attention '
             f'{self.program.compute.attention}')
    last = {}

    def log(step, metrics):
      self._log(writer, step, metrics)
      last.update(metrics)

    if start == 0 and self.evaluator:  # the policy before RL, logged as step 0
      log(0, self.evaluator(0, state))
    for step in range(start + 1, config.train.steps + 1):
      t0 = time.perf_counter()
      groups, metrics = self.rollouts(state, step)
      t1 = time.perf_counter()
      generated = sum(len(r) for g in groups for r in g.responses)
      if groups:
        state, update_metrics = self.update(state, step, groups)
        metrics.update(update_metrics)
      t2 = time.perf_counter()
      metrics.update({
          'time/rollout_s': t1 - t0, 'time/train_s': t2 - t1,
          'time/rollout_fraction': (t1 - t0) / (t2 - t0),
          'rollout_tokens_per_s': generated / (t1 - t0),
          'train_tokens_per_s': (self.rows * config.data.seq_len * config.rl.inner_steps /
                                 max(t2 - t1, 1e-9) if groups else 0.0)})
      if step % config.log_every_steps == 0 or step == config.train.steps:
        log(step, metrics)
      stop = sorted(self._signals)
      if step % config.checkpoint.every_steps == 0 or step == config.train.steps or stop:
        self.save(state, step)
      if self.evaluator and not stop and (step % config.eval.every_steps == 0 or
                                          step == config.train.steps):
        log(step, self.evaluator(step, state))
      if stop:
        self.say(f'{"/".join(stop)}: saved step {step}, exiting')
        break
    writer.close()
    return last
