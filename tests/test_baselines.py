"""The reference's baselines (models/baselines of sapientinc/HRM-Text), the ablation switches and
test-time depth: which applications are differentiable, packing invariance, cached decoding,
parameter and FLOP counts, and `--cycles` on the inference entry points."""
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrmtext.data.layout import Index
from hrmtext.data.packing import IGNORE_LABEL, pack_rows
from hrmtext.model import (AttentionMask, ComputeConfig, ModelConfig, architecture_horizon,
                           build_model, fixed_horizon, full_horizon)
from hrmtext.model import cache as kv_cache
from hrmtext.model.flops import (compiled_matmul_flops, forward_flops_per_token,
                                 train_flops_per_token)
from hrmtext.model.layers import Attention, Mlp, rms_norm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURES = ('hrm', 'transformer', 'ut', 'trm', 'trm_match', 'rins')
BP_STEPS = 4  # HRM's horizon in these tests (H_bp 2, L_bp 2); the baselines have fixed ones


def small_config(architecture='hrm', **kw):
  return ModelConfig(**{**dict(architecture=architecture, vocab_size=97, hidden_size=32,
                               num_heads=2, head_dim=16, intermediate_size=64,
                               layers_per_stack=1), **kw})


@functools.lru_cache(maxsize=None)
def init(cfg, seed=1):
  """(model, params); cached: the tests share the models they build."""
  model = build_model(cfg, ComputeConfig(remat_policy='none'))
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed)))


def random_batch(cfg, rows=1, length=8, prefix=3, seed=0):
  rng = np.random.default_rng(seed)
  return dict(inputs=rng.integers(0, cfg.vocab_size, (rows, length)),
              positions=np.tile(np.arange(length), (rows, 1)),
              segment_ids=np.ones((rows, length), np.int32),
              is_instruction=np.tile(np.arange(length) < prefix, (rows, 1)))


# --- the differentiable applications, written out from the reference code ------------------------

def reference_hidden(model, params, batch, full_bptt=False):
  """Each architecture's forward as its reference module writes it, one call per application; an
  application under torch.no_grad becomes a constant (stop_gradient of its output)."""
  cfg, arch = model.cfg, model.cfg.architecture
  x, rope, mask = model._inputs(params, batch)

  def run(name, inputs, differentiable):
    out = model.stack.apply({'params': params[name]}, inputs, rope, mask,
                            final_norm=cfg.has_final_norm(name))[0]
    return out if differentiable or full_bptt else jax.lax.stop_gradient(out)

  if arch == 'transformer':
    return run('stack', x, True)
  z_L = jnp.broadcast_to(jax.lax.stop_gradient(params['z_L_init']), x.shape)
  if arch == 'ut':  # ut_nocarry: 4 cycles of z = core(z + x), grad for the last bp_cycles=2
    for i in range(4):
      z_L = run('stack', z_L + x, i >= 4 - 2)
    return z_L
  if arch == 'rins':  # rins_nocarry: 7 x z_L = L(z_L + x), the last 4 with grad; then H(z_L)
    for i in range(7):
      z_L = run('L', z_L + x, i >= 7 - 4)
    return run('H', z_L, True)
  # hrm_nocarry_bp_warmup and trm_nocarry: the same loop; TRM's one network plays L and H.
  H_cycles, L_cycles, H_bp, L_bp = {
      'hrm': (2, 3, min(2, BP_STEPS - 1), BP_STEPS - min(2, BP_STEPS - 1)),
      'trm': (2, 1, 1, 1), 'trm_match': (2, 3, 2, 3)}[arch]
  L_name, H_name = ('L', 'H') if arch == 'hrm' else ('stack', 'stack')
  z_H = x
  for i in range(H_cycles):
    for k in range(i * L_cycles, (i + 1) * L_cycles):
      z_L = run(L_name, z_L + z_H, k >= H_cycles * L_cycles - L_bp)
    z_H = run(H_name, z_H + z_L, i >= H_cycles - H_bp)
  return z_H


@pytest.mark.parametrize('architecture, full_bptt', [
    *((a, False) for a in ARCHITECTURES),
    *(pytest.param(a, True, marks=pytest.mark.slow) for a in ('hrm', 'ut'))])
