"""Tasks from local files: the data pipeline's held-out sets and public benchmarks in their
public formats (HF parquet/jsonl exports and the original releases).

Prompts, shots, budgets and scoring follow the HRM-Text reference evaluation
(evaluation/benchmarks.py and config/hrm_benchmarking.yaml): math (GSM8K, MATH, AIME) zero-shot
under 'synth,cot'; everything else few-shot under 'direct', shots (from the reference's split,
given as a shots file) concatenated into the instruction; multiple choice as lettered options
answered by one generated letter. Bad input raises ValueError naming the file and row.
"""

import ast
import csv
import json
import pathlib
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

from hrmtext.errors import UserError
from hrmtext.data.sources import read_objects
from hrmtext.evals import scoring
from hrmtext.evals.scoring import LETTERS
from hrmtext.evals.tasks import (Example, GenerationTask, Item, MultipleChoiceTask, SampledTask,
                                 choice_example, few_shot_instruction, split_shots)

FILE_SUFFIXES = ('.jsonl', '.json', '.parquet', '.csv')
MMLU_CSV_FIELDS = ('question', 'A', 'B', 'C', 'D', 'answer')  # the original release: no header
# The reference drops to 3 shots where 5 do not fit its 4096-token context.
MMLU_SHOTS_PER_SUBJECT = types.MappingProxyType({'high_school_european_history': 3})
# The reference's max_context (prompt + response tokens) per kind of benchmark.
GENERATION_CONTEXT, CHOICE_CONTEXT, SAMPLED_CONTEXT = 3072, 4096, 4096


def data_files(path) -> list[pathlib.Path]:
  """`path` itself, or the data files in a folder and its subfolders, in path order."""
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(p for p in path.rglob('*') if p.suffix in FILE_SUFFIXES and p.is_file())
    if not files:
      raise UserError(f'{path}: no {"/".join(FILE_SUFFIXES)} files')
    return files
  if not path.is_file():
    raise UserError(f'{path}: no such file or folder')
  if path.suffix not in FILE_SUFFIXES:
    raise UserError(f'{path}: unsupported file type (use {"/".join(FILE_SUFFIXES)})')
  return [path]


def read_rows(file: pathlib.Path, headerless_fields: Sequence[str] | None = None) -> list[dict]:
  """Rows of one .jsonl/.json (a list of objects, or one)/.parquet/.csv file. A CSV has a header row
  naming a 'question' column, or else is read with `headerless_fields`."""
  if file.suffix in ('.jsonl', '.parquet'):  # the data pipeline's reader, its error format
    return read_objects(str(file))
  try:
    with open(file, encoding='utf-8', newline='') as f:
      if file.suffix == '.json':
        rows = json.load(f)
        if isinstance(rows, dict):  # one row per file (the original MATH release)
          return [rows]
        if not isinstance(rows, list):
          raise UserError('expected a JSON list of rows or one row object')
        return rows
      lines = list(csv.reader(f))
  except (OSError, ValueError) as e:
    raise UserError(f'{file}: cannot read: {e}') from None
  if lines and 'question' in (cell.strip().lower() for cell in lines[0]):
    header, lines = [cell.strip() for cell in lines[0]], lines[1:]
  elif headerless_fields:
    header = list(headerless_fields)
  else:
    raise UserError(f'{file}: CSV without a header row naming a "question" column')
  return [dict(zip(header, line)) for line in lines if line]


def _parse_rows(path, parse_row: Callable[[dict, pathlib.Path], Any], expected: str,
                headerless_fields=None) -> list:
  """`parse_row(row, file)` for every row of the data files at `path`."""
  items = []
  for file in data_files(path):
    for i, row in enumerate(read_rows(file, headerless_fields)):
      try:
        items.append(parse_row(row, file))
      except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise UserError(
            f'{file}: row {i + 1}: {type(e).__name__}: {e}; expected {expected}') from None
  return items


