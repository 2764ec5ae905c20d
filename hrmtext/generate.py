"""python -m hrmtext.generate --checkpoint runs/tiny --condition direct --prompt "What is 3 + 4?"

Generates responses with the KV-cache engine (EMA weights by default). Batch mode:
--input prompts.jsonl --output out.jsonl, rows {"instruction", "condition"?} or
{"instruction_ids"}; each output row gets "response" (and "response_ids").
"""
import sys

from absl import app, flags
from tqdm import tqdm

from hrmtext.data.sources import write_jsonl
from hrmtext.infer import Sampling, flags as infer_flags, text

PROMPT = flags.DEFINE_string('prompt', None, 'Instruction text (single-prompt mode).')
CONDITION = flags.DEFINE_string('condition', 'direct', 'Condition tags, e.g. direct or synth,cot.')
INPUT = flags.DEFINE_string('input', None, 'JSONL/Parquet of prompts (batch mode).')
OUTPUT = flags.DEFINE_string('output', None, 'JSONL to write (batch mode).')
MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate at most.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature (0: greedy).')
TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (PROMPT.value is None) == (INPUT.value is None):
    raise app.UsageError('give either --prompt or --input (with --output)')
  if INPUT.value and not OUTPUT.value:
    raise app.UsageError('--input needs --output')
  try:
    rows = (text.read_requests(INPUT.value) if INPUT.value else
            [{'instruction': PROMPT.value, 'condition': CONDITION.value}])
    engine, tok, _ = infer_flags.load()
    prompts = [text.encode_ids(tok, row)[0] for row in rows]
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f'error: {e}')
  sampling = Sampling(TEMPERATURE.value, TOP_P.value)
  with tqdm(total=len(prompts), desc='generating', disable=not INPUT.value) as bar:
    outputs = engine.generate(prompts, MAX_NEW.value, sampling, SEED.value, progress=bar.update)
  if not INPUT.value:
    print(tok.decode(outputs[0]))
    return
  write_jsonl(OUTPUT.value, [dict(row, response=tok.decode(ids), response_ids=ids)
                             for row, ids in zip(rows, outputs)])
  print(f'wrote {len(rows)} responses to {OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