def test_gradients_flow_through_exactly_the_reference_applications(architecture, full_bptt):
  cfg = small_config(architecture)
  model, params = init(cfg, seed=2)
  batch = random_batch(cfg)
  horizon = full_horizon(cfg) if full_bptt else architecture_horizon(cfg, BP_STEPS)
  weights = jax.random.normal(jax.random.key(3), (1, 8, cfg.vocab_size))
  loss = lambda f: lambda p: jnp.sum(f(p) * weights)
  got = jax.jit(jax.grad(loss(lambda p: model.logits(p, batch, horizon))))(params)
  want = jax.jit(jax.grad(loss(lambda p: model.head_logits(
      p, reference_hidden(model, p, batch, full_bptt)))))(params)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  has_grad = model.has_gradient(horizon)
  assert set(has_grad) == set(got)
  for name, g in got.items():  # the static gradient map (the optimizer's skip list) agrees
    assert bool(np.any(jax.tree.leaves(g)[0] != 0)) == has_grad[name], name


def test_architecture_defaults_and_horizons():
  """The reference's cycles and credit horizons, and the applications they make."""
  expected = {  # (H_cycles, L_cycles, differentiable L applications, differentiable H ones)
      'ut': (1, 4, (0, 0, 1, 1), ()),
      'trm': (2, 1, (0, 1), (0, 1)),
      'trm_match': (2, 3, (0, 0, 0, 1, 1, 1), (1, 1)),
      'rins': (1, 7, (0, 0, 0, 1, 1, 1, 1), (1,)),
      'transformer': (2, 3, (), (1,)),
  }
  for arch, (H, L, L_diff, H_diff) in expected.items():
    cfg = ModelConfig(architecture=arch)
    for bp in (2, 5):  # HRM's schedule does not move a baseline's horizon
      horizon = architecture_horizon(cfg, bp)
      assert (cfg.H_cycles, cfg.L_cycles) == (H, L), arch
      assert horizon.L == tuple(map(bool, L_diff)) and horizon.H == tuple(map(bool, H_diff))
    horizon = full_horizon(cfg)
    assert all(horizon.L) and all(horizon.H)
  hrm = ModelConfig()
  assert architecture_horizon(hrm, 3).H == (True, True) and sum(architecture_horizon(hrm, 3).L) == 1
  fixed = fixed_horizon(hrm, 1, 3)  # a fixed HRM horizon bp_steps cannot express
  assert fixed.H == (False, True) and sum(fixed.L) == 3
  with pytest.raises(ValueError, match='H_bp'):
    fixed_horizon(ModelConfig(architecture='ut'), 0, 5)  # more than its 4 applications
  with pytest.raises(ValueError, match='one H cycle'):
    ModelConfig(architecture='rins', H_cycles=2)
  with pytest.raises(ValueError, match='final_norm'):
    ModelConfig(architecture='ut', final_norm='H')  # UT has no H stack


# --- packing and the KV cache ------------------------------------------------------------------

# Each architecture; the switches that change which tokens a token sees or how a block computes.
VARIANTS = [*({'architecture': a} for a in ARCHITECTURES), {'norm_type': 'post'},
            {'attn_type': 'causal'}]


def variant_id(kw):
  return ','.join(f'{v}' for v in kw.values())


@pytest.mark.parametrize('kw', VARIANTS, ids=variant_id)
def test_packing_matches_examples_alone(kw):
  """Row 0 packs three examples; rows 1-3 hold each alone (then padding): one jitted call."""
  cfg = small_config(**kw)
  model, params = init(cfg)
  rng = np.random.default_rng(0)
  examples = [(rng.integers(1, 97, n), p) for n, p in ((7, 3), (5, 5), (9, 1))]
  batch = {k: np.zeros((4, 24), np.int32) for k in
           ('inputs', 'positions', 'segment_ids', 'is_instruction')}
  start = 0
  for seg, (tokens, prefix) in enumerate(examples, 1):
    n = len(tokens)
    for row, at, segment in ((0, start, seg), (seg, 0, 1)):
      sl = slice(at, at + n)
      batch['inputs'][row, sl], batch['positions'][row, sl] = tokens, np.arange(n)
      batch['segment_ids'][row, sl] = segment
      batch['is_instruction'][row, sl] = np.arange(n) < prefix
    start += n
  logits = np.asarray(jax.jit(model.logits)(params, batch))
  alone = np.concatenate([logits[row, :len(tokens)] for row, (tokens, _) in enumerate(examples, 1)])
  np.testing.assert_allclose(logits[0, :start], alone, atol=2e-5, rtol=2e-5)


