"""Answer extraction and scorers.

A scorer maps (generated text, an example's target) to a dict of per-example metrics in [0, 1];
the harness averages them over a task.
"""

import math
import re
import string
from collections.abc import Sequence

import numpy as np
from scipy import optimize

# A decimal number, with thousands separators allowed ("1,234.5").
_NUMBER = re.compile(r'-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+')
_THOUSANDS_COMMA = re.compile(r'(\d),(\d{3})(?!\d)')
_FRACTION = re.compile(r'(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+))')


def normalize_whitespace(text: str) -> str:
  return ' '.join(text.split())


def last_boxed(text: str) -> str | None:
  r"""Content of the last `\boxed{...}` (or `\fbox{...}`, `\boxed 5`); None if absent/unclosed."""
  start, command = max((text.rfind(c), c) for c in ('\\boxed', '\\fbox'))
  if start < 0:
    return None
  rest = text[start + len(command):]
  if rest.startswith(' '):
    return rest.split('$')[0].strip() or None
  if not rest.startswith('{'):
    return None
  depth = 0
  for i, char in enumerate(rest):
    depth += (char == '{') - (char == '}')
    if depth == 0:
      return rest[1:i]
  return None  # cut off before the closing brace


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


def final_answer_match(prediction: str, target: str) -> dict[str, float]:
  """`target` is the gold final answer; `invalid` counts generations with no answer to extract."""
  answer = extract_final_answer(prediction)
  return {'acc': float(answers_match(answer, target)), 'invalid': float(answer is None)}


# DROP: answers are bags of spans; F1 aligns predicted and gold spans one-to-one.

def _is_number(token: str) -> bool:
  try:
    float(token)
  except ValueError:
    return False
  return True


def _normalize_drop_span(span: str) -> str:
  """Lowercase, no punctuation (except inside numbers), no articles, numbers as floats."""
  tokens = []
  for token in re.split(r'[ \-]', span.lower()):
    if not _is_number(token):
      token = ''.join(c for c in token if c not in string.punctuation)
    if _is_number(token):
      token = str(float(token))
    token = ' '.join(re.sub(r'\b(a|an|the)\b', ' ', token).split())
    if token:
      tokens.append(token)
  return ' '.join(tokens)


def _span_f1(predicted: set[str], gold: set[str]) -> float:
  """Word-set F1; 0 when the gold span holds numbers and none of them was predicted."""
  gold_numbers = {w for w in gold if _is_number(w)}
  if gold_numbers and not gold_numbers & predicted:
    return 0.0
  if not predicted or not gold:
    return float(predicted == gold)
  common = len(predicted & gold)
  if not common:
    return 0.0
  precision, recall = common / len(predicted), common / len(gold)
  return 2 * precision * recall / (precision + recall)


def drop_em_f1(predicted_spans: Sequence[str], gold_spans: Sequence[str]) -> tuple[float, float]:
  """DROP exact match and F1 of one predicted answer against one gold answer (bags of spans)."""
  predicted = [_normalize_drop_span(s) for s in predicted_spans]
  gold = [_normalize_drop_span(s) for s in gold_spans]
  em = float(sorted(predicted) == sorted(gold))
  scores = np.array([[_span_f1(set(p.split()), set(g.split())) for p in predicted] for g in gold])
  rows, cols = optimize.linear_sum_assignment(scores, maximize=True)
  f1 = scores[rows, cols].sum() / max(len(predicted), len(gold))
  return em, float(f1)


def drop_match(prediction: str, target: Sequence[Sequence[str]]) -> dict[str, float]:
  """`target` holds the alternative gold answers, each a bag of spans; the best one counts."""
  scores = [drop_em_f1([prediction.strip()], gold) for gold in target]
  return {'em': max(em for em, _ in scores), 'f1': max(f1 for _, f1 in scores)}
