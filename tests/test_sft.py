"""A tiny pretrain run (in process) follows the optimizer oracle for its first 3 steps; fine-tuning
from it: init_mode continue restores the source's
params, EMA, moments and per-leaf counts bit for bit and then applies the new run's schedule and
hyper-parameters; init_mode ema starts from the EMA weights with a fresh optimizer; the SFT run
resumes exactly; the experiments/sft.py configs carry the reference recipe.

Helper for other test files: tiny_config(data_dir, **train) -> an in-process tiny config.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_train import REPO, assert_trees_equal, make_fixture_data

SEQ_LEN, ROWS = 64, 4
PRETRAIN_STEPS = 4


def load_config(spec: str, *overrides: str):
  """The experiment config `spec` (`path[:arg]`) after `--config.x=y` overrides, as the training
  entry point parses it."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['prog', f'--config={os.path.join(REPO, spec)}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)  # defines --config.*
  values(argv)
  return values.config


def tiny_config(data_dir, horizon=None, **train):
  """A ~0.1M-parameter HRM (2 H x 2 L cycles) on the fixture data; `train` overrides c.train,
  `horizon` c.train.horizon."""
  from hrmtext.training.config import base_config
  c = base_config()
  c.model.update(hidden_size=32, num_heads=2, head_dim=16, layers_per_stack=1, H_cycles=2,
                 L_cycles=2, vocab_multiple=64)
  c.data.update(dir=str(data_dir), seq_len=SEQ_LEN)
  c.train.update(global_batch_tokens=ROWS * SEQ_LEN, **train)
  c.train.horizon.update(horizon or {})
  c.checkpoint.update(every_steps=1, keep=None, async_save=False)
  c.log_every_steps = 1
  return c


def restore_all(workdir, step=None) -> dict:
  """params, ema and opt_state of a checkpoint, as saved (NumPy)."""
  from hrmtext.run import Run
  mngr = Run(str(workdir)).manager(create=False)
  step = mngr.latest_step() if step is None else step
  items = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(), ema=ocp.args.StandardRestore(),
      opt_state=ocp.args.StandardRestore()))
  mngr.close()
  return jax.tree.map(np.asarray, {k: items[k] for k in ('params', 'ema', 'opt_state')})


def as_saved(state) -> dict:
  """A TrainState as restore_all gives a checkpoint (opt_state as a dict)."""
  opt = state.opt_state
  return jax.tree.map(np.asarray, dict(params=state.params, ema=state.ema, opt_state=dict(
      step=opt.step, count=opt.count, mu=opt.mu, nu=opt.nu)))


@pytest.fixture(scope='module')
def pretrain(tmp_path_factory):
  """(data dir, workdir) of PRETRAIN_STEPS steps whose credit horizon grows from 2 to 3, so the
  embedding (skipped at bp_steps 2) has a smaller update count than the other leaves."""
  from hrmtext.training.loop import Trainer
  root = tmp_path_factory.mktemp('sft')
  make_fixture_data(root / 'data')
  Trainer(pretrain_config(root / 'data'), str(root / 'pretrain')).run()
  return root / 'data', root / 'pretrain'


def pretrain_config(data_dir):
  """bp_steps 2, 2, 3, 3; lr warms up over 2 steps, then cosine to half; saved every step."""
  return tiny_config(data_dir, steps=PRETRAIN_STEPS, lr=1e-2, warmup_steps=2, lr_min_ratio=0.5,
                     ema_decay=0.5, horizon=dict(bp_min=2, bp_max=3, warmup_ratio=0.5))