def cached_logits(model, params, tokens, prompt_len):
  """Logits of every position: the prompt prefilled as one instruction block, then the other tokens
  fed one at a time, each attending to the cache (one entry per stack application)."""
  n = len(tokens)
  ones = lambda k: jnp.ones((1, k), jnp.int32)
  prefill = dict(inputs=tokens[None, :prompt_len], positions=jnp.arange(prompt_len)[None],
                 mask=AttentionMask.packed(ones(prompt_len), ones(prompt_len)))
  hidden, new = model.hidden_states(params, prefill, cache=kv_cache.no_past(model.cache_slots()))
  past = {name: [(entry,) for entry in entries] for name, entries in new.items()}
  outputs = [hidden]
  for t in range(prompt_len, n):
    mask = AttentionMask(q_segment_ids=ones(1), kv_segment_ids=ones(t + 1),
                         q_index=jnp.array([[t]]), kv_index=jnp.arange(t + 1)[None],
                         q_is_instruction=jnp.zeros((1, 1), bool),
                         kv_is_instruction=(jnp.arange(t + 1) < prompt_len)[None])
    step = dict(inputs=tokens[None, t:t + 1], positions=jnp.array([[t]]), mask=mask)
    hidden, new = model.hidden_states(params, step, cache=past)
    past = {name: [p + (e,) for p, e in zip(past[name], new[name])] for name in past}
    outputs.append(hidden)
  return model.head_logits(params, jnp.concatenate(outputs, axis=1))[0]


def full_logits(model, params, tokens, prompt_len):
  n = len(tokens)
  batch = dict(inputs=tokens[None], positions=jnp.arange(n)[None],
               segment_ids=jnp.ones((1, n), jnp.int32),
               is_instruction=(jnp.arange(n) < prompt_len)[None])
  return model.logits(params, batch)[0]


CYCLES = {'hrm': (3, 2), 'trm': (3, 2), 'ut': (1, 6), 'rins': (1, 9)}


@pytest.mark.parametrize('kw', [
    *VARIANTS, *({'architecture': a, 'cycles': c} for a, c in CYCLES.items())], ids=variant_id)
def test_cached_decoding_equals_the_full_forward(kw):
  """Also with test-time cycles other than the trained ones (`cycles`: ModelConfig.with_cycles,
  what --cycles runs): one cache slot per application of the new count."""
  kw = dict(kw)
  cycles = kw.pop('cycles', None)
  cfg = small_config(**kw)
  model, params = init(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, cfg.vocab_size, 6))  # 2 decode steps
  if cycles:
    trained = np.asarray(jax.jit(lambda p, t: full_logits(model, p, t, 4))(params, tokens))
    cfg = cfg.with_cycles(*cycles)
    model = build_model(cfg)
    assert sum(model.cache_slots().values()) == sum(cfg.applications)
  both = jax.jit(lambda p, t: (cached_logits(model, p, t, 4), full_logits(model, p, t, 4)))
  cached, full = both(params, tokens)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=2e-5)
  if cycles:  # the depth changed the function
    assert np.abs(np.asarray(full) - trained).max() > 1e-3


# --- the switches' definitions --------------------------------------------------------------------