def _choice_index(answer, labels: Sequence[str], num_choices: int) -> int:
  """An answer given as one of `labels`, else as a 0-based index (int or digit string)."""
  if isinstance(answer, str) and answer.strip() in labels:
    index = list(labels).index(answer.strip())
  elif isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
    index = int(answer)
  else:
    raise UserError(f'answer {answer!r} is not one of {list(labels)} nor an index')
  if not 0 <= index < num_choices:
    raise UserError(f'answer index {index} out of range for {num_choices} choices')
  return index


def _as_bool(value) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in ('true', 'false'):
    return value.strip().lower() == 'true'
  raise UserError(f'expected a boolean answer, got {value!r}')


# Built-in held-out tasks.

def _heldout_row(row, _) -> tuple[str, str, str, str]:
  """(instruction, condition, response, final answer): the answer is the row's short `answer`
  (written by the data pipeline), else the one a worked response states, else the response."""
  response = str(row['response'])
  answer = row.get('answer')
  if answer is None:
    marked = '####' in response or '\\boxed' in response
    answer = (marked and scoring.extract_final_answer(response)) or response
  return row['instruction'], row.get('condition') or 'direct', response, str(answer)


def heldout_files(prepared_root) -> dict[str, pathlib.Path]:
  """{task name: its file} of <prepared_root>/raw/heldout/<task>.jsonl ({} without that folder)."""
  folder = pathlib.Path(prepared_root) / 'raw' / 'heldout'
  return {f.stem: f for f in sorted(folder.glob('*.jsonl'))}


def heldout_tasks(prepared_root, *, names: Sequence[str] | None = None,
                  max_new_tokens: int = 1024) -> list[GenerationTask]:
  """One task per <prepared_root>/raw/heldout/<task>.jsonl (rows: instruction, response,
  condition, optional answer), scored by whitespace-normalised exact match of the response. Tasks
  whose responses are worked solutions (the response is not just the `answer`, or states it after
  '####' / in '\\boxed{}') also score the final answer extracted from the generation."""
  files = heldout_files(prepared_root)
  if not files:
    raise UserError(f'{pathlib.Path(prepared_root) / "raw" / "heldout"}: no held-out .jsonl files')
  unknown = sorted(set(names or ()) - set(files))
  if unknown:
    raise UserError(f'unknown held-out tasks {unknown}; available: {sorted(files)}')
  tasks = []
  for name in names or files:
    rows = _parse_rows(files[name], _heldout_row,
                       'JSONL rows {"instruction", "response", "condition", "answer"}')
    normalized = scoring.normalize_whitespace
    if any(normalized(response) != normalized(answer) for *_, response, answer in rows):
      examples = [Example(i, c, (response, answer)) for i, c, response, answer in rows]
      tasks.append(GenerationTask(name, examples, scoring.worked_solution_match, max_new_tokens,
                                  headline='answer_acc'))
    else:
      examples = [Example(i, c, response) for i, c, response, _ in rows]
      tasks.append(GenerationTask(name, examples, scoring.exact_match, max_new_tokens,
                                  headline='exact_match'))
  return tasks


# Math: zero-shot worked solutions under 'synth,cot', final answer compared.

def _gsm8k_item(row, _):
  if '####' not in row['answer']:
    raise UserError("answer has no '#### <number>'")
  return Item(row['question'].strip(), int(row['answer'].split('####')[-1].strip().replace(',', '')))


def load_gsm8k(path, *, name='gsm8k', condition='synth,cot', max_new_tokens=None,
               max_context=GENERATION_CONTEXT) -> GenerationTask:
  """GSM8K .jsonl/.parquet rows {"question", "answer": "...#### 42"}; `acc` and `invalid`
  (no integer in the last \\boxed{}, else in the whole text)."""
  items = _parse_rows(path, _gsm8k_item, 'GSM8K rows {"question", "answer": "... #### <integer>"}')
  examples = [Example(item.question, condition, item.answer) for item in items]
  return GenerationTask(name, examples, scoring.gsm8k_match, max_new_tokens, max_context)


