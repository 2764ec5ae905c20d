"""Real sizes: experiment configs build the models they name, every model field is a flag, the
train step compiles on abstract inputs, and the memory savings for long rows and large
vocabularies (chunked cross-entropy, query-blocked attention) compute the same values."""
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from hrmtext.model import ComputeConfig, ModelConfig, attention, build_model
from hrmtext.model.loss import IGNORE_LABEL
from hrmtext.training.config import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ('B', 'L', 'XL', 'XXL', 'XXL_wide')
VOCAB = 65_536


def load_config(spec: str, *overrides: str):
  """The experiment config `spec` (`path[:arg]`) after `--config.x=y` overrides, as entry points
  parse it."""
  argv = ['prog', f'--config={os.path.join(REPO, spec)}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def param_count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(lambda: nn.unbox(build_model(cfg).init(jax.random.key(0))))
  return sum(x.size for x in jax.tree.leaves(shapes))


def non_embedding_count(cfg: ModelConfig) -> int:
  return param_count(cfg) - 2 * cfg.vocab_size * cfg.hidden_size  # embedding + LM head


def transformers_param_count(cfg: ModelConfig) -> int:
  """Parameters of transformers' HrmTextForCausalLM of the same sizes (meta device: no weights)."""
  torch = pytest.importorskip('torch', reason='the transformers oracle needs torch')
  transformers = pytest.importorskip('transformers')
  hf_config = transformers.HrmTextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_size,
      num_hidden_layers=cfg.layers_per_stack, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_heads, head_dim=cfg.head_dim, H_cycles=cfg.H_cycles,
      L_cycles=cfg.L_cycles)
  with torch.device('meta'):
    model = transformers.HrmTextForCausalLM(hf_config)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('size', SIZES)
def test_size_configs_match_transformers_parameter_count(size):
  cfg = model_config(load_config(f'experiments/hrm.py:{size}'), VOCAB)
  assert cfg.architecture == 'hrm' and cfg.vocab_size == VOCAB
  assert param_count(cfg) == transformers_param_count(cfg)


def test_xl_is_the_published_size():
  cfg = model_config(load_config('experiments/hrm.py:XL'), VOCAB)
  assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.layers_per_stack, cfg.mlp_size) == (
      1536, 12, 128, 16, 4096)
  assert param_count(cfg) == 1_182_795_264


def test_default_config_is_the_tiny_model():
  cfg = model_config(load_config('experiments/tiny_cpu.py'), 1024)
  assert param_count(cfg) == transformers_param_count(cfg)
  assert (cfg.hidden_size, cfg.layers_per_stack, cfg.vocab_size) == (128, 1, 1024)


@pytest.mark.parametrize('size', SIZES)
def test_transformer_baseline_has_hrm_non_embedding_size(size):
  hrm = model_config(load_config(f'experiments/hrm.py:{size}'), VOCAB)
  transformer = model_config(
      load_config(f'experiments/hrm.py:{size}', '--config.model.architecture=transformer'), VOCAB)
  assert transformer.architecture == 'transformer'
  assert transformer.layers_per_stack == 2 * hrm.layers_per_stack
  assert non_embedding_count(transformer) == non_embedding_count(hrm) - hrm.hidden_size  # z_L_init


# A valid non-default value per ModelConfig field, written as on the command line.
FLAG_VALUES = dict(
    architecture='transformer', vocab_size=1000, hidden_size=256, num_heads=4, head_dim=32,
    intermediate_size=384, expansion=3.0, layers_per_stack=3, H_cycles=3, L_cycles=2,
    norm_type='post', final_norm='H', attn_type='causal', rope_theta=500000.0, rms_norm_eps=1e-5,
    embedding_scale=7.5)
# The same per ComputeConfig field.
COMPUTE_FLAG_VALUES = dict(dtype='float16', remat_policy='dots_saveable', attention='splash',
                           unroll_loops=True)


def test_every_compute_field_is_a_flag_that_reaches_the_compute_config():
  fields = {f.name for f in dataclasses.fields(ComputeConfig)}
  assert fields == set(COMPUTE_FLAG_VALUES), 'give new ComputeConfig fields a test value'
  reference = ComputeConfig.from_dict(load_config('experiments/hrm.py:XL').compute)
  assert reference.dtype == 'bfloat16'  # the experiment's
  for name, value in COMPUTE_FLAG_VALUES.items():
    flag = f'--config.compute.{name}={value}'
    got = ComputeConfig.from_dict(load_config('experiments/hrm.py:XL', flag).compute)
    assert got == dataclasses.replace(reference, **{name: value}), flag


