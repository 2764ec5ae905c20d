"""Inference: KV-cache decoding equals recomputation; generation and scores match transformers."""
import contextlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from hrmtext.infer import Engine, Sampling
from hrmtext.model import ComputeConfig, ModelConfig, build_model
from hrmtext.parallel import sharding
from tests import hf_oracle
from tests.hf_oracle import torch


def recompute_greedy(model, params, prompt, max_new, eoa, row_len=64):
  """Reference decoding: the whole sequence from scratch for every new token."""
  logits_fn = jax.jit(model.logits)
  out = []
  while len(out) < max_new:
    n = len(prompt) + len(out)
    inputs = np.zeros((1, row_len), np.int32)
    inputs[0, :n] = prompt + out
    batch = dict(inputs=inputs, positions=np.arange(row_len)[None],
                 segment_ids=(np.arange(row_len) < n)[None].astype(np.int32),
                 is_instruction=(np.arange(row_len) < len(prompt))[None])
    token = int(np.argmax(logits_fn(params, batch)[0, n - 1]))
    if token == eoa:
      break
    out.append(token)
  return out


def prompts(vocab, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize('architecture', ['hrm', 'transformer'])
def test_cached_greedy_equals_recomputation(architecture):
  cfg = ModelConfig(architecture=architecture, vocab_size=64, hidden_size=32, num_heads=2,
                    head_dim=16, intermediate_size=64, layers_per_stack=2)
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(0)))
  eoa = 3
  batch_prompts = prompts(cfg.vocab_size, [5, 11, 2, 7, 16])
  # 2 slots for 5 requests: finished slots are refilled mid-flight.
  engine = Engine(model, params, eoa=eoa, slots=2, max_len=64)
  got = engine.generate(batch_prompts, max_new_tokens=[6, 9, 4, 12, 5])
  for prompt, limit, out in zip(batch_prompts, [6, 9, 4, 12, 5], got):
    assert out == recompute_greedy(model, params, prompt, limit, eoa)


@pytest.mark.slow
def test_sampling_respects_top_p_and_seed():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16,
                    intermediate_size=64, layers_per_stack=1)
  model = build_model(cfg)
  engine = Engine(model, nn.unbox(model.init(jax.random.key(0))), eoa=3, slots=2, max_len=32)
  p = prompts(64, [4, 6])
  hot = Sampling(temperature=1.0)
  assert engine.generate(p, 8, hot, seed=1) == engine.generate(p, 8, hot, seed=1)
  assert engine.generate(p, 8, hot, seed=1) != engine.generate(p, 8, hot, seed=2)
  # top_p -> 0 keeps only the most likely token: greedy.
  assert engine.generate(p, 8, Sampling(1.0, 1e-6)) == engine.generate(p, 8)


@hf_oracle.needs_hf
def test_generation_and_scores_match_transformers():
  hf = hf_oracle.make_hf_model(vocab=128, L_bp_cycles=(2,))
  cfg, params = hf_oracle.to_hrmtext(hf)
  model = build_model(cfg)
  batch_prompts = prompts(cfg.vocab_size, [6, 9, 3])
  eoa = 127
  engine = Engine(model, params, eoa=eoa, slots=2, max_len=32)
  got = engine.generate(batch_prompts, max_new_tokens=8)
  scored = engine.score([(p, g + [eoa]) for p, g in zip(batch_prompts, got)])
  for prompt, out, (logprob, count, greedy) in zip(batch_prompts, got, scored):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      want = hf.generate(ids, token_type_ids=torch.ones_like(ids), max_new_tokens=len(out),
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    assert want[0, len(prompt):].tolist() == out
    full = torch.tensor([prompt + out + [eoa]])
    types = (torch.arange(full.shape[1]) < len(prompt)).long()[None]
    with torch.no_grad():
      logits = hf(input_ids=full, token_type_ids=types).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = full[0, len(prompt):]
    want_logprob = logp[len(prompt) - 1:-1].gather(-1, targets[:, None]).sum().item()
    want_greedy = bool((logits[len(prompt) - 1:-1].argmax(-1) == targets).all())
    assert count == len(out) + 1
    assert abs(logprob - want_logprob) <= 1e-4 * max(1.0, abs(want_logprob))
    assert greedy == want_greedy


@pytest.mark.slow
def test_sampled_streams_belong_to_requests():
  """With request seeds, a request's sampled tokens depend only on its seed and prompt: not on
  the other requests, their order, or the number of slots (continuous refill)."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16,
                    intermediate_size=64, layers_per_stack=1)
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(0)))
  p = prompts(64, [4, 6, 3, 5])
  hot = Sampling(temperature=1.0)
  together = Engine(model, params, eoa=3, slots=3, max_len=32).generate(
      p, 8, hot, seed=7, request_seeds=[10, 11, 12, 13])
  alone = Engine(model, params, eoa=3, slots=1, max_len=32)
  assert [alone.generate([q], 8, hot, seed=7, request_seeds=[s])[0]
          for q, s in zip(p[::-1], [13, 12, 11, 10])] == together[::-1]
  # The same prompt with other seeds draws other samples.
  repeated = alone.generate([p[0]] * 4, 8, hot, seed=7, request_seeds=[0, 1, 2, 3])
  assert len({tuple(r) for r in repeated}) > 1


@pytest.mark.slow
def test_cache_dtype_follows_the_model():
  for dtype in ('float32', 'bfloat16'):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16,
                      intermediate_size=64, layers_per_stack=1)
    model = build_model(cfg, ComputeConfig(dtype=dtype))
    params = nn.unbox(model.init(jax.random.key(0)))
    engine = Engine(model, params, eoa=-1, slots=2, max_len=32)  # no end of answer: full length
    assert {c.dtype for c in jax.tree.leaves(engine._init_state()['cache'])} == {np.dtype(dtype)}
    assert [len(o) for o in engine.generate(prompts(64, [4, 6]), [5, 7])] == [5, 7]
  # An explicit override: a bfloat16 cache for a float32 model.
  bf16 = Engine(model, params, eoa=3, slots=2, max_len=32, cache_dtype='bfloat16')
  assert {c.dtype for c in jax.tree.leaves(bf16._init_state()['cache'])} == {np.dtype('bfloat16')}


def test_device_functions_trace_on_the_engine_mesh(monkeypatch):
  """generate, score and lower trace with the engine's mesh and logical rules current, so the
  model's activation and cache constraints apply to that mesh (generate lost it once)."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, head_dim=16, intermediate_size=64,
                    layers_per_stack=1, H_cycles=1, L_cycles=1)
  model = build_model(cfg)
  engine = Engine(model, nn.unbox(model.init(jax.random.key(0))), eoa=3, slots=2, max_len=32)
  meshes, activate = [], sharding.activate

  @contextlib.contextmanager
  def recorded(mesh):
    meshes.append(mesh)
    with activate(mesh):
      yield

  monkeypatch.setattr(sharding, 'activate', recorded)
  for call in (lambda: engine.generate(prompts(cfg.vocab_size, [3, 5]), 2),
               lambda: engine.score([([5, 6], [7, 8])]),
               lambda: engine.lower(Sampling(), prompt_len=4)):
    meshes.clear()
    call()
    assert meshes and all(m is engine.mesh for m in meshes)
