"""The training loop: sharded state, resumable from its run directory, periodic saves, and
in-loop evaluations as hooks with a period (`Evaluator`)."""
import contextlib
import os
import signal
import sys
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_collections
from tensorboardX import SummaryWriter
from tqdm import tqdm

from hrmtext import checkpoint
from hrmtext.data import pipeline
from hrmtext.data.layout import SampledSet
from hrmtext.data.tokenizer import Tokenizer
from hrmtext.errors import UserError
from hrmtext.model import ModelConfig, lora
from hrmtext.model.flops import peak_flops, train_flops_per_token
from hrmtext.parallel import distributed, sharding
from hrmtext.parallel.mesh import make_mesh
from hrmtext.run import Run, find_base
from hrmtext.training import optimizer
from hrmtext.training.config import validate
from hrmtext.training.program import build_program
from hrmtext.training.step import TrainState, heldout_metrics


# How `init_from` starts a run (DESIGN §3, SFT): 'continue' (the reference default) takes the
# source's params, EMA, optimizer moments and per-leaf counts, with the step counter and schedule
# restarting at 0 and this run's hyper-parameters; 'ema' / 'params' take the source's EMA / raw
# weights with a fresh optimizer and EMA.
INIT_MODES = ('continue', 'ema', 'params')


class Waits:
  """Host seconds spent waiting on the input pipeline, eval and checkpoints between log lines;
  the rest of the interval is the train step (dispatch, and waiting for the devices)."""

  def __init__(self):
    self.seconds = dict(data=0.0, eval=0.0, checkpoint=0.0)

  @contextlib.contextmanager
  def timing(self, what: str):
    start = time.perf_counter()
    yield
    self.seconds[what] += time.perf_counter() - start

  def report(self, elapsed: float, steps: int) -> dict:
    """Per-step data wait and step time, total eval and checkpoint time; restarts the counts."""
    s = self.seconds
    step = (elapsed - sum(s.values())) / steps
    report = {'time/data_wait_s': s['data'] / steps, 'time/step_s': step,
              'time/eval_s': s['eval'], 'time/checkpoint_s': s['checkpoint']}
    self.seconds = dict.fromkeys(s, 0.0)
    return report


class ProfileWindow:
  """A jax.profiler trace of the steps logged as start_step .. start_step + num_steps - 1,
  written where TensorBoard's profile plugin finds it (<log_dir>/plugins/profile)."""

  def __init__(self, cfg: ml_collections.ConfigDict, log_dir: str):
    self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
    self.log_dir, self.tracing = log_dir, False

  def before(self, step: int) -> None:
    """Called before the update that will be logged as `step`."""
    if step == self.first <= self.last:
      jax.profiler.start_trace(self.log_dir)
      self.tracing = True

  def after(self, step: int, state) -> None:
    if step == self.last:
      self.close(state)

  def close(self, state) -> None:
    if self.tracing:
      jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
      jax.profiler.stop_trace()
      self.tracing = False
      if distributed.is_main_process():
        tqdm.write(f'profile of steps {self.first}-{self.last} in {self.log_dir}')


@contextlib.contextmanager
def stop_signals(received: set):
  """While open, SIGTERM (preemption, a launcher stopping its processes) and SIGINT (Ctrl-C) add
  their names to `received`: the loop stops after the current step, with a save."""
  names = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT'}
  previous = {sig: signal.signal(sig, lambda sig, _: received.add(names[sig])) for sig in names}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def lora_size(state: TrainState) -> dict:
  """What a LoRA run's checkpoints hold: its trainable parameters and the bytes of their arrays
  (adapters, EMA, optimizer state)."""
  arrays = jax.tree.leaves((state.params, state.ema, state.opt_state))
  return {'params': lora.count(state.params),
          'bytes': sum(x.size * x.dtype.itemsize for x in arrays)}


def check_batch_split(rows: int, micro_batches: int, batch_shards: int) -> None:
  """A step's rows must split evenly into micro-batches, each over the batch shards."""
  if rows < 1 or micro_batches < 1 or rows % (micro_batches * batch_shards):
    raise UserError(f'{rows} rows per step do not split into {micro_batches} micro-batches over '
                    f'{batch_shards} batch shards')


class Evaluator(Protocol):
  """An in-loop evaluation: a hook with a period, as levanter's. Called after the save of every
  step that is a multiple of `every_steps`, and of the last step, unless a signal stops the run;
  the metrics of the evaluators due at a step are logged together, in one row."""
  every_steps: int

  def __call__(self, step: int, state: TrainState) -> dict:
    ...


