"""Attention kernels compute the XLA path's function: splash (Pallas interpreter on CPU), cuDNN.

cuDNN runs only on a GPU (tests skipped otherwise); on CPU its two-pass decomposition is checked
against a stand-in for cuDNN's packed layout that, like cuDNN, leaves tokens outside every run as
garbage (NaN) in the output and the gradients. The multi-device splash check runs once in a
subprocess (this file as a script with 4 CPU devices), so the pytest process keeps its one device.
"""
import contextlib
import dataclasses
import os
import subprocess
import sys
import unittest.mock
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrmtext.data import packing
from hrmtext.data.layout import Index
from hrmtext.data.packing import IGNORE_LABEL
from hrmtext.model import AttentionMask, ComputeConfig, ModelConfig, build_model, loss_and_metrics
from hrmtext.model.attention import attention
from hrmtext.model.kernels import PackedRuns, cudnn, splash
from hrmtext.parallel import sharding
from hrmtext.parallel.mesh import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
on_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')


def packed_rows(batch, length, seed=0, max_segments=None):
  """(segment_ids, is_instruction, runs) of `batch` rows packed by the data pipeline's packer
  (at most `max_segments` examples a row; default: no bound) from examples of random lengths and
  instruction shares: one of the whole row, one whose response is a single token (the reference's
  FlashAttention-3 crash case), the rest short enough to leave padding in some rows."""
  rng = np.random.default_rng(seed)
  count = 4 * batch * (max_segments or 8)
  length_of = np.concatenate([[length, 5], rng.integers(2, length // 3, count)])
  inst_len = np.maximum(1, (length_of * rng.uniform(0.1, 0.9, len(length_of))).astype(int))
  inst_len = np.minimum(inst_len, length_of)
  inst_len[1] = length_of[1]  # the whole example is instruction: a 1-token response
  index = Index.from_lengths(inst_len, length_of - inst_len + 1)
  lengths = packing.packed_lengths(index, length)
  plan = packing.pack(lengths, length, window_rows=batch, max_segments=max_segments or length)
  rows = plan.rows(range(batch))
  tokens = np.ones(int(index.resp_start[-1] + index.resp_len[-1]), np.int32)
  packed = packing.pack_rows(tokens, index, lengths, rows, length, max_segments=max_segments)
  return packed['segment_ids'], packed['is_instruction'].astype(bool), PackedRuns.from_batch(
      jax.tree.map(jnp.asarray, packed))


def random_qkv(shape, dtype=jnp.float32, seed=0):
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key in jax.random.split(jax.random.key(seed), 3))


def output_and_grads(attend, q, k, v, cotangent):
  """attend(q, k, v) and the gradients of <attend(q, k, v), cotangent> wrt q, k, v."""
  out, vjp = jax.vjp(attend, q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def assert_close(got, want, tolerance):
  """Each array's largest error within `tolerance` times its largest value."""
  for g, w in zip(got, want):
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0,
                               atol=tolerance * np.abs(w).max())


@jax.default_matmul_precision('float32')  # no TF32 on GPUs: float32 results exact to ~1e-6
def check_against_xla(attend, shape, dtype, tolerance, seed=0, max_segments=None,
                      with_runs=False):
  """`attend` (with the packer's runs in the mask, or without) against XLA in float32."""
  segment_ids, is_instruction, runs = packed_rows(shape[0], shape[1], seed, max_segments)
  mask = AttentionMask.packed(jnp.asarray(segment_ids), jnp.asarray(is_instruction),
                              runs if with_runs else None)
  q, k, v = random_qkv(shape, dtype, seed)
  cotangent = jax.random.normal(jax.random.key(seed + 1), shape)
  want = jax.jit(output_and_grads, static_argnums=0)(
      lambda *qkv: attention(*qkv, mask, 'xla'), *(x.astype(jnp.float32) for x in (q, k, v)),
      cotangent)
  got = jax.jit(output_and_grads, static_argnums=0)(lambda *qkv: attend(*qkv, mask), q, k, v,
                                                    cotangent)
  assert_close(got, want, tolerance)


# ---- splash -----------------------------------------------------------------------------------

@pytest.mark.parametrize('length, block, dtype, tolerance', [
    (256, 128, jnp.float32, 1e-5),  # 2x2 blocks: empty ones skipped, full and partial ones
    (200, splash.BLOCK_SIZE, jnp.float32, 1e-5),  # rows padded up to the block
    (256, 128, jnp.bfloat16, 2e-2),
])
def test_splash_matches_xla(length, block, dtype, tolerance):
  attend = lambda q, k, v, mask: splash.splash_attention(q, k, v, mask, block_size=block)
  check_against_xla(attend, (3, length, 2, 128), dtype, tolerance)


def test_splash_on_4_devices():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert 'PASS' in result.stdout, result.stdout + result.stderr


def splash_on_4_devices():
  """Rows over ('data', 'fsdp') = 2, heads over 'tensor' = 2."""
  assert jax.device_count() == 4
  mesh = make_mesh(SimpleNamespace(data=1, fsdp=2, tensor=2))
  with sharding.activate(mesh):
    check_against_xla(lambda *args: attention(*args, 'splash'), (4, 128, 4, 64), jnp.float32, 1e-5)
  print('PASS')


def model_loss_and_grads(cfg, compute, params, batch):
  model = build_model(cfg, compute)

  def loss(params):
    sums = loss_and_metrics(model.logits(params, batch), batch['labels'], batch['segment_ids'])
    return sums['loss_sum'] / sums['tokens']

  return jax.jit(jax.value_and_grad(loss))(params)


def tiny_batch(batch, length, vocab):
  segment_ids, is_instruction, _ = packed_rows(batch, length)
  rng = np.random.default_rng(0)
  positions = np.zeros_like(segment_ids)
  for row in range(batch):
    for segment in np.unique(segment_ids[row]):
      where = segment_ids[row] == segment
      positions[row, where] = np.arange(where.sum())
  labels = np.where(is_instruction | (segment_ids == 0), IGNORE_LABEL,
                    rng.integers(0, vocab, (batch, length)))
  return {k: jnp.asarray(v, jnp.int32) for k, v in dict(
      inputs=rng.integers(1, vocab, (batch, length)) * (segment_ids > 0), labels=labels,
      positions=positions, segment_ids=segment_ids, is_instruction=is_instruction).items()}


@jax.default_matmul_precision('float32')
def check_model_against_xla(attention_impl, dtype, tolerance):
  cfg = ModelConfig(architecture='transformer', vocab_size=64, hidden_size=64, num_heads=2,
                    head_dim=32, layers_per_stack=1)
  compute = ComputeConfig(dtype=dtype, attention=attention_impl)
  params = nn.unbox(build_model(cfg, compute).init(jax.random.key(0)))  # init traces xla
  batch = tiny_batch(2, 128, cfg.vocab_size)
  want = model_loss_and_grads(cfg, dataclasses.replace(compute, attention='xla'), params, batch)
  got = model_loss_and_grads(cfg, compute, params, batch)
  assert abs(float(got[0]) - float(want[0])) <= tolerance * abs(float(want[0]))
  assert_close(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), tolerance)


def test_splash_model_matches_xla():
  """Inside the model: init, scanned and rematerialised layers, backward."""
  check_model_against_xla('splash', 'float32', 1e-4)


# ---- cuDNN on CPU: the two-pass decomposition against a stand-in for the packed layout --------

def packed_layout_stand_in(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale,
                           mask_type, qkv_layout):
  """cuDNN's packed layout contract: each run [offset, offset + seqlen) attends within itself
  (causally for PADDING_CAUSAL); tokens outside every run get NaN outputs and NaN gradients."""
  del kv_seqlen, kv_offsets, qkv_layout  # the same as the query side here
  length = q.shape[1]
  token = jnp.arange(length)
  starts, ends = q_offsets[:, :-1, None], (q_offsets[:, :-1] + q_seqlen)[:, :, None]
  in_run = (token >= starts) & (token < ends) & (q_seqlen[:, :, None] > 0)  # [batch, runs, len]
  run = jnp.where(in_run.any(1), jnp.argmax(in_run, axis=1), -1 - token)  # outside: own "run"
  visible = run[:, :, None] == run[:, None, :]
  if mask_type == cudnn.cudnn_fmha.MaskType.PADDING_CAUSAL:
    visible &= token[:, None] >= token[None, :]
  outside = (run < 0)[:, :, None, None]
  q, k, v = (nan_gradient(x, outside) for x in (q, k, v))
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits).astype(v.dtype), v)
  return jnp.where(outside, jnp.nan, out)


