"""Tasks: prompted examples, the requests they make to the model, and how they are scored.

A task is a name, a sequence of `Example`s, `requests(example)` and `score(example, outputs)`.
Each request is a dict with a 'kind':
  'generate': {instruction, condition, max_new_tokens (None: up to max_context), max_context
              (prompt + response tokens; a longer prompt gets an empty answer), temperature};
              the model returns the generated text.
  'loglik':   {instruction, condition, response}; the model returns (summed log-prob of the
              response, whether greedy decoding reproduces it).
`score` gets the outputs of the example's requests in order and returns per-example metrics; the
harness averages them (over subsets first when the task's `macro` is set). `headline` names the
metric the paper's table reports. Few-shot prompts are built here from parsed rows (`Item`s);
loaders.py turns files into tasks.
"""

import collections
import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from hrmtext.errors import UserError
from hrmtext.evals import scoring
from hrmtext.evals.scoring import LETTERS

@dataclasses.dataclass(frozen=True)
class Example:
  """What the model is asked (instruction + condition tags) and what counts as right."""
  instruction: str
  condition: str
  target: Any  # what the scorer compares to; multiple choice: index of the right choice
  choices: tuple[str, ...] = ()  # multiple choice: the candidate responses
  subset: str = ''  # sub-score group (MMLU subject, MATH type); '' for none


class Task(Protocol):
  name: str
  examples: Sequence[Example]
  headline: str
  macro: bool

  def requests(self, example: Example) -> list[dict]:
    ...

  def score(self, example: Example, outputs: list) -> dict[str, float]:
    ...


def generate_request(example: Example, max_new_tokens: int | None, max_context: int | None,
                     temperature: float = 0.0) -> dict:
  return {'kind': 'generate', 'instruction': example.instruction, 'condition': example.condition,
          'max_new_tokens': max_new_tokens, 'max_context': max_context,
          'temperature': temperature}


@dataclasses.dataclass(frozen=True)
class GenerationTask:
  """One greedy generation per example, scored by `scorer(generated_text, example.target)`."""
  name: str
  examples: Sequence[Example]
  scorer: Callable[[str, Any], dict[str, float]]
  max_new_tokens: int | None = None
  max_context: int | None = None
  headline: str = 'acc'
  macro: bool = False

  def requests(self, example: Example) -> list[dict]:
    return [generate_request(example, self.max_new_tokens, self.max_context)]

  def score(self, example: Example, outputs: list[str]) -> dict[str, float]:
    return self.scorer(outputs[0], example.target)


@dataclasses.dataclass(frozen=True)
class SampledTask:
  """`samples` generations per example at `temperature` (each with its own random stream),
  scored together by `scorer(generated_texts, example.target, ks)`."""
  name: str
  examples: Sequence[Example]
  scorer: Callable[[Sequence[str], Any, Sequence[int]], dict[str, float]]
  samples: int
  temperature: float
  ks: tuple[int, ...] = (1,)
  max_new_tokens: int | None = None
  max_context: int | None = None
  headline: str = 'maj_pass@1'
  macro: bool = False

  def __post_init__(self):
    if self.samples < max(self.ks) or self.temperature <= 0:
      raise UserError(f'{self.name}: needs samples >= max k ({max(self.ks)}) and a temperature '
                      f'> 0, got {self.samples} samples at {self.temperature}')

  def requests(self, example: Example) -> list[dict]:
    request = generate_request(example, self.max_new_tokens, self.max_context, self.temperature)
    return [request] * self.samples

  def score(self, example: Example, outputs: list[str]) -> dict[str, float]:
    return self.scorer(outputs, example.target, self.ks)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
  """The reference protocol: one greedy token under the example's condition, `.strip().upper()`
  against the gold letter (`acc`; an answer that is no option letter is `invalid` and earns
  1/choices). With `loglik`, also each choice ranked by its log-likelihood as the response:
  `ll_acc` (summed log-prob) and `ll_acc_norm` (log-prob per character of the choice)."""
  name: str
  examples: Sequence[Example]
  max_context: int | None = None
  loglik: bool = True
  macro: bool = False
  headline: str = 'acc'

  def requests(self, example: Example) -> list[dict]:
    requests = [generate_request(example, 1, self.max_context)]
    if self.loglik:
      requests += [{'kind': 'loglik', 'instruction': example.instruction,
                    'condition': example.condition, 'response': choice}
                   for choice in example.choices]
    return requests

  def score(self, example: Example, outputs: list) -> dict[str, float]:
    scores = scoring.choice_letter_match(outputs[0], example.target, len(example.choices))
    if self.loglik:
      logprobs = np.array([logprob for logprob, _ in outputs[1:]])
      lengths = np.array([max(len(choice), 1) for choice in example.choices])
      scores['ll_acc'] = float(np.argmax(logprobs) == example.target)
      scores['ll_acc_norm'] = float(np.argmax(logprobs / lengths) == example.target)
    return scores


@dataclasses.dataclass(frozen=True)
class Item:
  """A benchmark row before prompting: used as a question and as a few-shot example."""
  question: str
  answer: Any  # index into `choices`, or the gold answers
  choices: tuple[str, ...] = ()
  subset: str = ''


def split_shots(items: Sequence[Item], num_shots: int, shot_items: Sequence[Item] | None = None, *,
                shots_per_subset: Mapping[str, int] | None = None,
                distinct: Callable[[Item], Hashable] | None = None):
  """Picks few-shot examples deterministically: per subset, the first `num_shots` (or
  `shots_per_subset[subset]`) of `shot_items` (a shots file: the reference's dev/train split) or,
  without one, of `items` themselves, which are then left out of the evaluation. With
  `distinct`, shots have distinct keys (e.g. DROP passages). Returns (items, {subset: shots})."""
  wanted = lambda subset: (shots_per_subset or {}).get(subset, num_shots)
  shots, taken, keys = collections.defaultdict(list), set(), set()
  for i, item in enumerate(items if shot_items is None else shot_items):
    key = distinct(item) if distinct else i
    if len(shots[item.subset]) < wanted(item.subset) and key not in keys:
      shots[item.subset].append(item)
      taken.add(i)
      keys.add(key)
  if shot_items is None:
    items = [item for i, item in enumerate(items) if i not in taken]
  return items, shots


def few_shot_instruction(shot_blocks: Sequence[str], query_block: str) -> str:
  return '\n\n'.join([*shot_blocks, query_block])


def choice_block(item: Item, with_answer: bool) -> str:
  """The reference's block: the question, lettered options and 'Answer: <letter>'."""
  options = (f'{LETTERS[i]}. {choice.strip()}' for i, choice in enumerate(item.choices))
  answer = f' {LETTERS[item.answer]}' if with_answer else ''
  return '\n'.join([item.question.strip(), *options, f'Answer:{answer}'])


def choice_example(item: Item, shots: Sequence[Item], condition: str) -> Example:
  instruction = few_shot_instruction([choice_block(s, True) for s in shots],
                                     choice_block(item, False))
  return Example(instruction, condition, item.answer, tuple(LETTERS[:len(item.choices)]),
                 item.subset)
