"""Answer extraction and scorers.

A scorer maps (generated text, an example's target) to a dict of per-example metrics in [0, 1];
the harness averages them over a task.
"""

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from hrmtext.errors import UserError

LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)

# A decimal number, with thousands separators allowed ("1,234.5").
_NUMBER = re.compile(r'-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+')
_THOUSANDS_COMMA = re.compile(r'(\d),(\d{3})(?!\d)')
_FRACTION = re.compile(r'(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+))')


def normalize_whitespace(text: str) -> str:
  return ' '.join(text.split())


def last_boxed(text: str) -> str | None:
  r"""The reference's rule: the stripped text inside the braces after the last `\boxed` (or, with
  no `\boxed` at all, the last `\fbox`); None if absent or cut off before the closing brace."""
  start = text.rfind('\\boxed')
  if start < 0:
    start = text.rfind('\\fbox')
  if start < 0:
    return None
  open_at, depth = text.find('{', start), 0
  if open_at < 0:
    return None
  for i in range(open_at, len(text)):
    depth += (text[i] == '{') - (text[i] == '}')
    if depth == 0:
      return text[open_at + 1:i].strip()
  return None


def extract_final_answer(text: str) -> str | None:
  r"""The final answer of a worked solution: the last `\boxed{}`, else what follows the last
  `####` on its line, else the last number; None if there is none."""
  boxed = last_boxed(text)
  if boxed and boxed.strip():
    return boxed.strip()
  if '####' in text:
    after = text.rsplit('####', 1)[1].strip()
    if after:
      return after.splitlines()[0].strip()
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def normalize_math_answer(answer: str) -> str:
  r"""Canonical string form of a math answer: no spacing/sizing commands, units after
  `\text{ ` dropped, `\dfrac`/`\tfrac` -> `\frac`, no `$`, `%`, degrees, thousands commas,
  trailing period or a single-letter `x=` prefix."""
  s = answer.strip()
  for unit_start in ('\\text{ ', '\\mbox{ '):  # MATH writes units as "5\text{ cm}"
    s = s.split(unit_start)[0]
  s = re.sub(r'\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}', r'\1', s)
  for old, new in (('\\left', ''), ('\\right', ''), ('\\!', ''), ('\\,', ''), ('\\;', ''),
                   ('\\displaystyle', ''), ('\\dfrac', '\\frac'), ('\\tfrac', '\\frac'),
                   ('^\\circ', ''), ('^{\\circ}', ''), ('\\$', ''), ('$', ''), ('\\%', ''),
                   ('%', '')):
    s = s.replace(old, new)
  s = ''.join(s.split())
  s = re.sub(r'\\frac(\d)(\d)', r'\\frac{\1}{\2}', s)  # \frac12
  s = re.sub(r'\\sqrt(\d+)', r'\\sqrt{\1}', s)
  s = re.sub(r'^[a-zA-Z]=', '', s)
  s = _THOUSANDS_COMMA.sub(r'\1\2', s)
  return s.rstrip('.')


def parse_number(answer: str) -> float | None:
  r"""The value of a normalised answer that is a number or a fraction (`\frac{a}{b}`, `a/b`)."""
  fraction = _FRACTION.fullmatch(answer)
  if fraction:
    sign = fraction[1]
    numerator, denominator = fraction[2] or fraction[4], fraction[3] or fraction[5]
    if int(denominator) == 0:
      return None
    value = int(numerator) / int(denominator)
    return -value if sign else value
  try:
    value = float(answer)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def answers_match(prediction: str | None, gold: str) -> bool:
  """Equal after `normalize_math_answer`, or equal as numbers (relative tolerance 1e-6)."""
  if prediction is None:
    return False
  prediction, gold = normalize_math_answer(prediction), normalize_math_answer(gold)
  if prediction == gold:
    return True
  pred_value, gold_value = parse_number(prediction), parse_number(gold)
  return (pred_value is not None and gold_value is not None
          and math.isclose(pred_value, gold_value, rel_tol=1e-6, abs_tol=1e-9))


def exact_match(prediction: str, target: str) -> dict[str, float]:
  """The whole response, whitespace-normalised."""
  return {'exact_match': float(normalize_whitespace(prediction) == normalize_whitespace(target))}


def worked_solution_match(prediction: str, target: tuple[str, str]) -> dict[str, float]:
  """`target` = (worked solution, its final answer): exact match of the whole solution, and
  match of the final answer extracted from the generation."""
  solution, answer = target
  right = answers_match(extract_final_answer(prediction), answer)
  return exact_match(prediction, solution) | {'answer_acc': float(right)}


# The reference's benchmark rules (evaluation/benchmarks.py of HRM-Text).

def gsm8k_answer(text: str) -> int | None:
  """The last \\boxed{} (else the whole text), without ',' and '$', as int(float(...))."""
  text = last_boxed(text) or text
  try:
    return int(float(text.replace(',', '').replace('$', '').strip()))
  except (ValueError, OverflowError):
    return None


def gsm8k_match(prediction: str, target: int) -> dict[str, float]:
  answer = gsm8k_answer(prediction)
  return {'acc': float(answer == target), 'invalid': float(answer is None)}