@jax.custom_vjp
def nan_gradient(x, where):
  return x


nan_gradient.defvjp(lambda x, where: (x, where),
                    lambda where, g: (jnp.where(where, jnp.nan, g), None))


@pytest.fixture
def cudnn_stand_in(monkeypatch):
  monkeypatch.setattr(cudnn.cudnn_fmha, 'dot_product_attention', packed_layout_stand_in)


# The packer's runs with rows at their bound of 3 examples, or 8; or none (computed in the kernel).
@pytest.mark.parametrize('max_segments, with_runs', [(3, True), (8, True), (None, False)])
def test_cudnn_passes_match_xla_on_cpu(cudnn_stand_in, max_segments, with_runs):
  attend = lambda q, k, v, mask: cudnn.cudnn_attention(q, k, v, mask)
  with fake_gpu_target():
    check_against_xla(attend, (4, 96, 2, 16), jnp.bfloat16, 2e-2, max_segments=max_segments,
                      with_runs=with_runs)


@pytest.mark.parametrize('max_segments', [1, 3, 8])
def test_packer_runs_are_the_runs_of_the_mask(max_segments):
  """The packer's runs, made from the examples it packs, are the kernel's own reading of the
  mask (runs of one segment id; the instruction tokens of each), slot for slot, at the bound."""
  segment_ids, is_instruction, runs = packed_rows(4, 96, seed=1, max_segments=max_segments)
  assert (segment_ids.max(axis=1) == max_segments).any()  # some row at its bound
  device_runs = jax.jit(cudnn._runs, static_argnums=2)
  want = (*device_runs(segment_ids, np.ones_like(is_instruction), max_segments + 1),
          *device_runs(segment_ids, is_instruction, max_segments + 1))
  for name, got, expected in zip(packing.RUN_FIELDS, jax.tree.leaves(runs), want):
    np.testing.assert_array_equal(got, expected, err_msg=name)