def test_pretrain_run_follows_the_oracle_for_its_first_3_steps(pretrain):
  """The training loop's first 3 updates (the embedding skipped at bp_steps 2, trained at 3;
  z_L_init never) change params, EMA and moments as the PyTorch oracle of the reference
  optimizer says, on the gradients of the same batches."""
  torch = pytest.importorskip('torch', reason='the oracle is written in PyTorch (not installed)')
  import functools
  import math
  import jax.numpy as jnp
  import optax
  from hrmtext.data import pipeline
  from hrmtext.model import bp_steps_horizon, build_model, loss_and_metrics
  from hrmtext.run import Run
  from hrmtext.training.step import grad_mask, init_state
  from tests.test_optimizer import torch_oracle
  data_dir, run = pretrain
  c = pretrain_config(data_dir)
  t = c.train

  def lr_of_step(step):  # the reference's update_lr at its 1-based step
    n = step + 1
    if n < t.warmup_steps:
      return t.lr * n / t.warmup_steps
    progress = (n - t.warmup_steps) / (t.steps - t.warmup_steps)
    return t.lr * (t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

  cfg, _, _ = Run(str(run)).load_weights(use_ema=False, step=1)
  model = build_model(cfg)
  params = jax.jit(lambda key: init_state(model, optax.identity(), key).params)(
      jax.random.key(t.seed))  # the run's initial params
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(path) for path, _ in paths]
  flat = lambda tree: dict(zip(names, (np.asarray(x) for x in jax.tree.leaves(tree))))
  batches = pipeline.make_train_iterator(c.data, rows_per_process=ROWS, seq_len=SEQ_LEN,
                                         process_index=0, process_count=1, seed=t.seed)

  @functools.partial(jax.jit, static_argnums=2)
  def gradients(p, batch, bp):  # as the train step: the grad of the summed loss / tokens
    def loss_sum(p):
      sums = loss_and_metrics(model.logits(p, batch, bp_steps_horizon(cfg, bp)), batch['labels'],
                              batch['segment_ids'])
      return sums['loss_sum'], sums['tokens']
    grads, tokens = jax.grad(loss_sum, has_aux=True)(p)
    return jax.tree.map(lambda g: g / tokens, grads)

  # Each update starts from the run's own params and EMA before it (errors do not compound) and
  # the oracle's moments and counts, which must equal the run's after it.
  before = dict(params=flat(params), ema=flat(params), count=None, mu=None, nu=None)
  skipped = []
  for step, bp in enumerate([2, 2, 3]):
    current = jax.tree.unflatten(treedef, [jnp.asarray(v) for v in before['params'].values()])
    grads = flat(gradients(current, {k: jnp.asarray(v) for k, v in next(batches).items()}, bp))
    mask = flat(grad_mask(model, bp_steps_horizon(cfg, bp), current))
    skipped.append(sorted(k for k, keep in mask.items() if not keep))
    oracle = dict(zip(('params', 'ema', 'count', 'mu', 'nu'), torch_oracle(
        torch, before['params'], [grads], [mask], lambda _, s=step: lr_of_step(s), b1=t.b1,
        b2=t.b2, wd=t.weight_decay, ema_decay=t.ema_decay, count=before['count'],
        mu=before['mu'], nu=before['nu'], ema=before['ema'])))
    saved = restore_all(run, step + 1)
    opt = saved.pop('opt_state')
    saved = dict(params=flat(saved['params']), ema=flat(saved['ema']), mu=flat(opt['mu']),
                 nu=flat(opt['nu']), count={k: int(v) for k, v in flat(opt['count']).items()})
    assert saved['count'] == oracle['count'], step + 1
    for item in ('params', 'ema', 'mu', 'nu'):
      for name, value in saved[item].items():
        np.testing.assert_allclose(value, oracle[item][name], rtol=1e-6, atol=1e-7,
                                   err_msg=f'step {step + 1} {item} {name}')
    before = saved
  assert any('embed' in k for k in skipped[1]) and not any('embed' in k for k in skipped[2])
  assert all(any('z_L_init' in k for k in s) for s in skipped)
  assert before['count'][[k for k in names if 'embed' in k][0]] == 1


# The fine-tuning run's hyper-parameters, all different from the pretrain run's.
SFT = dict(steps=3, lr=1e-3, warmup_steps=0, lr_min_ratio=0.1, b1=0.8, b2=0.9, weight_decay=0.2,
           ema_decay=0.7, horizon=dict(bp_min=3, bp_max=3, warmup_ratio=0.0))


def sft_config(data_dir, source, mode):
  c = tiny_config(data_dir, **SFT)
  c.init_from, c.init_mode = str(source), mode
  return c


