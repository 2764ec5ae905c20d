"""Text-level inference: load a run's checkpoint with its tokenizer; read and check requests."""
from hrmtext.data.tokenizer import Tokenizer
from hrmtext.errors import UserError
from hrmtext.infer.engine import Engine
from hrmtext.model import ComputeConfig, build_model
from hrmtext.parallel.mesh import inference_mesh
from hrmtext.run import Run


def load(path: str, *, tokenizer: str = '', use_ema: bool = True, slots: int = 8,
         max_len: int = 0, eoa_id: int | None = None, need_tokenizer: bool = True,
         cycles: tuple[int, int] | None = None, mesh_config=None
         ) -> tuple[Engine, Tokenizer | None, dict]:
  """Engine on the (EMA) weights of run `path`, its tokenizer (`tokenizer` if given) and its meta.

  The tokenizer is the run's (hrmtext.run: the copy training took, or for an imported HF
  checkpoint the one `convert` wrote). Without one (a HF directory that had no
  tokenizer.json) the tokenizer is None, which only token-id rows can use, unless
  `need_tokenizer`. The end-of-answer id is `eoa_id`, else the tokenizer's EOA, else the HF
  config's eos_token_id; with none, generation stops at its token budget. `cycles` (H_cycles,
  L_cycles; 0 keeps the trained count) runs the recurrence at another depth than trained.
  `mesh_config` ({data, fsdp, tensor} as training's config.mesh; default: one device) is the
  engine's mesh (hrmtext.parallel.mesh.inference_mesh): the weights are read straight onto it.
  """
  mesh = inference_mesh(mesh_config)
  run = Run(path)
  cfg, params, meta = run.load_weights(use_ema=use_ema, shardings=mesh)
  if cycles and any(cycles):
    cfg = cfg.with_cycles(*cycles)
  tok = Tokenizer.load(tokenizer) if tokenizer else run.tokenizer(meta)
  if tok is None and need_tokenizer:
    raise UserError(f'{path} has no tokenizer (it was imported without a tokenizer.json); '
                    f'pass --tokenizer')
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise UserError(f'tokenizer {tok.path} has {tok.vocab_size} tokens, the model only '
                    f'{cfg.vocab_size}')
  if eoa_id is not None and not 0 <= eoa_id < cfg.vocab_size:
    raise UserError(f'--eoa_id {eoa_id} is not a token id of the model (0 to {cfg.vocab_size - 1})')
  if eoa_id is None:
    eos = meta.get('hf_config', {}).get('eos_token_id')
    eoa_id = tok.eoa if tok is not None else (eos[0] if isinstance(eos, list) and eos else eos)
  max_len = max_len or meta.get('config', {}).get('data', {}).get('seq_len', 2048)
  # In the dtype the run trained in (older checkpoints kept it in their model config), with the
  # attention kernel for this mesh's devices.
  dtype = meta.get('compute', meta['model']).get('dtype', 'float32')
  model = build_model(cfg, ComputeConfig(dtype=dtype), device=mesh.devices.flat[0])
  engine = Engine(model, params, eoa=-1 if eoa_id is None else eoa_id, slots=slots,
                  max_len=max_len,  # never generate the padded vocabulary rows:
                  vocab_size=tok.vocab_size if tok is not None else None, mesh=mesh)
  return engine, tok, meta


def encode_ids(tok: Tokenizer | None, row: dict) -> tuple[list[int], list[int] | None]:
  """(instruction ids, response ids or None) of a text row or a token-id row."""
  if 'instruction_ids' in row:
    response = row.get('response_ids')
    return list(row['instruction_ids']), None if response is None else list(response)
  if tok is None:
    raise UserError('the checkpoint has no tokenizer: give token-id rows '
                    '{"instruction_ids", "response_ids"} or pass --tokenizer')
  instruction = tok.encode_instruction(row['instruction'], row.get('condition') or 'direct')
  response = row.get('response')
  return instruction, None if response is None else tok.encode_response(response)


def check_prompt(engine: Engine, prompt: list[int]) -> None:
  if len(prompt) >= engine.max_len:
    raise UserError(f'the prompt has {len(prompt)} tokens, more than --max_len '
                    f'{engine.max_len} leaves room for (raise --max_len)')


def check_scored_row(engine: Engine, instruction: list[int], response: list[int]) -> None:
  """Scoring feeds every token but the last: a longer row than max_len would be computed on (and
  allocated for) a context the model never had."""
  length = len(instruction) + len(response) - 1
  if length > engine.max_len:
    raise UserError(f'the row has {length + 1} tokens: scoring it takes {length} positions, more '
                    f'than --max_len {engine.max_len} (raise --max_len)')


def read_requests(path: str, engine: Engine, tok: Tokenizer, *, with_response: bool
                  ) -> tuple[list[dict], list[tuple[list[int], list[int] | None]]]:
  """The JSONL/Parquet rows of `path` and their (instruction ids, response ids) from text fields
  {"instruction", "condition"?, "response"?} or token ids {"instruction_ids", "response_ids"?}.
  A malformed row raises ValueError naming the file and line; so does a row longer than the
  engine's max_len (a prompt that leaves no room to generate; a scored row that would not fit)."""
  from hrmtext.data.sources import raw_rows
  rows, pairs = [], []
  for where, row in raw_rows(path):
    try:
      if isinstance(row, Exception):
        raise UserError(str(row))
      if not isinstance(row, dict):
        raise UserError(f'expected a JSON object, got {type(row).__name__}')
      pair = _encode_row(tok, row, engine.vocab_size, with_response)
      if with_response:
        check_scored_row(engine, *pair)
      else:
        check_prompt(engine, pair[0])
    except ValueError as e:
      raise UserError(f'{where}: {e}') from None
    rows.append(row)
    pairs.append(pair)
  if not rows:
    raise UserError(f'{path}: no rows')
  return rows, pairs


def _encode_row(tok, row, vocab_size, with_response):
  text_fields, id_fields = ('instruction', 'response'), ('instruction_ids', 'response_ids')
  fields = id_fields if 'instruction_ids' in row else text_fields
  if fields[0] not in row:
    raise UserError('needs "instruction" (text) or "instruction_ids" (token ids)')
  if with_response and row.get(fields[1]) is None:
    raise UserError(f'needs "{fields[1]}" to score')
  for name in fields:
    value = row.get(name)
    if value is None:
      continue
    if fields is text_fields and not isinstance(value, str):
      raise UserError(f'"{name}" must be a string')
    if fields is id_fields and not (
        isinstance(value, list) and value and
        all(isinstance(i, int) and 0 <= i < vocab_size for i in value)):
      raise UserError(f'"{name}" must be a non-empty list of token ids in [0, {vocab_size})')
  if not isinstance(row.get('condition') or '', str):
    raise UserError('"condition" must be a string such as "direct" or "synth,cot"')
  return encode_ids(tok, row)