def _math_item(row, _):
  answer = row.get('answer') or scoring.last_boxed(row['solution'])
  if not answer:
    raise UserError('no "answer" and no \\boxed{} in "solution"')
  subject = row.get('type') or row.get('subject') or ''
  return Item(row['problem'].strip(), str(answer), subset=subject)


def load_math(path, *, name='math', condition='synth,cot', max_new_tokens=None,
              max_context=GENERATION_CONTEXT) -> GenerationTask:
  """MATH rows {"problem", "solution" with \\boxed{answer}, "type"}: the HF parquet files of the
  7 subsets (a folder of them), the original release's one-problem .json files in subject folders,
  or MATH-500 .jsonl (an "answer" field wins over the solution). `acc` is the micro mean over all
  problems (math-verify equivalence), with per-subject scores under 'subsets'."""
  items = _parse_rows(path, _math_item, 'MATH rows {"problem", "solution" with \\boxed{}, "type"}')
  examples = [Example(item.question, condition, item.answer, subset=item.subset) for item in items]
  return GenerationTask(name, examples, scoring.math_match, max_new_tokens, max_context)


def _aime_item(row, _):
  answer = row.get('answer')
  if answer is None or answer == '':
    answer = scoring.last_boxed(row.get('solution') or '')
  return Item(row['problem'].strip(), int(str(answer).strip()))


def load_aime(path, *, name='aime', condition='synth,cot', samples=256, temperature=0.6,
              ks=(1, 10, 100), max_new_tokens=None, max_context=SAMPLED_CONTEXT) -> SampledTask:
  """AIME rows {"problem", "answer"} (or a "solution" with \\boxed{}), e.g. math-ai/aime25:
  `samples` generations per problem at `temperature`; `maj_pass@k` and unbiased `pass@k`."""
  items = _parse_rows(path, _aime_item, 'AIME rows {"problem", "answer": integer}')
  examples = [Example(item.question, condition, item.answer) for item in items]
  ks = tuple(k for k in ks if k <= samples)
  return SampledTask(name, examples, scoring.aime_match, samples, temperature, ks,
                     max_new_tokens, max_context)


# Multiple choice: few-shot lettered options, one generated letter (and choice log-likelihoods).

def _choice_task(name, path, shots_path, parse_row, expected, *, num_shots, condition, loglik,
                 max_context, headerless_fields=None, shots_per_subset=None,
                 macro=False) -> MultipleChoiceTask:
  items = _parse_rows(path, parse_row, expected, headerless_fields)
  shot_items = None
  if shots_path:
    shot_items = _parse_rows(shots_path, parse_row, expected, headerless_fields)
  items, shots = split_shots(items, num_shots, shot_items, shots_per_subset=shots_per_subset)
  examples = [choice_example(item, shots[item.subset], condition) for item in items]
  return MultipleChoiceTask(name, examples, max_context, loglik, macro)


def _mmlu_item(row, file):
  if 'choices' in row:
    choices = row['choices']
    choices = ast.literal_eval(choices) if isinstance(choices, str) else choices
  else:
    choices = [row[letter] for letter in 'ABCD']
  choices = tuple(str(c) for c in choices)
  # The original release names files <subject>_<split>.csv.
  subject = row.get('subject') or re.sub(r'_(test|dev|val|validation|train)$', '', file.stem)
  return Item(row['question'], _choice_index(row['answer'], LETTERS[:len(choices)], len(choices)),
              choices, subject)


def load_mmlu(path, *, shots_path=None, num_shots=5, shots_per_subject=MMLU_SHOTS_PER_SUBJECT,
              condition='direct', loglik=True, max_context=CHOICE_CONTEXT,
              name='mmlu') -> MultipleChoiceTask:
  """MMLU as HF rows {"question", "subject", "choices": [...], "answer": index} (.parquet/.jsonl,
  or .csv with a header; "choices" may be a list literal, or columns A-D instead), or the original
  header-less <subject>_<split>.csv files (question, A, B, C, D, answer letter). `path` and
  `shots_path` (the dev split) may be folders. Shots are per subject; the scores are macro means
  over subjects (the reference's headline), the micro means are '<metric>_micro'."""
  return _choice_task(name, path, shots_path, _mmlu_item,
                      'MMLU rows {"question", "subject", "choices", "answer"} or header-less CSV',
                      num_shots=num_shots, condition=condition, loglik=loglik,
                      max_context=max_context, headerless_fields=MMLU_CSV_FIELDS,
                      shots_per_subset=shots_per_subject, macro=True)


