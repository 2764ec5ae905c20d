r"""Decode throughput of the KV-cache engine next to HF transformers on the same weights.

  python -m hrmtext.bench_decode --checkpoint runs/tiny --batch 1,32 --new_tokens 128
  python -m hrmtext.bench_decode  # a random-weight model of the tiny_cpu shape

For each batch size B: B random prompts of --prompt_len tokens, greedy, exactly --new_tokens
new tokens each (end-of-answer disabled). The weights are exported with hrmtext.convert to a
temporary HF directory and loaded as `transformers.HrmTextForCausalLM`, which generates with
`generate` (token_type_ids marking the prompt as the bidirectional block). Each engine runs once
untimed (compilation, warm-up), then a 1-token and a --new_tokens run are timed:

  decode tokens/s = B * (new_tokens - 1) / (time(new_tokens) - time(1))

i.e. prefill excluded. One line per engine and batch size:
`bench: engine=hrmtext batch=32 ... decode_tokens_per_s=...`. HF is skipped (and says so)
without torch/transformers or with --nohf.
"""
import math
import os
import re
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from hrmtext import cli
from hrmtext.errors import UserError
from hrmtext.infer.engine import Engine, bucket
from hrmtext.infer.sampling import Sampling
from hrmtext.model import ModelConfig, build_model

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Run directory; default: random weights.')
EMA = flags.DEFINE_bool('ema', True, 'Use the EMA weights when the checkpoint has them.')
BATCH = flags.DEFINE_list('batch', ['1', '32'], 'Batch sizes (sequences decoded together).')
NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per sequence.')
PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt (instruction) tokens per sequence.')
HF = flags.DEFINE_bool('hf', True, 'Also time HF transformers HrmTextForCausalLM.')
VOCAB = flags.DEFINE_integer('vocab_size', 1280, 'Random model: vocabulary (tiny_cpu: 1024 '
                             'tokenizer pieces + specials, padded to 256).')
SEED = flags.DEFINE_integer('seed', 0, 'Weights (random model) and prompts.')
HLO = flags.DEFINE_bool('hlo', False, 'Also print, per batch size, the MiB that copy-like ops '
                        '(copies, slices, transposes, scatters, concatenations: any op of '
                        '>= 512 KiB but dots) write per decode step in the compiled decode chunk.')

NO_EOA = -1  # never sampled: every sequence runs to --new_tokens


def random_model(vocab_size: int, seed: int) -> tuple[ModelConfig, dict]:
  """The tiny_cpu model shape with random weights."""
  cfg = ModelConfig(vocab_size=vocab_size, hidden_size=128, num_heads=2, head_dim=64,
                    layers_per_stack=1, H_cycles=2, L_cycles=3)
  return cfg, nn.unbox(build_model(cfg).init(jax.random.key(seed)))


def export_hf(cfg: ModelConfig, params, checkpoint: str | None, workdir: str) -> str:
  """An HF hrm_text directory holding the benchmarked weights (via hrmtext.convert)."""
  from hrmtext import checkpoint as ckpt
  from hrmtext.hf import hrmtext_to_hf
  from hrmtext.run import Run
  if not checkpoint:
    checkpoint = os.path.join(workdir, 'run')
    mngr = Run(checkpoint).manager(async_save=False)
    ckpt.save(mngr, 0, meta={'model': cfg.to_dict()}, params=params)
    mngr.wait_until_finished()
    mngr.close()
  hf_dir = os.path.join(workdir, 'hf')
  hrmtext_to_hf(checkpoint, hf_dir, use_ema=EMA.value)
  return hf_dir


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def decode_rate(run, batch: int, new_tokens: int) -> tuple[float, float]:
  """(decode tokens/s, seconds of the untimed first run); `run(n)` generates n tokens each."""
  first = timed(lambda: run(new_tokens))
  one, full = timed(lambda: run(1)), timed(lambda: run(new_tokens))
  return batch * (new_tokens - 1) / max(full - one, 1e-9), first


def bench_hrmtext(cfg, params, prompts, new_tokens):
  engine = Engine(build_model(cfg), params, eoa=NO_EOA, slots=len(prompts),
                  max_len=bucket(len(prompts[0]) + new_tokens + 1))
  outputs = []

  def run(n):
    outputs[:] = engine.generate(prompts, n)
    if any(len(o) != n for o in outputs):
      raise RuntimeError(f'hrmtext generated {[len(o) for o in outputs]} tokens, wanted {n}')

  rate, first = decode_rate(run, len(prompts), new_tokens)
  return rate, first, outputs


