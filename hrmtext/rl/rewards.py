"""Verifiers: a sampled response and its prompt row -> a reward in [0, 1].

A prompt row is {instruction, condition, answer, verifier, ...}; `verifier` names one of:
  builtin  a built-in reasoning_gym task: reasoning_gym's own score_answer on the row's `entry`
           (the generated item), the answer extracted from a worked solution for cot tasks
  gsm8k    GSM8K's rule, as `hrmtext.evaluate` scores it (the last \\boxed{} or the text, an
           integer)
  math     MATH's: math-verify equivalence of the last \\boxed{} (or the text), as evaluate
  exact    the whitespace-normalised response equals `answer` (user rows without a verifier)
  MODULE:FUNCTION  a user function (response: str, row: dict) -> float
"""
import functools
import importlib

from hrmtext.errors import UserError
from hrmtext.evals import scoring

NAMES = ('builtin', 'gsm8k', 'math', 'exact')


@functools.lru_cache(maxsize=None)
def _reasoning_gym_scorer(task: str):
  import reasoning_gym  # pylint: disable=g-import-not-at-top  (slow to import)
  return reasoning_gym.get_score_answer_fn(task)


def builtin(response: str, row: dict) -> float:
  answer = response
  if row.get('condition') == 'cot':  # a worked solution: its final answer is what is scored
    answer = scoring.extract_final_answer(response)
  return float(_reasoning_gym_scorer(row['task'])(answer, row['entry']))


def gsm8k(response: str, row: dict) -> float:
  return scoring.gsm8k_match(response, int(row['answer']))['acc']


def math(response: str, row: dict) -> float:
  return scoring.math_match(response, str(row['answer']))['acc']


def exact(response: str, row: dict) -> float:
  return scoring.exact_match(response, str(row['answer']))['exact_match']


def verifier(name: str):
  """The function a row's `verifier` names; UserError for an unknown name or module:function."""
  if name in NAMES:
    return globals()[name]
  module, sep, function = name.partition(':')
  if not sep:
    raise UserError(f'unknown verifier {name!r}: one of {", ".join(NAMES)} or MODULE:FUNCTION')
  try:
    return getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise UserError(f'verifier {name}: {e}') from None


def reward(response: str, row: dict) -> float:
  """The reward of `response` to prompt `row`, by the row's verifier (default: exact)."""
  return float(verifier(row.get('verifier') or 'exact')(response, row))
