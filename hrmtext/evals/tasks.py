"""Tasks: prompted examples, the requests they make to the model, and how they are scored.

A task is a name, a sequence of `Example`s and a request type:
  'generate': one request {instruction, condition, max_new_tokens} per example; the generated
              text is scored by the task's scorer against `Example.target`.
  'loglik':   one request {instruction, condition, response} per choice; the model's
              (summed log-prob, greedy reproduces it) per choice picks the answer.
Few-shot prompts are built here from parsed rows (`Item`s); loaders.py turns files into tasks.
"""

import collections
import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
CHOICE_STYLES = ('letter', 'text')


@dataclasses.dataclass(frozen=True)
class Example:
  """What the model is asked (instruction + condition tags) and what counts as right."""
  instruction: str
  condition: str
  target: Any  # generate: what the scorer compares to; loglik: index of the right choice
  choices: tuple[str, ...] = ()  # loglik: the candidate responses
  subset: str = ''  # sub-score group (MMLU subject, MATH type); '' for none


class Task(Protocol):
  """What the harness needs of a task (GenerationTask and MultipleChoiceTask are the two kinds)."""
  name: str
  examples: Sequence[Example]
  request_type: ClassVar[str]

  def requests(self, example: Example) -> list[dict]:
    ...

  def score(self, example: Example, outputs: list) -> dict[str, float]:
    ...


@dataclasses.dataclass(frozen=True)
class GenerationTask:
  """Generated responses scored by `scorer(generated_text, example.target)`."""
  name: str
  examples: Sequence[Example]
  scorer: Callable[[str, Any], dict[str, float]]
  max_new_tokens: int = 1024
  request_type: ClassVar[str] = 'generate'

  def requests(self, example: Example) -> list[dict]:
    return [{'instruction': example.instruction, 'condition': example.condition,
             'max_new_tokens': self.max_new_tokens}]

  def score(self, example: Example, outputs: list[str]) -> dict[str, float]:
    return self.scorer(outputs[0], example.target)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
  """Choices ranked by the log-likelihood of each as the response.

  acc: argmax of summed log-prob; acc_norm: argmax of log-prob per character of the choice;
  acc_greedy: greedy decoding reproduces the right choice (the reference's generate-and-compare
  score for letter answers).
  """
  name: str
  examples: Sequence[Example]
  request_type: ClassVar[str] = 'loglik'

  def requests(self, example: Example) -> list[dict]:
    return [{'instruction': example.instruction, 'condition': example.condition, 'response': choice}
            for choice in example.choices]

  def score(self, example: Example, outputs: list[tuple[float, bool]]) -> dict[str, float]:
    logprobs = np.array([logprob for logprob, _ in outputs])
    lengths = np.array([max(len(choice), 1) for choice in example.choices])
    return {
        'acc': float(np.argmax(logprobs) == example.target),
        'acc_norm': float(np.argmax(logprobs / lengths) == example.target),
        'acc_greedy': float(outputs[example.target][1]),
    }


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
  `shots_per_subset[subset]`) of `shot_items` (a dev file) or, without one, of `items` themselves,
  which are then left out of the evaluation. With `distinct`, shots have distinct keys (e.g.
  DROP passages). Returns (items to evaluate, {subset: shots})."""
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


def choice_block(item: Item, style: str, with_answer: bool) -> str:
  """'letter' (the reference): the question, lettered options and 'Answer: <letter>';
  'text' (cloze): the question and 'Answer: <choice text>'."""
  if style == 'letter':
    options = (f'{LETTERS[i]}. {choice.strip()}' for i, choice in enumerate(item.choices))
    lines = [item.question.strip(), *options]
    answer = LETTERS[item.answer]
  else:
    lines, answer = [item.question.strip()], item.choices[item.answer].strip()
  return '\n'.join(lines) + (f'\nAnswer: {answer}' if with_answer else '\nAnswer:')


def choice_example(item: Item, shots: Sequence[Item], style: str, condition: str) -> Example:
  if style not in CHOICE_STYLES:
    raise ValueError(f'choice style must be one of {CHOICE_STYLES}, got {style!r}')
  instruction = few_shot_instruction([choice_block(s, style, True) for s in shots],
                                     choice_block(item, style, False))
  if style == 'letter':
    responses = tuple(LETTERS[:len(item.choices)])
  else:
    responses = tuple(c.strip() for c in item.choices)
  return Example(instruction, condition, item.answer, responses, item.subset)