@contextlib.contextmanager
def fake_gpu_target():
  """The kernel's device check passes on CPU (the stand-in computes what cuDNN would)."""
  gpu = SimpleNamespace(platform='gpu', device_kind='stand-in', compute_capability='9.0')
  with unittest.mock.patch.object(cudnn, 'target_device', lambda: gpu):
    yield


def test_cudnn_runs_layout():
  runs = jax.jit(cudnn._runs, static_argnums=2)
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  is_instruction = jnp.array([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], bool)
  offsets, lengths = runs(segment_ids, jnp.ones_like(is_instruction), 3)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1], [0, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, 2], [7, -1, -1]])
  offsets, lengths = runs(segment_ids, is_instruction, 2)
  np.testing.assert_array_equal(offsets, [[0, 3, -1], [0, -1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 1], [3, -1]])


@pytest.mark.parametrize('dtype, error', [(jnp.float32, 'bfloat16 or float16'),
                                          (jnp.bfloat16, 'needs a CUDA GPU')])
def test_cudnn_rejects_what_it_cannot_run(dtype, error):
  if error == 'needs a CUDA GPU' and jax.default_backend() == 'gpu':
    pytest.skip('on a GPU')
  q = jnp.zeros((1, 8, 1, 8), dtype)
  with pytest.raises(ValueError, match=error):
    attention(q, q, q, AttentionMask.packed(jnp.ones((1, 8)), jnp.zeros((1, 8))), 'cudnn')


# ---- cuDNN on a GPU ---------------------------------------------------------------------------

@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize('max_segments, with_runs', [(3, True), (64, True), (None, False)])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_cudnn_matches_xla(max_segments, with_runs, dtype):
  attend = lambda q, k, v, mask: cudnn.cudnn_attention(q, k, v, mask)
  check_against_xla(attend, (3, 512, 4, 128), dtype, 2e-2, max_segments=max_segments,
                    with_runs=with_runs)


@on_gpu
@pytest.mark.gpu
def test_cudnn_model_matches_xla_in_bf16():
  check_model_against_xla('cudnn', 'bfloat16', 3e-2)


if __name__ == '__main__':
  splash_on_4_devices()