def _arc_item(row, _):
  question = row['question']
  if isinstance(question, dict):  # original release
    stem, choices = question['stem'], question['choices']
    texts, labels = [c['text'] for c in choices], [c['label'] for c in choices]
  else:  # HF
    stem, texts, labels = question, row['choices']['text'], row['choices']['label']
  return Item(stem, _choice_index(row['answerKey'], labels, len(texts)), tuple(texts))


def load_arc(path, *, shots_path=None, num_shots=25, condition='direct', loglik=True,
             max_context=CHOICE_CONTEXT, name='arc') -> MultipleChoiceTask:
  """ARC as the original .jsonl {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
  or HF rows {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}. The reference:
  ARC-Challenge test, 25 shots from validation."""
  return _choice_task(name, path, shots_path, _arc_item,
                      'ARC rows {"question": {"stem", "choices"}, "answerKey"} or HF form',
                      num_shots=num_shots, condition=condition, loglik=loglik,
                      max_context=max_context)


def _boolq_item(row, _):
  return Item(f"{row['passage']}\nQuestion: {row['question'].capitalize()}?",
              0 if _as_bool(row['answer']) else 1, ('Yes', 'No'))


def load_boolq(path, *, shots_path=None, num_shots=5, condition='direct', loglik=True,
               max_context=CHOICE_CONTEXT, name='boolq') -> MultipleChoiceTask:
  """BoolQ rows {"question", "passage", "answer": bool}; choices Yes / No. The reference:
  validation, 5 shots from train."""
  return _choice_task(name, path, shots_path, _boolq_item,
                      'BoolQ rows {"question", "passage", "answer"}',
                      num_shots=num_shots, condition=condition, loglik=loglik,
                      max_context=max_context)


def _hellaswag_item(row, _):
  if row.get('ctx_a') is not None and row.get('ctx_b') is not None:
    context = f"{row['ctx_a']} {row['ctx_b'].capitalize()}"  # capitalize() as the reference
  else:
    context = row['ctx']
  endings = tuple(row['endings'])
  return Item(f'{context}\nQuestion: Which is the most logical continuation?',
              _choice_index(row['label'], (), len(endings)), endings)


def load_hellaswag(path, *, shots_path=None, num_shots=10, condition='direct', loglik=True,
                   max_context=CHOICE_CONTEXT, name='hellaswag') -> MultipleChoiceTask:
  """HellaSwag rows {"ctx" (or "ctx_a" + "ctx_b"), "endings": [...], "label": index}. The
  reference: validation, 10 shots from train."""
  return _choice_task(name, path, shots_path, _hellaswag_item,
                      'HellaSwag rows {"ctx", "endings", "label"}',
                      num_shots=num_shots, condition=condition, loglik=loglik,
                      max_context=max_context)


def _winogrande_item(row, _):
  return Item(row['sentence'], _choice_index(str(row['answer']), ('1', '2'), 2),
              (row['option1'], row['option2']))


def load_winogrande(path, *, shots_path=None, num_shots=5, condition='direct', loglik=True,
                    max_context=CHOICE_CONTEXT, name='winogrande') -> MultipleChoiceTask:
  """Winogrande rows {"sentence" with "_", "option1", "option2", "answer": "1" | "2"}. The
  reference: winogrande_debiased validation, 5 shots from train."""
  return _choice_task(name, path, shots_path, _winogrande_item,
                      'Winogrande rows {"sentence", "option1", "option2", "answer"}',
                      num_shots=num_shots, condition=condition, loglik=loglik,
                      max_context=max_context)


# DROP: few-shot short answers, EM / F1 against the best gold answer.

