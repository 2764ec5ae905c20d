"""Text-level inference: load a checkpoint with its tokenizer; generate / log-likelihood fns."""
from hrmtext.data.tokenizer import Tokenizer
from hrmtext.infer.engine import Engine
from hrmtext.infer.sampling import Sampling
from hrmtext.model import build_model
from hrmtext.train import checkpoint


def load(path: str, *, tokenizer: str = '', use_ema: bool = True, slots: int = 8,
         max_len: int = 0) -> tuple[Engine, Tokenizer, dict]:
  """Engine on the checkpoint's (EMA) weights, the tokenizer it was trained with, its meta."""
  cfg, params, meta = checkpoint.load_weights(path, use_ema=use_ema)
  tokenizer_path = tokenizer or meta.get('tokenizer')
  if not tokenizer_path:
    raise ValueError(f'{path} names no tokenizer; pass --tokenizer')
  tok = Tokenizer.load(tokenizer_path)
  max_len = max_len or meta.get('config', {}).get('data', {}).get('seq_len', 2048)
  return Engine(build_model(cfg), params, eoa=tok.eoa, slots=slots, max_len=max_len), tok, meta


def encode_ids(tok: Tokenizer, row: dict) -> tuple[list[int], list[int] | None]:
  """(instruction ids, response ids or None) of a text row or a token-id row."""
  if 'instruction_ids' in row:
    response = row.get('response_ids')
    return list(row['instruction_ids']), None if response is None else list(response)
  instruction = tok.encode_instruction(row['instruction'], row.get('condition') or 'direct')
  response = row.get('response')
  return instruction, None if response is None else tok.encode_response(response)


def model_fns(engine: Engine, tok: Tokenizer, sampling: Sampling = Sampling(), progress=None):
  """(generate_fn, loglik_fn) in the form `hrmtext.evals.evaluate` expects."""

  def generate_fn(requests):
    prompts = [encode_ids(tok, r)[0] for r in requests]
    limits = [r.get('max_new_tokens', 256) for r in requests]
    return [tok.decode(ids) for ids in engine.generate(prompts, limits, sampling,
                                                       progress=progress)]

  def loglik_fn(requests):
    scored = engine.score([encode_ids(tok, r) for r in requests])
    return [(logprob, greedy) for logprob, _, greedy in scored]

  return generate_fn, loglik_fn


def read_requests(path: str) -> list[dict]:
  """JSONL/Parquet rows; a malformed line raises ValueError naming file and line."""
  from hrmtext.data.sources import raw_rows
  rows = []
  for where, row in raw_rows(path):
    if not isinstance(row, dict):
      raise ValueError(f'{where}: expected a JSON object ({row})')
    if 'instruction' not in row and 'instruction_ids' not in row:
      raise ValueError(f'{where}: needs "instruction" (text) or "instruction_ids" (token ids)')
    rows.append(row)
  return rows