def test_every_model_field_is_a_flag_that_reaches_the_model():
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  assert fields == set(FLAG_VALUES), 'give new ModelConfig fields a test value'
  for name, value in FLAG_VALUES.items():
    flag = f'--config.model.{name}={value}'
    cfg = model_config(load_config('experiments/hrm.py:XL', flag), VOCAB)
    # Only that field moved: the XL preset and the experiment's settings keep the rest.
    reference = model_config(load_config('experiments/hrm.py:XL'), VOCAB)
    expected = dataclasses.replace(reference, **{name: value})
    if name == 'architecture':  # the Transformer preset stacks all of XL's layers
      expected = dataclasses.replace(expected, layers_per_stack=32)
    if name == 'vocab_size':  # padded to the experiment's vocab_multiple, 256
      expected = dataclasses.replace(expected, vocab_size=1024)
    assert cfg == expected, flag


def test_explicit_sizes_override_the_preset():
  cfg = model_config(load_config('experiments/hrm.py:L', '--config.model.layers_per_stack=2',
                                 '--config.model.expansion=3'), VOCAB)
  assert (cfg.hidden_size, cfg.num_heads, cfg.layers_per_stack) == (1280, 10, 2)
  assert cfg.mlp_size == 2560  # round_up(round(3 * 1280 * 2/3), 256)