def decode_step_copies(engine: Engine, window: int) -> float:
  """MiB written per decode step by the compiled chunk's copy-like ops (the profile behind the
  README's decode note): what is not matmul work grows with batch x window when it copies the
  cache."""
  compiled = engine.lower(Sampling(), prompt_len=1, window=window)[1].compile()
  hlo = compiled.as_text()
  computations = {}
  for block in hlo.split('\n\n'):
    name = re.match(r'\s*(?:ENTRY )?(%[\w.\-]+) ', block)
    if name:
      computations[name[1]] = block

  def written(computation) -> int:
    total = 0
    for line in computations[computation].splitlines():
      op = re.search(r'= \w+\[([\d,]*)\]\S* ([\w\-]+)\(', line)
      if not op or op[2] in ('get-tuple-element', 'parameter', 'tuple', 'bitcast', 'constant',
                             'dot', 'custom-call'):
        continue
      if op[2] == 'while':  # a nested loop: its body times its trip count
        trips = re.search(r'"n":"(\d+)"', line)
        total += (int(trips[1]) if trips else 1) * written(re.search(r'body=(%[\w.\-]+)', line)[1])
        continue
      size = 4 * math.prod(int(d) for d in op[1].split(',') if d)
      total += size if size >= 1 << 19 else 0
    return total

  outermost = re.findall(r'while\(.*?body=(%[\w.\-]+)', hlo)[-1]
  return written(outermost) / 2**20


def bench_hf(model, prompts, new_tokens):
  import torch
  ids = torch.tensor(prompts)
  outputs = []

  def run(n):
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids),
                           token_type_ids=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    outputs[:] = out[:, ids.shape[1]:].tolist()
    if any(len(o) != n for o in outputs):
      raise RuntimeError(f'HF generated {[len(o) for o in outputs]} tokens, wanted {n}')

  rate, first = decode_rate(run, len(prompts), new_tokens)
  return rate, first, outputs


def load_hf(hf_dir):
  """HrmTextForCausalLM on CPU in float32, or None (with the reason printed) when unavailable."""
  try:
    import torch
    import transformers
    model_class = transformers.HrmTextForCausalLM
  except (ImportError, AttributeError) as e:
    print(f'bench: engine=hf skipped ({e})')
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  transformers.logging.set_verbosity_error()
  return model_class.from_pretrained(hf_dir, dtype=torch.float32).eval()


def main(_):
  if not all(b.isdigit() for b in BATCH.value):
    raise app.UsageError(f'--batch {",".join(BATCH.value)}: give integer batch sizes, e.g. 1,32')
  batches = [int(b) for b in BATCH.value]
  if not batches or min(batches) < 1 or NEW_TOKENS.value < 2 or PROMPT_LEN.value < 1:
    raise UserError('--batch sizes and --prompt_len must be >= 1, --new_tokens >= 2')
  if CHECKPOINT.value:
    from hrmtext.run import Run
    cfg, params, _ = Run(CHECKPOINT.value).load_weights(use_ema=EMA.value)
  else:
    cfg, params = random_model(VOCAB.value, SEED.value)
  rng = np.random.default_rng(SEED.value)
  print(f'bench: model hidden={cfg.hidden_size} heads={cfg.num_heads}x{cfg.head_dim} '
        f'layers_per_stack={cfg.layers_per_stack} H_cycles={cfg.H_cycles} '
        f'L_cycles={cfg.L_cycles} vocab={cfg.vocab_size} '
        f'({"random" if not CHECKPOINT.value else CHECKPOINT.value}); '
        f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs')
  with tempfile.TemporaryDirectory() as workdir:
    hf_model = None
    if HF.value and cfg.architecture == 'hrm':
      hf_model = load_hf(export_hf(cfg, params, CHECKPOINT.value, workdir))
    elif HF.value:
      print(f'bench: engine=hf skipped ({cfg.architecture} has no transformers counterpart)')
    for batch in batches:
      prompts = rng.integers(1, cfg.vocab_size, (batch, PROMPT_LEN.value)).tolist()
      common = f'batch={batch} prompt_len={PROMPT_LEN.value} new_tokens={NEW_TOKENS.value}'
      our_rate, first, ours = bench_hrmtext(cfg, params, prompts, NEW_TOKENS.value)
      copies = ''
      if HLO.value:
        engine = Engine(build_model(cfg), params, eoa=NO_EOA, slots=batch,
                        max_len=bucket(PROMPT_LEN.value + NEW_TOKENS.value + 1))
        # As generate() sizes it: never past the cache.
        window = min(bucket(PROMPT_LEN.value + NEW_TOKENS.value, engine.min_window),
                     engine.max_len)
        copies = f' decode_step_copies_mib={decode_step_copies(engine, window):.1f}'
      print(f'bench: engine=hrmtext {common} decode_tokens_per_s={our_rate:.1f} '
            f'first_run_s={first:.1f}{copies}', flush=True)
      if hf_model is not None:
        rate, first, theirs = bench_hf(hf_model, prompts, NEW_TOKENS.value)
        same = np.mean(np.array(ours) == np.array(theirs))
        print(f'bench: engine=hf {common} decode_tokens_per_s={rate:.1f} '
              f'first_run_s={first:.1f} same_tokens_as_hrmtext={same:.3f} '
              f'hrmtext_over_hf={our_rate / rate:.2f}', flush=True)


if __name__ == '__main__':
  cli.run(main)
