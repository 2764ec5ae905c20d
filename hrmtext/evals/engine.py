"""The harness's model callables over an inference `Engine`, and the training loop's in-loop
generation eval built from them."""
import collections
import os

from hrmtext.data.tokenizer import Tokenizer
from hrmtext.evals.harness import evaluate
from hrmtext.evals.loaders import heldout_tasks
from hrmtext.infer.engine import Engine
from hrmtext.infer.sampling import Sampling
from hrmtext.infer.text import encode_ids


def model_fns(engine: Engine, tok: Tokenizer, *, top_p: float = 1.0, progress=None):
  """(generate_fn, loglik_fn) in the form `hrmtext.evals.evaluate` expects.

  A generate request's budget is the reference's: min(max_new_tokens, max_context - prompt
  length), with max_context capped at the engine's max_len; a prompt that leaves no room gets an
  empty answer (scored as invalid) instead of stopping the run. Requests are grouped by
  temperature and each group goes through the engine at once (continuous refill of its slots).
  """

  def generate_fn(requests):
    outputs = [''] * len(requests)
    groups = collections.defaultdict(list)
    for i, r in enumerate(requests):
      prompt = encode_ids(tok, r)[0]
      room = min(r.get('max_context') or engine.max_len, engine.max_len) - len(prompt)
      if room <= 0:
        continue
      limit = room if r.get('max_new_tokens') is None else min(r['max_new_tokens'], room)
      groups[r.get('temperature') or 0.0].append((i, prompt, limit, r.get('seed', i)))
    for temperature, group in groups.items():
      places, prompts, limits, seeds = map(list, zip(*group))
      generated = engine.generate(prompts, limits, Sampling(temperature, top_p),
                                  request_seeds=seeds, progress=progress)
      for i, ids in zip(places, generated):
        outputs[i] = tok.decode(ids)
    return outputs

  def loglik_fn(requests):
    scored = engine.score([encode_ids(tok, r) for r in requests])
    return [(logprob, greedy) for logprob, _, greedy in scored]

  return generate_fn, loglik_fn


class HeldoutGeneration:
  """The in-loop generation eval, a training hook (hrmtext.training.loop.Evaluator): every
  `every_steps` steps, greedy exact match on the first `limit` examples of each held-out task
  of the prepared data at `prepared_root`, as `hrmtext.evaluate` scores them, of the EMA weights:
  {'eval_gen/<task>/<metric>': value, 'eval_gen/exact_match': mean over tasks}. The engine runs
  on `mesh` (the trainer's; default: one device), where the training state's weights already
  lie. `build` gives None when the data has no held-out rows."""

  def __init__(self, model, tasks: list, tok: Tokenizer, *, every_steps: int, limit: int,
               max_new_tokens: int, mesh=None, slots: int = 8):
    self.every_steps, self.tasks, self.tok, self.limit = every_steps, tasks, tok, limit
    longest = max(len(tok.encode_instruction(e.instruction, e.condition))
                  for task in tasks for e in task.examples[:limit])
    self.engine = Engine(model, None, eoa=tok.eoa, max_len=longest + max_new_tokens,
                         vocab_size=tok.vocab_size, mesh=mesh, slots=slots)

  @classmethod
  def build(cls, model, prepared_root: str, tokenizer_dir: str, *, max_new_tokens: int,
            **kwargs) -> 'HeldoutGeneration | None':
    if not os.path.isdir(os.path.join(prepared_root, 'raw', 'heldout')):
      return None
    tasks = heldout_tasks(prepared_root, max_new_tokens=max_new_tokens)
    return cls(model, tasks, Tokenizer.load(tokenizer_dir), max_new_tokens=max_new_tokens,
               **kwargs)

  def __call__(self, step: int, state) -> dict:
    self.engine.params = state.weights()  # placed on the mesh: a no-op for the training state's
    results = evaluate(self.tasks, *model_fns(self.engine, self.tok), limit=self.limit,
                       progress=False)
    metrics = {f'eval_gen/{task}/{name}': value for task, task_metrics in results.items()
               for name, value in task_metrics.items() if name not in ('n', 'subsets')}
    exact = [task_metrics['exact_match'] for task_metrics in results.values()]
    return {'eval_gen/exact_match': sum(exact) / len(exact), **metrics}