class HeldoutLoss:
  """The teacher-forced held-out eval (`Trainer.evaluate` of the EMA weights) every
  eval.every_steps: the Trainer's own evaluator."""

  def __init__(self, trainer: 'Trainer'):
    self.trainer, self.every_steps = trainer, trainer.config.eval.every_steps

  def __call__(self, step: int, state: TrainState) -> dict:
    return self.trainer.evaluate(state.weights())


class TrainStateStore:
  """Starts, resumes and saves the TrainState of a run directory: from the workdir's newest intact
  step, else from init_from's weights (a LoRA run: fresh adapters on them, frozen), else from
  scratch. What a loop over it sets: config, program (its TrainProgram), model_cfg, workdir,
  run_dir, mngr, resume_step, total_steps and base_ref (None)."""

  def _check_init_from(self) -> None:
    """FileNotFoundError / ValueError unless `init_from` holds a checkpoint of this model (and,
    for init_mode 'continue', its optimizer state and EMA) whose tokenizer, if it keeps one, is
    the data's."""
    mode, source = self.config.init_mode, self.config.init_from
    if mode not in INIT_MODES:
      raise UserError(f'init_mode {mode!r} is not one of {", ".join(INIT_MODES)}')
    mngr = Run(source).manager(create=False)
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(
          f'init_from: no checkpoint under {os.path.abspath(Run(source).checkpoints)}')
    meta = checkpoint.read_meta(mngr, step)
    cfg = ModelConfig.from_dict(meta['model'])
    missing = {'opt_state', 'ema'} - checkpoint.saved_items(mngr, step)
    mngr.close()
    self._check_same_model(cfg, f'init_from {source}')
    if self.tokenizer is not None and Run(source).has_tokenizer():  # its token ids are the data's
      try:
        Run(source).check_tokenizer(self.tokenizer)
      except UserError as e:
        raise UserError(f'init_from: {e}') from None
    if self.program.lora:  # its weights are the frozen base, whatever else it holds
      return
    if mode == 'continue' and meta.get('lora'):
      raise UserError(f'init_mode continue needs the optimizer state of the weights; {source} is '
                      f'a LoRA run, whose optimizer state is its adapters\' (use '
                      f'--config.init_mode=ema or params: its weights with the adapters merged)')
    if mode == 'continue' and missing:
      raise UserError(f'init_mode continue needs the optimizer state and EMA of a training run; '
                      f'{source} step {step} has no {" or ".join(sorted(missing))} '
                      f'(use --config.init_mode=ema or params)')

  def _check_resumed_model(self) -> None:
    """UserError unless the workdir's checkpoint is of this model (e.g. not another H_cycles)
    and, for a LoRA run, of these adapters."""
    step = self.resume_step
    meta = checkpoint.read_meta(self.mngr, step)
    saved = ModelConfig.from_dict(meta['model'])
    self._check_same_model(saved, f'{self.workdir} step {step} (resuming)')
    # The adapters' shapes and meaning must match; the dropout may change.
    adapters = lambda d: {k: v for k, v in (d or {}).items() if k != 'dropout'}
    ours = self.program.lora.to_dict() if self.program.lora else None
    if adapters(meta.get('lora')) != adapters(ours):
      raise UserError(f'{self.workdir} step {step} (resuming) has other LoRA adapters: '
                      f'{meta.get("lora")} (this run {ours})')

  def _check_same_model(self, saved: ModelConfig, what: str) -> None:
    differences = saved.weight_differences(self.model_cfg)
    if differences:
      described = ', '.join(f'{name} {theirs} (this run {ours})'
                            for name, (theirs, ours) in differences.items())
      raise UserError(f'{what} is another model: {described}')

  def _initial_state(self) -> tuple[TrainState, int]:
    """Resume from the workdir, else start from `init_from` weights, else from scratch."""
    if self.program.lora:
      return self._initial_lora_state()
    step = self.resume_step
    abstract = self.program.abstract_state()
    if step is not None:
      self.say(f'resuming from {self.mngr.directory} step {step}')
      items = checkpoint.restore(self.mngr, step, params=abstract.params, ema=abstract.ema,
                                 opt_state=abstract.opt_state)
      return TrainState(jnp.asarray(step, jnp.int32), items['params'], items['ema'],
                        items['opt_state']), step
    state = self.program.init_state()
    source, mode = self.config.init_from, self.config.init_mode  # checked in __init__
    if source and mode == 'continue':
      mngr = Run(source).manager(create=False)
      source_step = mngr.latest_step()
      items = checkpoint.restore(mngr, source_step, params=abstract.params, ema=abstract.ema,
                                 opt_state=abstract.opt_state)
      mngr.close()
      self.say(f'continuing from {source} step {source_step}: its params, EMA, optimizer '
               f'moments and counts; step and schedule restart at 0')
      opt_state = items['opt_state']._replace(step=state.opt_state.step)  # the schedule's clock
      state = state.replace(params=items['params'], ema=items['ema'], opt_state=opt_state)
    elif source:
      _, params, _ = Run(source).load_weights(use_ema=mode == 'ema',
                                              shardings=self.program.state_shardings.params)
      which = 'its EMA' if mode == 'ema' else 'its params'
      self.say(f'starting from the weights of {source} ({which}), fresh optimizer')
      # The EMA must not share the params' buffers: the train step donates both.
      state = state.replace(params=params, ema=optimizer.ema_init(params))
    return state, 0

  def _initial_lora_state(self) -> tuple[TrainState, int]:
    """A LoRA run's adapters (resumed, or fresh) and the frozen base they adapt: the weights of
    init_from (its EMA with init_mode ema, else its params), found by the run's reference."""
    step = self.resume_step
    if step is not None:
      self.say(f'resuming from {self.mngr.directory} step {step}')
      abstract = self.program.abstract_state()
      items = checkpoint.restore(self.mngr, step, params=abstract.params, ema=abstract.ema,
                                 opt_state=abstract.opt_state)
      state = TrainState(jnp.asarray(step, jnp.int32), items['params'], items['ema'],
                         items['opt_state'])
      self.base_ref = checkpoint.read_meta(self.mngr, step)['lora_base']
    else:
      state, step = self.program.init_state(base=False), 0
      self.base_ref = Run(self.config.init_from).reference(
          use_ema=self.config.init_mode == 'ema', relative_to=self.workdir)
    ref, shardings = self.base_ref, self.program.state_shardings.base
    _, base, _ = find_base(ref, self.workdir).load_weights(
        use_ema=ref['weights'] == 'ema', step=ref['step'], shardings=shardings)
    base = jax.jit(self.program.model.frozen_base, out_shardings=shardings)(base)
    self.say(f'LoRA adapters of {ref["run"]} step {ref["step"]} (its {ref["weights"]}, frozen '
             f'in {jax.tree.leaves(base["lm_head"])[0].dtype})')
    return state.replace(base=base), step

  def save(self, state: TrainState, step: int) -> None:
    """A checkpoint of `state` with its meta (hrmtext.run)."""
    meta = {'model': self.model_cfg.to_dict(), 'compute': self.program.compute.to_dict(),
            'config': self.config.to_dict(), 'data_dir': os.path.abspath(self.config.data.dir)}
    if self.program.lora:
      meta.update(lora=self.program.lora.to_dict(), lora_base=self.base_ref,
                  lora_size=lora_size(state))
    checkpoint.save(self.mngr, step, meta=meta,
                    params=state.params, ema=state.ema, opt_state=state.opt_state)

  def _log(self, writer, step: int, metrics: dict) -> None:
    if not writer or not metrics:
      return
    for name, value in metrics.items():
      writer.add_scalar(name, value, step)
    writer.flush()
    self.run_dir.append_metrics(step, metrics)
    shown = ' '.join(f'{k.replace("eval/", "eval_")} {v:.4g}' for k, v in metrics.items())
    self.say(f'step {step}/{self.total_steps} {shown}')

  def say(self, message: str) -> None:
    """A line on stdout (main process only), above the progress bar."""
    if distributed.is_main_process():
      tqdm.write(message)
      sys.stdout.flush()


