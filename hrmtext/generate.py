"""python -m hrmtext.generate --checkpoint runs/tiny --condition direct --prompt "What is 3 + 4?"

Generates responses with the KV-cache engine (EMA weights by default) and prints the response.
Batch mode: --input prompts.jsonl --output out.jsonl, rows {"instruction", "condition"?} or
{"instruction_ids": [...]}; each output row is the input row plus "response" (text) and
"response_ids" (token ids, end-of-answer excluded). Greedy unless --temperature > 0.
On a checkpoint without a tokenizer (imported from a HF directory that had none) give token-id
rows; the output then has "response_ids" only.
"""

from absl import app, flags
from tqdm import tqdm

from hrmtext import cli
from hrmtext.data.sources import write_jsonl
from hrmtext.errors import UserError
from hrmtext.files import check_writable
from hrmtext.infer import Sampling, flags as infer_flags, text

flags.adopt_module_key_flags(infer_flags)  # --help lists the shared flags too
PROMPT = flags.DEFINE_string('prompt', None, 'Instruction text (single-prompt mode).')
CONDITION = flags.DEFINE_string('condition', 'direct', 'Condition tags, e.g. direct or synth,cot.')
INPUT = flags.DEFINE_string('input', None, 'JSONL/Parquet of prompts (batch mode).')
OUTPUT = flags.DEFINE_string('output', None, 'JSONL to write (batch mode).')
MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate at most.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0: greedy).')
TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  if (PROMPT.value is None) == (INPUT.value is None):
    raise app.UsageError('give either --prompt or --input (with --output)')
  if INPUT.value and not OUTPUT.value:
    raise app.UsageError('--input needs --output')
  if MAX_NEW.value < 0 or TEMPERATURE.value < 0 or not 0 < TOP_P.value <= 1:
    raise UserError('need --max_new_tokens >= 0, --temperature >= 0, 0 < --top_p <= 1')
  if OUTPUT.value:
    check_writable(OUTPUT.value)
  engine, tok, _ = infer_flags.load(need_tokenizer=False)
  if INPUT.value:
    rows, pairs = text.read_requests(INPUT.value, engine, tok, with_response=False)
  else:
    rows = [{'instruction': PROMPT.value, 'condition': CONDITION.value}]
    pairs = [text.encode_ids(tok, rows[0])]
    text.check_prompt(engine, pairs[0][0])
  sampling = Sampling(TEMPERATURE.value, TOP_P.value)
  with tqdm(total=len(pairs), desc='generating', unit='response', disable=not INPUT.value) as bar:
    outputs = engine.generate([prompt for prompt, _ in pairs], MAX_NEW.value, sampling,
                              SEED.value, progress=bar.update)
  if not INPUT.value:
    print(tok.decode(outputs[0]))  # a --prompt needed the tokenizer
    return
  decoded = lambda ids: {} if tok is None else {'response': tok.decode(ids)}
  write_jsonl(OUTPUT.value, [dict(row, **decoded(ids), response_ids=ids)
                             for row, ids in zip(rows, outputs)])
  print(f'wrote {len(rows)} responses to {OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)
