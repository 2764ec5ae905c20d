"""python -m hrmtext.score --checkpoint runs/tiny --input FILE.jsonl --output OUT.jsonl

Log-likelihood requests (multiple-choice evals): for each row, with text fields
{"instruction", "response", "condition"?} or token ids {"instruction_ids", "response_ids"},
writes the row plus "logprob" (summed over response tokens, EOA included for text rows),
"num_tokens" and "greedy" (would greedy decoding reproduce the response exactly).
"""
import sys

from absl import app, flags

from hrmtext.data.sources import write_jsonl
from hrmtext.infer import flags as infer_flags, text

INPUT = flags.DEFINE_string('input', None, 'JSONL/Parquet of (instruction, response) rows.')
OUTPUT = flags.DEFINE_string('output', None, 'JSONL to write.')
BATCH = flags.DEFINE_integer('batch_size', 16, 'Rows scored per forward pass.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not INPUT.value or not OUTPUT.value:
    raise app.UsageError('--input and --output are required')
  try:
    rows = text.read_requests(INPUT.value)
    engine, tok, _ = infer_flags.load()
    pairs = [text.encode_ids(tok, row) for row in rows]
    missing = [i for i, (_, response) in enumerate(pairs) if not response]
    if missing:
      raise ValueError(f'{INPUT.value}: row {missing[0] + 1} has no response to score')
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f'error: {e}')
  scored = engine.score(pairs, batch_size=BATCH.value)
  write_jsonl(OUTPUT.value, [dict(row, logprob=lp, num_tokens=n, greedy=g)
                             for row, (lp, n, g) in zip(rows, scored)])
  print(f'scored {len(rows)} rows into {OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