def math_verify_equal(gold: str, answer: str) -> bool:
  """`math_verify.verify(parse(gold), parse(answer))`, as the reference calls it."""
  try:
    from math_verify import parse, verify
  except ImportError:
    raise UserError('MATH and AIME scoring needs math-verify: pip install math-verify') from None
  return bool(verify(parse(gold), parse(answer)))


def math_match(prediction: str, target: str) -> dict[str, float]:
  r"""Symbolic equivalence of the last \boxed{} (else the whole text) with the gold answer;
  `invalid`: no \boxed{} in the generation."""
  answer = last_boxed(prediction)
  right = math_verify_equal(target, prediction if answer is None else answer)
  return {'acc': float(right), 'invalid': float(answer is None)}


def choice_letter_match(prediction: str, gold_index: int, num_choices: int) -> dict[str, float]:
  """One generated token, `.strip().upper()`, against the gold letter; an answer that is no
  option letter is invalid and earns 1/num_choices (chance)."""
  letters = LETTERS[:num_choices]
  answer = prediction.strip().upper()
  if answer not in set(letters):
    return {'acc': 1 / num_choices, 'invalid': 1.0}
  return {'acc': float(answer == letters[gold_index]), 'invalid': 0.0}


def aime_answer(text: str) -> int | None:
  """A valid AIME answer: the last \\boxed{} (else the whole text) as an integer in 1..999."""
  text = last_boxed(text) or text
  try:
    answer = int(text)
  except ValueError:
    return None
  return answer if 1 <= answer <= 999 else None


def pass_at_k(n: int, correct: int, k: int) -> float:
  """Unbiased pass@k from n samples of which `correct` are right: 1 - C(n-c, k) / C(n, k)."""
  if k > n:
    raise UserError(f'pass@{k} needs at least {k} samples, got {n}')
  return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def aime_match(predictions: Sequence[str], target: int, ks: Sequence[int]) -> dict[str, float]:
  """The reference's AIME metrics over n samples of one problem: `maj_pass@k` (the gold answer is
  among the k most voted valid answers), unbiased `pass@k` (a sample is right when math-verify
  finds it equal to the gold), `valid` (fraction of samples with a valid answer)."""
  correct, votes = 0, []
  for text in predictions:
    correct += math_verify_equal(str(target), last_boxed(text) or text)
    answer = aime_answer(text)
    if answer is not None:
      votes.append(answer)
  ranked = [answer for answer, _ in collections.Counter(votes).most_common()]
  scores = {f'maj_pass@{k}': float(target in ranked[:k]) for k in ks}
  scores |= {f'pass@{k}': pass_at_k(len(predictions), correct, k) for k in ks}
  return scores | {'valid': len(votes) / len(predictions)}


# DROP, as lm-evaluation-harness's drop task scores it (process_results): a prediction and each
# gold answer are bags of spans; EM compares the normalised span sets, F1 aligns spans one to one
# (only spans whose numbers agree score) and is rounded to 2 decimals; the best gold answer counts.

def _is_number(token: str) -> bool:
  try:
    float(token)
  except ValueError:
    return False
  return True


def _normalize_drop_span(span: str) -> str:
  """Per ' '/'-' token: lowercase, punctuation out (unless a number), numbers as floats,
  articles out; empty tokens dropped."""
  tokens = []
  for token in re.split(' |-', span):
    token = token.lower()
    if not _is_number(token):
      token = ''.join(c for c in token if c not in string.punctuation)
    if _is_number(token):
      token = str(float(token))
    token = ' '.join(_ARTICLES.sub(' ', token).split())
    if token.strip():
      tokens.append(token)
  return ' '.join(tokens).strip()


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
  precision = len(predicted & gold) / len(predicted) if predicted else 1.0
  recall = len(predicted & gold) / len(gold) if gold else 1.0
  return 0.0 if precision == recall == 0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
  gold_numbers = {w for w in gold if _is_number(w)}
  return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def drop_em_f1(predicted_spans: Sequence[str], gold_spans: Sequence[str]) -> tuple[float, float]:
  """DROP exact match and F1 of one predicted answer against one gold answer (bags of spans)."""
  predicted = [_normalize_drop_span(s) for s in predicted_spans]
  gold = [_normalize_drop_span(s) for s in gold_spans]
  em = float(set(predicted) == set(gold) and len(predicted) == len(gold))
  predicted_bags, gold_bags = [set(s.split()) for s in predicted], [set(s.split()) for s in gold]
  scores = np.array([[_bag_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in predicted_bags]
                     for g in gold_bags])
  best = np.zeros(max(len(gold), len(predicted)))
  for row, col in zip(*optimize.linear_sum_assignment(-scores)):
    best[row] = max(best[row], scores[row, col])
  return em, round(float(np.mean(best)), 2)


def drop_match(prediction: str, target: Sequence[Sequence[str]]) -> dict[str, float]:
  """`target` holds the alternative gold answers, each a bag of spans; the best one counts
  (answers whose first span is blank never count)."""
  em = f1 = 0.0
  for gold in target:
    if gold[0].strip():
      gold_em, gold_f1 = drop_em_f1([prediction.strip()], gold)
      em, f1 = max(em, gold_em), max(f1, gold_f1)
  return {'em': em, 'f1': f1}
