"""python -m hrmtext.score --checkpoint runs/tiny --input FILE.jsonl --output OUT.jsonl

Log-likelihood of given responses (multiple-choice evals, reranking). Rows hold text fields
{"instruction", "response", "condition"?} (the response is encoded with its end-of-answer token)
or token ids {"instruction_ids", "response_ids"} (scored as given; these need no tokenizer).
Each output row is the input row plus "logprob" (summed over the response tokens), "num_tokens"
(response tokens scored) and "greedy" (whether greedy decoding reproduces the response token for
token). A row longer than --max_len + 1 tokens (default --max_len: the training row length) is
refused before any scoring.
"""

from absl import app, flags
from tqdm import tqdm

from hrmtext import cli
from hrmtext.data.sources import write_jsonl
from hrmtext.errors import UserError
from hrmtext.files import check_writable
from hrmtext.infer import flags as infer_flags, text

flags.adopt_module_key_flags(infer_flags)  # --help lists the shared flags too
INPUT = flags.DEFINE_string('input', None, 'JSONL/Parquet of (instruction, response) rows.')
OUTPUT = flags.DEFINE_string('output', None, 'JSONL to write.')
BATCH = flags.DEFINE_integer('batch_size', 16, 'Rows scored per forward pass.')


def main(argv):
  if not INPUT.value or not OUTPUT.value:
    raise app.UsageError('--input and --output are required')
  if BATCH.value < 1:
    raise UserError('--batch_size must be >= 1')
  check_writable(OUTPUT.value)
  engine, tok, _ = infer_flags.load(need_tokenizer=False)
  rows, pairs = text.read_requests(INPUT.value, engine, tok, with_response=True)
  with tqdm(total=len(pairs), desc='scoring', unit='row') as bar:
    scored = engine.score(pairs, batch_size=BATCH.value, progress=bar.update)
  write_jsonl(OUTPUT.value, [dict(row, logprob=logprob, num_tokens=count, greedy=greedy)
                             for row, (logprob, count, greedy) in zip(rows, scored)])
  print(f'scored {len(rows)} rows into {OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)