class Trainer(TrainStateStore):
  """Everything a run needs, built from the config; `run()` trains to the end. `evaluators` run
  in the loop (the teacher-forced held-out eval, `HeldoutLoss`, to begin with): add others
  (hrmtext.train adds the generation eval) before `run()`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    distributed.initialize()
    self.workdir = workdir
    self.run_dir = Run(workdir)
    self.mesh = make_mesh(config.mesh)
    sampled = SampledSet(pipeline.sampled_dir(config.data))
    # Every default filled in once, here (micro-batches and remat fitted to the devices): what
    # the run does, its config.json.
    self.program = build_program(
        config, self.mesh, vocab_size=sampled.metadata['tokenizer_info']['vocab_size'],
        epoch_tokens=sampled.metadata['total_length'], log=self.say)
    self.config = config = self.program.config
    tc, seq_len = config.train, config.data.seq_len
    self.global_rows = tc.global_batch_tokens // seq_len
    # The mesh spans all processes' devices: batch_shards already counts every process.
    batch_shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    check_batch_split(self.global_rows, tc.micro_batches, batch_shards)
    self.total_steps = tc.steps
    self.model_cfg = self.program.model_cfg
    self.mngr = self.run_dir.manager(max_to_keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
    # Where this run resumes (None: it starts): the newest step whose files are as saved.
    self.resume_step = checkpoint.latest_intact_step(self.mngr)
    # Batch i of the pipeline is global batch i whatever the process count, and a step takes
    # one: a resumed run (on any number of processes) continues from its step.
    data_index, data_count = sharding.process_data_shard(self.mesh)
    self.data = pipeline.make_train_iterator(
        config.data, rows_per_process=self.global_rows // data_count, seq_len=seq_len,
        process_index=data_index, process_count=data_count, seed=tc.seed,
        start=self.resume_step or 0)
    # Built now, so a broken held-out set fails before any training, not at the first eval.
    self._eval_batches = pipeline.make_eval_batches(config.data, rows=config.eval.rows,
                                                    seq_len=seq_len)
    self.evaluators: list[Evaluator] = [HeldoutLoss(self)]
    # Copied into the run as it starts; a resumed run's data must have been made with its copy.
    self.tokenizer = self._data_tokenizer(sampled.directory)
    self._signals = set()  # names of the stop signals this process got
    self.base_ref = None  # a LoRA run's reference to its base (hrmtext.run.Run.reference)
    if self.resume_step is not None:
      self._check_resume()
    elif config.init_from:
      self._check_init_from()  # user errors surface here, before any training starts
    elif self.program.lora:
      raise UserError('lora.rank > 0 trains adapters of the weights of another run: set '
                      'init_from')

  def _check_resume(self) -> None:
    """UserError unless the data was tokenized with the run's tokenizer (runs of older versions
    kept none) and the workdir's checkpoint is of this model."""
    if self.run_dir.has_tokenizer():
      if self.tokenizer is None:
        raise UserError(f'the data\'s tokenizer is not found: it cannot be checked against the '
                        f'run\'s ({self.run_dir.tokenizer_dir})')
      self.run_dir.check_tokenizer(self.tokenizer)
    self._check_resumed_model()

  def _data_tokenizer(self, sampled_dir: str) -> Tokenizer | None:
    """The tokenizer the data was made with; None, said in a note, when its model file is not
    found (that of a data set prepared elsewhere may lie elsewhere): the run keeps no copy."""
    try:
      return Tokenizer.load(sampled_dir)
    except FileNotFoundError as e:
      self.say(f'note: {e}: the run keeps no tokenizer (generate, score and evaluate will need '
               f'--tokenizer)')
      return None

  def _global_batch(self, local: dict) -> dict:
    micro = self.config.train.micro_batches
    out = {}
    for name, x in local.items():
      x = x.reshape(micro, -1, *x.shape[1:])
      shape = (micro, self.global_rows // micro) + x.shape[2:]
      out[name] = jax.make_array_from_process_local_data(self.program.batch_sharding, x, shape)
    return out

  def evaluate(self, params) -> dict:
    """Teacher-forced loss and accuracies on the held-out set, over all tasks and per task
    (every process holds all of it)."""
    put = lambda batch: {
        k: jax.make_array_from_callback(v.shape, self.program.row_sharding, lambda i, v=v: v[i])
        for k, v in batch.items()}
    return heldout_metrics(self.program.eval_step, params, self._eval_batches, put)

  def run(self) -> dict:
    with sharding.activate(self.mesh), stop_signals(self._signals):
      try:
        return self._run()
      finally:  # a save in flight completes, also when what followed it failed
        self.mngr.wait_until_finished()
        self.mngr.close()

  def _run(self) -> dict:
    config = self.config
    main = distributed.is_main_process()
    state, start = self._initial_state()
    writer = SummaryWriter(self.run_dir.tensorboard_dir) if main else None
    if main:
      self.run_dir.write_config(config)
      # The tokenizer's copy is taken as the run starts (or resumes an older run, which kept none).
      if self.tokenizer is not None and (self.resume_step is None or
                                         not self.run_dir.has_tokenizer()):
        self.run_dir.save_tokenizer(self.tokenizer)
      unreadable = self.run_dir.drop_metrics_after(start)
      if unreadable:
        self.say(f'{self.run_dir.metrics_file}: dropping {unreadable} unreadable line(s)')
    device_peak = peak_flops(jax.devices()[0].device_kind)
    tokens_per_step = self.global_rows * config.data.seq_len
    params_m = sum(x.size for x in jax.tree.leaves(state.weights())) / 1e6
    compute = self.program.compute
    if self.program.lora:
      size, frozen = lora_size(state), lora.count(state.base)
      self.say(f'LoRA: {size["params"]:,} trainable parameters ({size["params"] / frozen:.2%} of '
               f'the {frozen:,} frozen ones), checkpoints of {size["bytes"] / 2**20:.2f} MiB '
               f'(adapters, EMA, moments)')
    self.say(f'model {self.model_cfg.architecture}: {params_m:.2f}M params; {self.total_steps} '
             f'steps of {tokens_per_step} tokens; mesh {dict(self.mesh.shape)}; attention '
             f'{compute.attention}, {compute.dtype}, remat {compute.remat_policy}')
    profile = ProfileWindow(config.profile, self._profile_dir())
    last, waits = {}, Waits()
    t0, logged_step = time.time(), start
    saved_time, minutes = time.monotonic(), config.checkpoint.every_minutes
    bar = tqdm(total=self.total_steps, initial=start, unit='step', disable=not main, leave=False)
    with distributed.StepAgreement(first_step=start + 1) as agreement:
      for step in range(start + 1, self.total_steps + 1):  # the step each update is logged as
        profile.before(step)
        with waits.timing('data'):
          batch = self._global_batch(next(self.data))
        horizon = self.program.horizon(step - 1)
        state, metrics = self.program.train_step(horizon)(state, batch)
        profile.after(step, state)
        # Decided by all processes together, at one step: a signal to any of them stops all; a
        # time-based checkpoint is due when any process's clock says so.
        agreed = agreement.at_step(
            step, last=step == self.total_steps,
            save=minutes > 0 and time.monotonic() - saved_time >= 60 * minutes,
            **dict.fromkeys(self._signals, True))
        stop = sorted(agreed - {'save'})
        bar.update()
        if step % config.log_every_steps == 0 or step == self.total_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed, t0 = time.time() - t0, time.time()
          tokens_per_s = tokens_per_step * (step - logged_step) / elapsed
          flops = train_flops_per_token(self.model_cfg, horizon, config.data.seq_len)
          metrics.update(lr=float(self.program.schedule(step - 1)), bp_steps=horizon.differentiable,
                         tokens_per_s=tokens_per_s,
                         **waits.report(elapsed, step - logged_step))
          logged_step = step
          if device_peak:
            metrics['mfu'] = flops * tokens_per_s / (device_peak * jax.device_count())
          self._log(writer, step, metrics)
          bar.set_postfix(loss=f'{metrics["loss"]:.3f}', refresh=False)
          last.update(metrics)
        # Saved before the eval of the same step: a failing eval loses no checkpoint.
        if (step % config.checkpoint.every_steps == 0 or step == self.total_steps or agreed):
          with waits.timing('checkpoint'):
            self.save(state, step)
          saved_time = time.monotonic()
        due = [e for e in self.evaluators if step % e.every_steps == 0 or step == self.total_steps]
        if due and not stop:
          with waits.timing('eval'):
            eval_metrics = {}
            for evaluator in due:
              eval_metrics.update(evaluator(step, state))
          self._log(writer, step, eval_metrics)
          last.update(eval_metrics)
        if stop:  # every process says so: in a multi-host log, each host's own line
          tqdm.write(f'{"/".join(stop)}: saved step {step}, exiting')
          sys.stdout.flush()
          break
    profile.close(state)
    bar.close()
    if writer:
      writer.close()
    return last

  def _profile_dir(self) -> str:
    """TensorBoard's log dir (the profile plugin reads <dir>/plugins/profile); one per process
    when several would write the same <host>.xplane.pb."""
    tb = self.run_dir.tensorboard_dir
    return tb if jax.process_count() == 1 else os.path.join(tb, f'process_{jax.process_index()}')