def _drop_answer_spans(answer: dict) -> tuple[str, ...]:
  """One answer of the original release, as lm-eval parses it: {"number", "date", "spans"}."""
  if answer.get('number'):
    return (str(answer['number']),)
  if answer.get('spans'):
    return tuple(answer['spans'])
  date = answer.get('date') or {}
  return (' '.join(str(date.get(k) or '') for k in ('day', 'month', 'year')).strip(),)


def _drop_item(row, _):
  if 'answers_spans' in row:  # HF ucinlp/drop: alternative answers flattened into one list
    golds = [(span,) for span in row['answers_spans']['spans']]
  else:  # original release / EleutherAI/drop: the answer plus crowd-validated ones
    validated = row.get('validated_answers') or []
    if isinstance(validated, dict):  # columnar (HF sequence of dicts)
      validated = [dict(zip(validated, values)) for values in zip(*validated.values())]
    golds = [_drop_answer_spans(a) for a in [row['answer'], *validated]]
  golds = tuple(dict.fromkeys(golds))
  if not any(g[0].strip() for g in golds):
    raise UserError('no gold answer')
  return Item(f"{row['passage']}\nQ: {row['question']}", golds)


def load_drop(path, *, shots_path=None, num_shots=3, condition='direct', max_new_tokens=None,
              max_context=GENERATION_CONTEXT, name='drop') -> GenerationTask:
  """DROP rows {"passage", "question", "answer": {"number", "date", "spans"}, "validated_answers"}
  (original / EleutherAI/drop, the reference's) or {"passage", "question", "answers_spans":
  {"spans"}} (ucinlp/drop). Shots: the first `num_shots` rows of `shots_path` (the reference uses 3
  fixed train passages), else rows with distinct passages taken from `path`."""
  expected = 'DROP rows {"passage", "question", "answer", "validated_answers"} or "answers_spans"'
  items = _parse_rows(path, _drop_item, expected)
  shot_items = _parse_rows(shots_path, _drop_item, expected) if shots_path else None
  passage = lambda item: item.question.rsplit('\nQ: ', 1)[0]  # the text before the question
  items, shots = split_shots(items, num_shots, shot_items,
                             distinct=None if shot_items else passage)
  shot_blocks = [f"{s.question}\nA: {', '.join(s.answer[0])}" for s in shots['']]
  examples = [
      Example(few_shot_instruction(shot_blocks, f'{item.question}\nA:'), condition, item.answer)
      for item in items]
  return GenerationTask(name, examples, scoring.drop_match, max_new_tokens, max_context, 'f1')


BENCHMARKS = types.MappingProxyType({
    'gsm8k': load_gsm8k, 'math': load_math, 'drop': load_drop, 'mmlu': load_mmlu, 'arc': load_arc,
    'hellaswag': load_hellaswag, 'winogrande': load_winogrande, 'boolq': load_boolq,
    'aime': load_aime,
})
# Benchmarks that take a --shots file.
FEW_SHOT = ('drop', 'mmlu', 'arc', 'hellaswag', 'winogrande', 'boolq')
# The paper's table: column, benchmark and its headline metric, in the paper's order.
PAPER_TABLE = (('GSM8K', 'gsm8k'), ('MATH', 'math'), ('DROP', 'drop'), ('MMLU', 'mmlu'),
               ('ARC-C', 'arc'), ('HellaSwag', 'hellaswag'), ('Winogrande', 'winogrande'),
               ('BoolQ', 'boolq'))


def load_benchmark(name: str, path, **kwargs):
  """`BENCHMARKS[name](path, **kwargs)`, with a clear error for an unknown name."""
  if name not in BENCHMARKS:
    raise UserError(f'unknown benchmark {name!r}; known: {", ".join(BENCHMARKS)}')
  task = BENCHMARKS[name](path, **kwargs)
  if not task.examples:  # an empty file, or every row taken as a shot
    shots = '' if kwargs.get('shots_path') or name not in FEW_SHOT else (
        ' (without a shots file its first rows are the shots)')
    raise UserError(f'{name}={path}: no examples to evaluate{shots}')
  return task
