"""An lm-evaluation-harness model for hrmtext checkpoints (`pip install -e '.[lmeval]'`).

  python -m hrmtext.lmeval run --model hrmtext --model_args checkpoint=runs/tiny,condition=direct \\
      --tasks arc_easy --batch_size 16
  # Python: `import hrmtext.lmeval` registers the model, then
  #   lm_eval.simple_evaluate(model='hrmtext', model_args='checkpoint=runs/tiny', tasks=[...])

`python -m hrmtext.lmeval` is lm-eval's own command line with the model registered (lm-eval
finds models only in imported modules). Model arguments: checkpoint (run directory), tokenizer,
ema (default True), condition (the condition tags of every prompt; write 'synth+cot' for
'synth,cot', since model_args are comma-separated), slots, max_len, seed, H_cycles and L_cycles
(run the recurrence at another depth than trained, as --cycles does; 0: the trained count);
lm-eval's --batch_size sets the rows per scoring pass.

HRM-Text is a PrefixLM: a request's context becomes the instruction (one bidirectional block
between BOQ + condition tags and EOQ) and the continuation the response, whose tokens are scored
(loglikelihood, through Engine.score) or generated (generate_until, through Engine.generate;
stop at EOA, `max_gen_toks` or the first `until` string; `temperature` with do_sample).
loglikelihood_rolling scores the text as the response to an empty instruction, in windows of
max_len tokens that each start afresh.
"""
import sys

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:
  raise ImportError('hrmtext.lmeval needs lm-evaluation-harness: '
                    "pip install -e '.[lmeval]'") from e

import tqdm

from hrmtext.evals.engine import model_fns
from hrmtext.infer import text

DEFAULT_MAX_GEN_TOKS = 256


@register_model('hrmtext')
class HrmTextLM(LM):
  """lm-eval's three request types over one hrmtext Engine."""

  def __init__(self, checkpoint: str, tokenizer: str = '', ema: bool = True,
               condition: str = 'direct', slots: int = 8, max_len: int = 0, seed: int = 0,
               H_cycles: int = 0, L_cycles: int = 0,
               batch_size: int | str = 16, **_):  # lm-eval also passes device, max_batch_size
    super().__init__()
    self.engine, self.tok, _ = text.load(str(checkpoint), tokenizer=tokenizer, use_ema=ema,
                                         slots=int(slots), max_len=int(max_len),
                                         cycles=(int(H_cycles), int(L_cycles)))
    self.condition = str(condition).replace('+', ',')
    self.seed = int(seed)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
    self.tok.condition_tag_ids(self.condition)  # unknown tags fail here, not mid-run
    self._generate, _ = model_fns(self.engine, self.tok)

  def _pairs(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return self.tok.encode_instruction(context, self.condition), self.tok.encode(continuation)

  def _score(self, pairs, disable_tqdm) -> list[tuple[float, bool]]:
    with tqdm.tqdm(total=len(pairs), desc='hrmtext score', disable=disable_tqdm) as bar:
      scored = self.engine.score(pairs, batch_size=self.batch_size, progress=bar.update)
    return [(logprob, greedy) for logprob, _, greedy in scored]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    results = self._score([self._pairs(*r.args) for r in requests], disable_tqdm)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', request.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    instruction = self.tok.encode_instruction('', self.condition)
    window = self.engine.max_len - len(instruction)
    pairs, owners = [], []
    for i, request in enumerate(requests):
      ids = self.tok.encode(request.args[0])
      for start in range(0, len(ids), window):
        pairs.append((instruction, ids[start:start + window]))
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._score(pairs, disable_tqdm)):
      totals[owner] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    asked, stops = [], []
    for request in requests:
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      until = kwargs.get('until') or []
      stops.append([until] if isinstance(until, str) else list(until))
      sampled = kwargs.get('do_sample', False) or kwargs.get('temperature', 0.0) > 0
      asked.append({'instruction': context, 'condition': self.condition,
                    'max_new_tokens': int(kwargs.get('max_gen_toks', DEFAULT_MAX_GEN_TOKS)),
                    'max_context': None,
                    'temperature': float(kwargs.get('temperature', 1.0)) if sampled else 0.0,
                    'seed': self.seed + len(asked)})
    outputs = [truncate_at_stops(out, until) for out, until in zip(self._generate(asked), stops)]
    for request, output in zip(requests, outputs):
      self.cache_hook.add_partial('generate_until', request.args, output)
    return outputs


def truncate_at_stops(output: str, stops: list[str]) -> str:
  """`output` up to the first occurrence of any stop string."""
  cut = min((output.find(s) for s in stops if s and s in output), default=len(output))
  return output[:cut]


def main():
  from lm_eval.__main__ import cli_evaluate
  sys.exit(cli_evaluate())


if __name__ == '__main__':
  main()