def test_post_norm_blocks_and_final_norms_are_the_reference_s():
  """norm_type post: x = rms(x + attn(x)); x = rms(x + mlp(x)) per block and, by default, no final
  norm (the reference Transformer adds one only to pre-norm stacks)."""
  cfg = small_config(norm_type='post', layers_per_stack=2)
  model, params = init(cfg)
  x = jax.random.normal(jax.random.key(4), (1, 6, cfg.hidden_size))
  batch = random_batch(cfg, length=6)
  _, rope, mask = model._inputs(params, batch)
  want = x
  for layer in range(2):
    p = jax.tree.map(lambda a: a[layer], params['L']['layers'])
    attn = Attention(cfg, model.compute).apply({'params': p['attn']}, want, rope, mask)[0]
    want = rms_norm(want + attn, cfg.rms_norm_eps)
    mlp = Mlp(cfg, model.compute).apply({'params': p['mlp']}, want)
    want = rms_norm(want + mlp, cfg.rms_norm_eps)
  got = model._apply_stack('L', params['L'], x, rope, mask, None)[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert not cfg.has_final_norm('L') and not cfg.has_final_norm('H')
  pre = lambda final_norm: small_config(final_norm=final_norm)
  assert [pre('').has_final_norm(s) for s in 'LH'] == [True, True]  # MagicNorm: every stack
  assert [pre('none').has_final_norm(s) for s in 'LH'] == [False, False]
  assert [pre('H').has_final_norm(s) for s in 'LH'] == [False, True]
  # MagicNorm's norm is the stack's last operation: without it the output is not unit-RMS.
  for final_norm, unit in (('all', True), ('none', False)):
    cfg = small_config(final_norm=final_norm)
    model, params = init(cfg)
    out = model._apply_stack('L', params['L'], x, rope, mask, None)[0]
    rms = np.sqrt(np.mean(np.square(out), -1))
    assert np.allclose(rms, 1, atol=1e-3) == unit, final_norm


def test_causal_attention_lets_no_instruction_token_see_ahead():
  prefix_cfg, causal_cfg = small_config(), small_config(attn_type='causal')
  model, params = init(prefix_cfg)
  causal = build_model(causal_cfg)
  batch = random_batch(prefix_cfg, length=8, prefix=5)
  changed = dict(batch, inputs=batch['inputs'].copy())
  changed['inputs'][0, 4] = (changed['inputs'][0, 4] + 1) % prefix_cfg.vocab_size  # last inst.
  before = lambda m, b: np.asarray(m.logits(params, b))[0, :4]
  assert np.abs(before(model, batch) - before(model, changed)).max() > 1e-4  # PrefixLM: it sees
  np.testing.assert_array_equal(before(causal, batch), before(causal, changed))
  # Causal = PrefixLM without instruction flags.
  plain = dict(batch, is_instruction=np.zeros_like(batch['is_instruction']))
  np.testing.assert_array_equal(causal.logits(params, batch), model.logits(params, plain))


def test_all_tokens_loss_labels_the_instruction_too():
  """target_only=False (the reference data's option): instruction token t is labelled with
  instruction token t+1; the response labels stay as they are."""
  tokens = np.arange(100, 120)
  index = Index(inst_start=np.array([0, 10]), inst_len=np.array([4, 3]),
                resp_start=np.array([4, 13]), resp_len=np.array([3, 5]))
  lengths = index.inst_len + index.resp_len - 1
  rows = [np.array([0, 1])]
  target_only = pack_rows(tokens, index, lengths, rows, 16)
  everything = pack_rows(tokens, index, lengths, rows, 16, target_only=False)
  for name in ('inputs', 'positions', 'segment_ids', 'is_instruction'):
    np.testing.assert_array_equal(target_only[name], everything[name])
  I = IGNORE_LABEL
  np.testing.assert_array_equal(target_only['labels'][0, :13],
                                [I, I, I, 104, 105, 106, I, I, 113, 114, 115, 116, 117])
  np.testing.assert_array_equal(everything['labels'][0, :13],
                                [101, 102, 103, 104, 105, 106, 111, 112, 113, 114, 115, 116, 117])
  assert (everything['labels'][0, 13:] == IGNORE_LABEL).all()


# --- parameters and FLOPs at XL ----------------------------------------------------------------

XL_VOCAB, XL_SEQ = 65_536, 4096
# The size table: blocks per stack and stacks at XL (n_layers 32), and (applications,
# differentiable ones) of a train step at the end of HRM's warmup (bp_steps 5).
XL_LAYOUT = {'hrm': (16, 2, 8, 5), 'transformer': (32, 1, 1, 1), 'ut': (32, 1, 4, 2),
             'trm': (32, 1, 4, 2), 'trm_match': (16, 1, 8, 5), 'rins': (16, 2, 8, 5)}


@pytest.mark.parametrize('architecture', ARCHITECTURES)
def test_xl_parameters_and_flops_are_the_analytic_counts(architecture):
  cfg = ModelConfig.from_dict(dict(size='XL', architecture=architecture, vocab_size=XL_VOCAB))
  layers, stacks, applications, differentiable = XL_LAYOUT[architecture]
  assert cfg.layers_per_stack == layers
  d, inner, mlp = 1536, 12 * 128, 4096
  per_block = 4 * d * inner + inner * d + 3 * d * mlp  # gate/q/k/v, o, SwiGLU gate/up/down
  z_L_init = 0 if architecture == 'transformer' else d
  expected = stacks * layers * per_block + 2 * XL_VOCAB * d + z_L_init
  shapes = jax.eval_shape(lambda: nn.unbox(build_model(cfg).init(jax.random.key(0))))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == expected
  # Per token: 2 FLOPs per weight of a block, plus causal attention (QK^T and PV over half the
  # row); backward is twice the forward, for the differentiable applications only.
  block_flops = 2 * per_block + 2 * XL_SEQ * inner
  head = 2 * d * XL_VOCAB
  horizon = architecture_horizon(cfg, 5)
  assert train_flops_per_token(cfg, horizon, XL_SEQ) == (
      layers * block_flops * (applications + 2 * differentiable) + 3 * head)
  assert forward_flops_per_token(cfg, XL_SEQ) == layers * block_flops * applications + head


def test_trm_match_has_hrm_s_flops_and_half_its_blocks():
  make = lambda a: ModelConfig.from_dict(dict(size='XL', architecture=a, vocab_size=XL_VOCAB))
  hrm, trm_match = make('hrm'), make('trm_match')
  assert train_flops_per_token(hrm, architecture_horizon(hrm, 5), XL_SEQ) == (
      train_flops_per_token(trm_match, architecture_horizon(trm_match, 5), XL_SEQ))


@pytest.mark.parametrize('architecture', ARCHITECTURES)
def test_compiled_forward_does_the_analytic_work(architecture):
  """The compiled forward's matmuls (loops counted by trip count) are the analytic count, except
  attention, which XLA computes densely where the count takes the causal half."""
  cfg = small_config(architecture)
  model, params = init(cfg)
  rows, length = 2, 32
  batch = jax.tree.map(jnp.asarray, random_batch(cfg, rows=rows, length=length))
  hlo = jax.jit(model.logits).lower(params, batch).compile().as_text()
  dense_extra = 2 * length * cfg.num_heads * cfg.head_dim * cfg.layers_per_stack * sum(
      cfg.applications)
  expected = rows * length * (forward_flops_per_token(cfg, length) + dense_extra)
  assert compiled_matmul_flops(hlo) == pytest.approx(expected, rel=1e-6)


# --- --cycles on the entry points ---------------------------------------------------------------

@pytest.fixture(scope='module')
def hrm_checkpoint(tmp_path_factory):
  """A random-weight HRM checkpoint (no tokenizer: token-id rows) and rows to score."""
  from hrmtext import checkpoint
  from hrmtext.run import Run
  root = tmp_path_factory.mktemp('cycles')
  cfg = small_config(vocab_size=128)
  model, params = init(cfg)
  mngr = Run(str(root / 'run')).manager(async_save=False)
  checkpoint.save(mngr, 1, meta={'model': cfg.to_dict(), 'config': {'data': {'seq_len': 32}}},
                  params=params, ema=params)
  mngr.wait_until_finished()
  mngr.close()
  rows = [{'instruction_ids': [5, 6, 7], 'response_ids': [8, 9, 10, 11]},
          {'instruction_ids': [20, 3], 'response_ids': [4, 4]}]
  with open(root / 'rows.jsonl', 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return root


def entry_point(name, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', f'hrmtext.{name}', *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cycles_flag_runs_the_checkpoint_at_another_depth(hrm_checkpoint, tmp_path):
  from hrmtext.infer import text
  run, rows = hrm_checkpoint / 'run', hrm_checkpoint / 'rows.jsonl'
  result = entry_point('score', '--checkpoint', run, '--input', rows, '--output',
                       tmp_path / 'out.jsonl', '--cycles', '3,1')
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'out.jsonl') as f:
    got = [row['logprob'] for row in map(json.loads, f)]
  pairs = [([5, 6, 7], [8, 9, 10, 11]), ([20, 3], [4, 4])]
  score = lambda **kw: [logprob for logprob, _, _ in text.load(
      str(run), need_tokenizer=False, **kw)[0].score(pairs)]
  deeper = score(cycles=(3, 1))
  np.testing.assert_allclose(got, deeper, rtol=1e-5)
  assert np.abs(np.array(deeper) - score()).max() > 1e-3  # not the trained depth
  bad = entry_point('score', '--checkpoint', run, '--input', rows, '--output',
                    tmp_path / 'bad.jsonl', '--cycles', '3')
  assert bad.returncode != 0 and 'Traceback' not in bad.stderr, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith('error: --cycles'), bad.stderr
  assert not os.path.exists(tmp_path / 'bad.jsonl')