def run(module, *args, devices=1):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO,
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.run([sys.executable, '-m', module, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('args', [['--config.model.bogus=1'], ['--config.train.lrr=1'],
                                  ['--config.model.hidden_size=abc']])
def test_bad_config_flag_is_a_one_line_error(args, tmp_path):
  result = run('hrmtext.train', f'--workdir={tmp_path}', *args)
  assert result.returncode in (1, 2), result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr


def compile_only(*args, devices=1) -> dict:
  result = run('hrmtext.bench', '--compile_only', '--json', *args, devices=devices)
  assert result.returncode == 0, result.stdout + result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compile_only_reports_the_configured_step_on_fake_devices():
  report = compile_only('--config.model.expansion=3', '--config.mesh.fsdp=2',
                        '--config.train.micro_batches=2', '--vocab=1000', devices=2)
  cfg = model_config(load_config('experiments/tiny_cpu.py', '--config.model.expansion=3'), 1000)
  assert report['params'] == param_count(cfg)  # the flag reached the compiled model
  assert (report['devices'], report['mesh'], report['micro_batches'], report['bp_steps']) == (
      2, '1x2x1', 2, 5)
  memory = report['per_device_memory_bytes']
  assert memory['total'] == memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
  # fp32 params, EMA and two moments, half of them on each device (the state is fsdp-sharded).
  assert 4 * 4 * report['params'] / 2 <= memory['argument'] < 4 * 4 * report['params'] * 0.6
  # Both devices' work: the analytic count, plus the forward of the 5 differentiable applications
  # recomputed in the backward pass (remat), plus dense attention: 18 -> ~23 stack passes.
  assert 1.1 < report['compiled_to_analytic_flops'] < 1.6, report


@pytest.mark.slow
def test_compiled_flops_match_the_analytic_count():
  """Without remat the compiled step's matmul FLOPs (loops counted by trip count) are the analytic
  count except attention, which XLA computes densely where the count takes the causal half."""
  report = compile_only('--config.compute.remat_policy=none', '--config.model.layers_per_stack=2',
                        '--config.data.seq_len=256', '--vocab=1024', '--rows=4')
  cfg = model_config(load_config('experiments/tiny_cpu.py', '--config.model.layers_per_stack=2'),
                     1024)
  # Per token, per layer and stack application: QK^T and PV are 2 * 2 * seq * heads * head_dim
  # dense, the analytic count takes half; 5 differentiable of 8 applications: 8 + 2 * 5 passes.
  dense_extra = 2 * 256 * cfg.num_heads * cfg.head_dim * cfg.layers_per_stack * (8 + 2 * 5)
  expected = report['flops_per_token'] + dense_extra
  assert report['compiled_flops_per_token'] == pytest.approx(expected, rel=0.02)


@pytest.mark.slow
def test_chunked_cross_entropy_saves_the_logits_memory():
  args = ('--config.data.seq_len=512', '--rows=2', '--vocab=16384')
  full = compile_only(*args, '--config.train.loss_chunk_len=0')
  chunked = compile_only(*args, '--config.train.loss_chunk_len=64')
  logits_bytes = 2 * 512 * 16384 * 4
  saved = full['per_device_memory_bytes']['temp'] - chunked['per_device_memory_bytes']['temp']
  assert saved >= logits_bytes, (saved, logits_bytes)


@pytest.mark.slow
@pytest.mark.parametrize('chunk', [1, 16])  # 16: the last chunk is padding past the row's 37
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
  # The loss sees only final hidden states: a one-layer Transformer compiles fastest.
  cfg = ModelConfig(architecture='transformer', vocab_size=300, hidden_size=32, num_heads=2,
                    head_dim=16, layers_per_stack=1)
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  rows, length = 3, 37
  segment_ids = np.repeat(np.array([[1] * 20 + [2] * 12 + [0] * 5]), rows, 0)
  is_instruction = np.tile(np.arange(length) % 20 < 6, (rows, 1))
  labels = np.where(is_instruction | (segment_ids == 0), IGNORE_LABEL,
                    rng.integers(0, 300, (rows, length)))
  batch = jax.tree.map(jnp.asarray, dict(
      inputs=rng.integers(1, 300, (rows, length)), labels=labels, segment_ids=segment_ids,
      positions=np.tile(np.arange(length) % 20, (rows, 1)), is_instruction=is_instruction))

  def loss_and_grads(chunk_len):
    loss_sums = jax.jit(lambda p: model.loss_sums(p, batch, loss_chunk_len=chunk_len))
    grads = jax.jit(jax.grad(lambda p: loss_sums(p)['loss_sum']))(params)
    return loss_sums(params), grads

  (plain, plain_grads), (chunked, chunked_grads) = loss_and_grads(0), loss_and_grads(chunk)
  assert {k: int(v) for k, v in plain.items() if k != 'loss_sum'} == {
      k: int(v) for k, v in chunked.items() if k != 'loss_sum'}
  np.testing.assert_allclose(chunked['loss_sum'], plain['loss_sum'], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_query_blocked_attention_equals_dense():
  rng = np.random.default_rng(0)
  rows, length, heads, head_dim = 2, 3 * attention.QUERY_BLOCK, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(rows, length, heads, head_dim)), jnp.float32)
             for _ in range(3))
  segment_ids = np.ones((rows, length), np.int32)
  segment_ids[:, 700:] = 2  # an example across the block boundary at 1024
  segment_ids[:, 1500:] = 0  # padding
  is_instruction = np.zeros((rows, length), bool)
  is_instruction[:, :300] = is_instruction[:, 700:1100] = True
  mask = attention.AttentionMask.packed(jnp.asarray(segment_ids), jnp.asarray(is_instruction))

  def value_and_grads(fn):
    return jax.jit(jax.value_and_grad(lambda *qkv: jnp.sum(fn(*qkv, mask)**2),
                                      argnums=(0, 1, 2)))(q, k, v)

  (dense, dense_grads), (blocked, blocked_grads) = (value_and_grads(attention.dense_attention),
                                                    value_and_grads(attention.xla_attention))
  np.testing.assert_allclose(blocked, dense, rtol=1e-6)
  for got, want in zip(blocked_grads, dense_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_weight_differences_compare_resolved_values():
  imported = ModelConfig(hidden_size=64, num_heads=2, head_dim=32, embedding_scale=8.0,
                         intermediate_size=256)
  trained_here = ModelConfig(hidden_size=64, num_heads=2, head_dim=32)
  assert imported.weight_differences(trained_here) == {}  # the same weights, spelled otherwise
  wider = dataclasses.replace(trained_here, hidden_size=128, embedding_scale=8.0)
  assert trained_here.weight_differences(wider) == {'hidden_size': (64, 128),
                                                    'intermediate_size': (256, 512)}
  assert imported.weight_differences(dataclasses.replace(imported, embedding_scale=1.0)) == {
      'embedding_scale': (8.0, 1.0)}