@pytest.mark.slow  # ~30 s of CPU: three compiled runs (pretrain, SFT, its resume)
def test_continue_restores_the_source_state_and_applies_the_new_hyper_parameters(pretrain,
                                                                                   tmp_path):
  from hrmtext.training.loop import Trainer
  data_dir, source = pretrain
  c = sft_config(data_dir, source, 'continue')
  trainer = Trainer(c, str(tmp_path / 'sft'))
  state, start = trainer._initial_state()
  saved = restore_all(source)
  assert start == 0 and int(state.step) == 0 and int(saved['opt_state']['step']) == PRETRAIN_STEPS
  # Bit for bit: params, EMA, moments and per-leaf counts; only the schedule's clock restarts.
  initial = as_saved(state)
  assert int(initial['opt_state']['step']) == 0
  initial['opt_state']['step'] = saved['opt_state']['step']
  assert_trees_equal(initial, saved)
  counts = sorted({int(c) for c in jax.tree.leaves(saved['opt_state']['count'])})
  assert counts == [0, PRETRAIN_STEPS - 2, PRETRAIN_STEPS]  # z_L_init, embedding, the rest
  del trainer

  Trainer(c, str(tmp_path / 'sft')).run()
  after = restore_all(tmp_path / 'sft', step=1)
  opt0, opt1 = saved['opt_state'], after['opt_state']
  assert int(opt1['step']) == 1
  # Every leaf that trains took one more update on top of the source's count.
  assert_trees_equal(opt1['count'], jax.tree.map(lambda n: n + (n > 0), opt0['count']))

  def check(b1, b2, wd, ema_decay, lr):
    """The first SFT update as the reference formula gives it from the source's state."""
    for path, p1 in jax.tree_util.tree_flatten_with_path(after['params'])[0]:
      p0, e0, e1 = _at(saved['params'], path), _at(saved['ema'], path), _at(after['ema'], path)
      mu0, nu0, mu1, nu1 = (_at(t, path) for t in (opt0['mu'], opt0['nu'], opt1['mu'], opt1['nu']))
      t = int(_at(opt1['count'], path))
      if t == 0:  # never trained (z_L_init): untouched
        np.testing.assert_array_equal(p1, p0)
        continue
      grad = (mu1 - b1 * mu0) / (1 - b1)  # the gradient the moments took in
      np.testing.assert_allclose(nu1, b2 * nu0 + (1 - b2) * grad**2, rtol=1e-3, atol=1e-9)
      step = lr / (1 - b1**t) * np.arctan2(mu1, np.sqrt(nu1) / np.sqrt(1 - b2**t))
      np.testing.assert_allclose(p1, p0 * (1 - lr * wd) - step, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(e1, e0 + (1 - ema_decay) * (p1 - e0), rtol=1e-6, atol=1e-7)

  from hrmtext.training import schedules
  sft_lr = float(schedules.warmup_cosine(SFT['lr'], 0, SFT['steps'], SFT['lr_min_ratio'])(0))
  check(SFT['b1'], SFT['b2'], SFT['weight_decay'], SFT['ema_decay'], sft_lr)
  with pytest.raises(AssertionError):  # the pretrain run's betas do not explain the update
    check(0.9, 0.95, SFT['weight_decay'], SFT['ema_decay'], sft_lr)

  # Resume of the SFT run itself is exact: drop its last checkpoint and train again.
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'sft', resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(SFT['steps']))
  Trainer(c, str(resumed)).run()
  assert_trees_equal(restore_all(resumed), restore_all(tmp_path / 'sft'))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)


def test_ema_mode_starts_from_the_ema_weights_with_a_fresh_optimizer(pretrain, tmp_path):
  from hrmtext.training.loop import Trainer
  data_dir, source = pretrain
  state, start = Trainer(sft_config(data_dir, source, 'ema'), str(tmp_path / 'sft'))._initial_state()
  saved, initial = restore_all(source), as_saved(state)
  assert start == 0
  assert_trees_equal(initial['params'], saved['ema'])
  assert_trees_equal(initial['ema'], saved['ema'])
  assert all(int(n) == 0 for n in jax.tree.leaves(initial['opt_state']['count']))
  assert all(not x.any() for x in jax.tree.leaves((initial['opt_state']['mu'],
                                                   initial['opt_state']['nu'])))


def test_init_mode_errors(pretrain, tmp_path):
  from hrmtext.training.loop import Trainer
  data_dir, source = pretrain
  with pytest.raises(ValueError, match='init_mode .resume. is not one of continue, ema, params'):
    Trainer(sft_config(data_dir, source, 'resume'), str(tmp_path / 'a'))
  weights_only = tmp_path / 'weights_only'  # as `convert` imports a HF checkpoint
  from hrmtext import checkpoint
  from hrmtext.run import Run
  cfg, params, meta = Run(str(source)).load_weights()
  mngr = Run(str(weights_only)).manager(async_save=False)
  checkpoint.save(mngr, 0, meta={'model': cfg.to_dict()}, params=params)
  mngr.close()
  with pytest.raises(ValueError, match='init_mode continue needs .* no ema or opt_state'):
    Trainer(sft_config(data_dir, weights_only, 'continue'), str(tmp_path / 'b'))


@pytest.mark.parametrize('size', ['B', 'L', 'XL', 'XXL'])
def test_sized_sft_configs_carry_the_reference_recipe(size):
  c = load_config(f'experiments/sft.py:{size}')
  pretrain = load_config(f'experiments/hrm.py:{size}')
  assert c.model.to_dict() == pretrain.model.to_dict() and c.data.seq_len == pretrain.data.seq_len
  t = c.train
  assert (t.lr, t.warmup_steps, t.lr_min_ratio, t.global_batch_tokens, t.epochs, t.steps) == (
      3e-5, 0, 0.1, 32_768, 5, 0)
  assert (t.weight_decay, t.b1, t.b2, t.ema_decay, t.horizon.bp_max, t.horizon.warmup_ratio) == (
      0.1, 0.9, 0.95, 0.999, 5, 0.0)
  assert c.init_mode == 'continue' and c.init_from == f'runs/{size.lower()}'
  from hrmtext.training import schedules
  assert schedules.bp_steps(0, 1000, t.horizon.bp_min, t.horizon.bp_max,
                            t.horizon.warmup_ratio) == 5


def test_tiny_sft_config_continues_the_tiny_run():
  c = load_config('experiments/sft.py', '--config.init_mode=ema')
  tiny = load_config('experiments/tiny_cpu.py')
  assert c.model.to_dict() == tiny.model.to_dict() and c.init_from == 'runs/tiny'
  assert c.init_mode == 'ema' and load_config('experiments/sft.py').init_mode == 'continue'
