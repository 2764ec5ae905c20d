"""Evaluation library: loaders on tiny files in each public format, prompts, the reference's answer
extraction and scoring rules, sampled evaluation, the batching harness, the tables and the
engine-backed model callables (budgets, too-long prompts), driven by fake models."""
import csv
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hrmtext import evals
from hrmtext.evals import scoring
from hrmtext.evals.engine import model_fns
from hrmtext.evals.tasks import Example


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  return path


def write_parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def write_csv(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows(lines)
  return path


def query_of(request):
  """The asked block of a (possibly few-shot) instruction."""
  return request['instruction'].rsplit('\n\n', 1)[-1]


class FakeGenerate:
  """Answers the question containing a key of `answers` with its value (a list: the value at the
  request's seed modulo its length); records the batches."""

  def __init__(self, answers, default='no idea'):
    self.answers, self.default, self.batches = answers, default, []

  def __call__(self, requests):
    self.batches.append(requests)
    outputs = []
    for r in requests:
      answer = next((v for k, v in self.answers.items() if k in query_of(r)), self.default)
      outputs.append(answer[r['seed'] % len(answer)] if isinstance(answer, list) else answer)
    return outputs


class FakeLoglik:
  """A model preferring `preferred[key]` as the response to the question containing key: log-prob
  -1 and greedy for it, -5 for the others. Records the batches."""

  def __init__(self, preferred):
    self.preferred, self.batches = preferred, []

  def __call__(self, requests):
    self.batches.append(requests)
    outputs = []
    for r in requests:
      key = next(k for k in self.preferred if k in query_of(r))
      best = r['response'] == self.preferred[key]
      outputs.append((-1.0 if best else -5.0, best))
    return outputs


def evaluate(tasks, generate_fn=None, loglik_fn=None, **kwargs):
  return evals.evaluate(tasks, generate_fn, loglik_fn, progress=False, **kwargs)


# Scoring rules of the reference.

@pytest.mark.parametrize('text, boxed', [
    ('so x = \\boxed{\\frac{1}{2}} then \\boxed{ x^{2} }', 'x^{2}'),
    ('\\fbox{3} only', '3'),
    ('\\boxed{1} and \\fbox{2}', '1'),  # \boxed wins over a later \fbox, as the reference
    ('cut off \\boxed{12', None),
    ('none', None),
])
def test_last_boxed(text, boxed):
  assert scoring.last_boxed(text) == boxed


@pytest.mark.parametrize('text, answer', [
    ('so x = \\boxed{\\frac{1}{2}} then \\boxed{x^{2}}', 'x^{2}'),
    ('steps\n#### 1,234\nextra 5', '1,234'),
    ('\\boxed{7} ... #### 8', '7'),
    ('it costs $5.50, wait, 6 in total.', '6'),
    ('no answer here', None),
    ('cut off \\boxed{12', '12'),
])
def test_extract_final_answer_of_heldout_solutions(text, answer):
  assert scoring.extract_final_answer(text) == answer


@pytest.mark.parametrize('prediction, gold, match', [
    ('1,200', '1200', True),
    ('\\dfrac{1}{2}', '\\frac12', True),
    ('0.5', '\\frac{1}{2}', True),
    ('5\\text{ cm}', '5', True),
    ('x = 3', '3', True),
    ('12', '1,2', False),
    (None, '3', False),
])
def test_answers_match_of_heldout_solutions(prediction, gold, match):
  assert scoring.answers_match(prediction, gold) == match


@pytest.mark.parametrize('text, answer', [
    ('Total: \\boxed{1,200}', 1200),
    ('\\boxed{$7$}', 7),
    ('7.9', 7),  # int(float()) truncates
    (' 42 ', 42),
    ('2 + 3 = 5\n#### 5', None),  # no box: the whole text must be the number
    ('The answer is 5.', None),
    ('\\boxed{}', None),
    ('inf', None),
])
def test_gsm8k_answer(text, answer):
  assert scoring.gsm8k_answer(text) == answer


@pytest.mark.parametrize('prediction, scores', [
    (' b ', {'acc': 1.0, 'invalid': 0.0}),
    ('A', {'acc': 0.0, 'invalid': 0.0}),
    ('', {'acc': 0.25, 'invalid': 1.0}),  # EOA at once / a prompt that did not fit
    ('E', {'acc': 0.25, 'invalid': 1.0}),  # no such option
    ('Because', {'acc': 0.25, 'invalid': 1.0}),
])
def test_choice_letter_match(prediction, scores):
  assert scoring.choice_letter_match(prediction, 1, 4) == scores


def test_pass_at_k_is_the_unbiased_estimator():
  # n=5 samples, c=2 right: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10.
  assert scoring.pass_at_k(5, 2, 1) == pytest.approx(0.4)
  assert scoring.pass_at_k(5, 2, 2) == pytest.approx(0.7)
  assert scoring.pass_at_k(5, 4, 2) == 1.0 and scoring.pass_at_k(5, 0, 3) == 0.0
  # The reference's product form.
  n, c, k = 256, 17, 10
  assert scoring.pass_at_k(n, c, k) == pytest.approx(
      1 - math.prod((n - c - j) / (n - j) for j in range(k)))
  with pytest.raises(ValueError, match='at least'):
    scoring.pass_at_k(5, 1, 10)


def test_aime_match():
  samples = ['so \\boxed{70}', '70', 'then \\boxed{71}', '\\boxed{71}', '\\boxed{71}',
             'no idea', '\\boxed{1000}']
  scores = scoring.aime_match(samples, 70, (1, 2, 5))
  # Votes: 71 x3, 70 x2 (1000 is out of range, 'no idea' no integer): majority 71 is wrong,
  # 70 is second. Right samples: 2 of 7.
  assert scores == {'maj_pass@1': 0.0, 'maj_pass@2': 1.0, 'maj_pass@5': 1.0,
                    'pass@1': pytest.approx(2 / 7), 'pass@2': pytest.approx(1 - 10 / 21),
                    'pass@5': pytest.approx(1 - 1 / 21), 'valid': 5 / 7}


def test_drop_em_f1_as_lm_eval():
  assert scoring.drop_em_f1(['The Lions', 'Bucs'], ['bucs', 'lions']) == (1.0, 1.0)
  assert scoring.drop_em_f1(['Tom Brady'], ['Brady']) == (0.0, 0.67)  # rounded to 2 decimals
  assert scoring.drop_em_f1(['Lions'], ['Lions', 'Bucs']) == (0.0, 0.5)
  assert scoring.drop_em_f1(['3 yards'], ['4 yards']) == (0.0, 0.0)  # numbers must agree
  assert scoring.drop_em_f1(['3.0'], ['3']) == (1.0, 1.0)
  assert scoring.drop_match(' three ', [('3',), ('three',)]) == {'em': 1.0, 'f1': 1.0}
  assert scoring.drop_match('', [('',), ('x',)]) == {'em': 0.0, 'f1': 0.0}  # blank golds skipped


def test_drop_scores_equal_lm_eval_process_results():
  drop_utils = pytest.importorskip('lm_eval.tasks.drop.utils', reason='lm_eval not installed')
  golds = [('Tom Brady',), ('Lions', 'Bucs'), ('4 yards',), ('May 1364',), ('1364',), ('',)]
  for prediction in ['Brady', 'the Lions and Bucs', '4', 'May, 1364', '', 'Tom-Brady 4 yards']:
    want = drop_utils.process_results({'answers': golds}, [prediction.strip()])
    assert scoring.drop_match(prediction, golds) == want, prediction


# Held-out tasks of the data pipeline.

def test_heldout_tasks(tmp_path):
  heldout = tmp_path / 'raw' / 'heldout'
  write_jsonl(heldout / 'copy.jsonl', [
      {'task': 'copy', 'instruction': f'Repeat: w{i} x y', 'response': f'w{i} x y',
       'condition': 'direct', 'answer': f'w{i} x y'} for i in range(4)])
  # Worked solutions; rows with the short answer the data pipeline adds, and rows without.
  write_jsonl(heldout / 'gsm_symbolic.jsonl', [
      {'task': 'gsm_symbolic', 'instruction': f'Problem P{i}', 'condition': 'synth,cot',
       'response': f'2 + {i} = {2 + i}\n#### {2 + i}', **({'answer': str(2 + i)} if i % 2 else {})}
      for i in range(4)])
  generate = FakeGenerate({
      'w0': 'w0 x y', 'w1': '  w1\n x   y ', 'w2': 'w2 x', 'w3': 'w3 x y',  # copy: 3 of 4 right
      'P0': '2 + 0 = 2\n#### 2',  # verbatim
      'P1': 'one more than two is 3\n#### 3',  # other steps, right answer
      'P2': '2 + 2 = 5\n#### 5',  # wrong
      'P3': 'so \\boxed{5}',  # right answer in another form
  })
  tasks = evals.heldout_tasks(tmp_path, max_new_tokens=77)
  assert [t.name for t in tasks] == ['copy', 'gsm_symbolic']
  assert evaluate(tasks, generate) == {
      'copy': {'n': 4, 'exact_match': 0.75},
      'gsm_symbolic': {'n': 4, 'exact_match': 0.25, 'answer_acc': 0.75}}
  requests = [r for batch in generate.batches for r in batch]
  assert requests[0] == {'instruction': 'Repeat: w0 x y', 'condition': 'direct',
                         'max_new_tokens': 77, 'max_context': None, 'temperature': 0.0,
                         'seed': requests[0]['seed']}
  assert requests[4]['condition'] == 'synth,cot'

  only = evals.heldout_tasks(tmp_path, names=['gsm_symbolic'])
  assert [t.name for t in only] == ['gsm_symbolic']
  with pytest.raises(ValueError, match='unknown held-out tasks'):
    evals.heldout_tasks(tmp_path, names=['nope'])
  with pytest.raises(ValueError, match='no held-out'):
    evals.heldout_tasks(tmp_path / 'empty')


# Math benchmarks.

def test_gsm8k(tmp_path):
  golds = ['1,200', '5', '-3', '7', '10']
  path = write_jsonl(tmp_path / 'gsm8k.jsonl', [
      {'question': f'Question Q{i}?', 'answer': f'Work.\n#### {g}'} for i, g in enumerate(golds)])
  task = evals.load_gsm8k(path)
  assert task.examples[0] == Example('Question Q0?', 'synth,cot', 1200)
  generate = FakeGenerate({
      'Q0': 'Total is \\boxed{1,200}.',
      'Q1': '2 + 3 = 5\n#### 5',  # the whole text is no number: invalid
      'Q2': '\\boxed{-3.0}',
      'Q3': '\\boxed{8}',
      'Q4': '10',
  })
  assert evaluate([task], generate) == {'gsm8k': {'n': 5, 'acc': 0.6, 'invalid': 0.2}}
  request = generate.batches[0][0]
  assert (request['max_new_tokens'], request['max_context'], request['temperature']) == (
      None, 3072, 0.0)


def test_math_subsets_in_each_format(tmp_path):
  rows = [
      {'problem': 'Alg A0', 'solution': 'Half: $\\boxed{\\frac{1}{2}}$.', 'type': 'Algebra'},
      {'problem': 'Alg A1', 'solution': 'It is $\\boxed{5}$.', 'type': 'Algebra'},
      {'problem': 'Alg A2', 'solution': '$\\boxed{7}$', 'type': 'Algebra'},
  ]
  folder = tmp_path / 'math'
  write_parquet(folder / 'algebra' / 'test-00000.parquet', rows)  # HF: one folder per subset
  (folder / 'geometry').mkdir()  # the original release: one .json per problem
  (folder / 'geometry' / '1.json').write_text(json.dumps(
      {'problem': 'Geo G0', 'solution': 'The angle is $\\boxed{30^\\circ}$.', 'type': 'Geometry',
       'level': 'Level 2'}))
  task = evals.load_math(folder)
  assert [e.target for e in task.examples] == ['\\frac{1}{2}', '5', '7', '30^\\circ']
  generate = FakeGenerate({'A0': 'so \\boxed{0.5}', 'A1': '\\boxed{6}',
                           'A2': 'the answer is 7', 'G0': 'so \\boxed{30}'})
  result = evaluate([task], generate)['math']
  # A2 has no box: invalid, but the whole text is still compared (and is right).
  assert result['n'] == 4 and result['acc'] == 0.75 and result['invalid'] == 0.25
  assert result['subsets']['Algebra']['acc'] == pytest.approx(2 / 3)
  assert result['subsets']['Geometry'] == {'n': 1, 'acc': 1.0, 'invalid': 0.0}
  assert 'acc_micro' not in result  # MATH reports the micro mean
  # MATH-500 style: an explicit answer field wins over the solution.
  path = write_jsonl(tmp_path / 'math500.jsonl',
                     [{'problem': 'p', 'solution': '\\boxed{1}', 'answer': '2'}])
  assert evals.load_math(path).examples[0].target == '2'


def test_aime_sampled_maj_and_pass_at_k(tmp_path):
  path = write_jsonl(tmp_path / 'aime25.jsonl', [
      {'problem': 'Problem X0', 'answer': '70'},
      {'problem': 'Problem X1', 'solution': 'so $\\boxed{204}$'}])
  task = evals.load_aime(path, samples=4, ks=(1, 2, 10))
  assert task.ks == (1, 2) and [e.target for e in task.examples] == [70, 204]
  assert (task.samples, task.temperature, task.examples[0].condition) == (4, 0.6, 'synth,cot')
  # Each request's answer depends on its seed: the harness gives each of the 8 its own.
  generate = FakeGenerate({'X0': ['\\boxed{70}', '\\boxed{71}'], 'X1': ['\\boxed{204}']})
  result = evaluate([task], generate, seed=3)['aime']
  requests = generate.batches[0]
  assert len(requests) == 8 and len({r['seed'] for r in requests}) == 8
  assert all(r['temperature'] == 0.6 and r['max_context'] == 4096 for r in requests)
  right_x0 = sum(r['seed'] % 2 == 0 for r in requests[:4])
  assert result['pass@1'] == pytest.approx((right_x0 / 4 + 1) / 2)
  assert result['pass@2'] == pytest.approx((scoring.pass_at_k(4, right_x0, 2) + 1) / 2)
  # The same seed gives the same requests and scores; another seed other streams.
  again = FakeGenerate(generate.answers)
  assert evaluate([task], again, seed=3)['aime'] == result
  assert [r['seed'] for r in again.batches[0]] == [r['seed'] for r in requests]
  other = FakeGenerate(generate.answers)
  evaluate([task], other, seed=4)
  assert [r['seed'] for r in other.batches[0]] != [r['seed'] for r in requests]
  with pytest.raises(ValueError, match='samples >= max k'):
    evals.load_aime(path, samples=4, ks=(1,), temperature=0.0)


# Multiple-choice benchmarks.

class FakeChoiceModel:
  """Generates `letters[key]` for the question containing key and prefers `preferred[key]` by
  log-likelihood (-1 for it, -5 for the other choices)."""

  def __init__(self, letters, preferred=None):
    self.generate = FakeGenerate(letters)
    self.loglik = FakeLoglik(preferred or {})


def mmlu_row(question, subject, answer):
  return {'question': question, 'subject': subject,
          'choices': [f'{question}-{c}' for c in 'abcd'], 'answer': answer}


def test_mmlu_dev_shots_letter_generation_and_macro(tmp_path):
  dev = write_parquet(tmp_path / 'dev.parquet', [
      mmlu_row('astroD0', 'astronomy', 1), mmlu_row('histD0', 'history', 2),
      mmlu_row('astroD1', 'astronomy', 0), mmlu_row('astroD2', 'astronomy', 3),
      mmlu_row('histD1', 'history', 0)])
  test = write_parquet(tmp_path / 'test.parquet', [
      mmlu_row('astroT0', 'astronomy', 2), mmlu_row('astroT1', 'astronomy', 3),
      mmlu_row('astroT2', 'astronomy', 0), mmlu_row('histT0', 'history', 1)])
  task = evals.load_mmlu(test, shots_path=dev, num_shots=2, shots_per_subject={'history': 1})
  assert [e.target for e in task.examples] == [2, 3, 0, 1]
  assert task.examples[0].choices == ('A', 'B', 'C', 'D')
  assert task.examples[0].instruction == (
      'astroD0\nA. astroD0-a\nB. astroD0-b\nC. astroD0-c\nD. astroD0-d\nAnswer: B\n\n'
      'astroD1\nA. astroD1-a\nB. astroD1-b\nC. astroD1-c\nD. astroD1-d\nAnswer: A\n\n'
      'astroT0\nA. astroT0-a\nB. astroT0-b\nC. astroT0-c\nD. astroT0-d\nAnswer:')
  assert task.examples[3].instruction == (
      'histD0\nA. histD0-a\nB. histD0-b\nC. histD0-c\nD. histD0-d\nAnswer: C\n\n'
      'histT0\nA. histT0-a\nB. histT0-b\nC. histT0-c\nD. histT0-d\nAnswer:')
  assert task.examples[3].condition == 'direct'

  # astronomy: right, wrong, invalid (1/4 credit); history: right.
  model = FakeChoiceModel({'astroT0': ' C', 'astroT1': 'A', 'astroT2': 'Sure', 'histT0': 'b'},
                          {'astroT0': 'C', 'astroT1': 'D', 'astroT2': 'B', 'histT0': 'B'})
  result = evaluate([task], model.generate, model.loglik)['mmlu']
  assert model.generate.batches[0][0]['max_new_tokens'] == 1
  assert model.generate.batches[0][0]['max_context'] == 4096
  astronomy = (1 + 0 + 0.25) / 3
  assert result['subsets']['astronomy']['acc'] == pytest.approx(astronomy)
  assert result['acc'] == pytest.approx((astronomy + 1) / 2)  # macro over subjects
  assert result['acc_micro'] == pytest.approx((1 + 0 + 0.25 + 1) / 4)
  assert result['invalid'] == pytest.approx((1 / 3 + 0) / 2)
  assert result['ll_acc'] == pytest.approx((2 / 3 + 1) / 2)  # the log-likelihood columns
  assert result['ll_acc_norm'] == result['ll_acc']
  # Without log-likelihoods only the one-token generations are asked for.
  model = FakeChoiceModel({'T': 'A'})
  result = evaluate([evals.load_mmlu(test, shots_path=dev, loglik=False)], model.generate)
  assert 'll_acc' not in result['mmlu'] and not model.loglik.batches


def test_mmlu_reference_shot_counts_and_original_csv(tmp_path):
  dev_rows = [mmlu_row(f'e{i}', 'high_school_european_history', 0) for i in range(5)]
  dev_rows += [mmlu_row(f'p{i}', 'physics', 0) for i in range(6)]
  dev = write_jsonl(tmp_path / 'dev.jsonl', dev_rows)
  test = write_jsonl(tmp_path / 'test.jsonl', [mmlu_row('eT', 'high_school_european_history', 1),
                                               mmlu_row('pT', 'physics', 1)])
  european, physics = evals.load_mmlu(test, shots_path=dev).examples
  assert european.instruction.count('Answer: A') == 3 and physics.instruction.count('Answer: A') == 5

  folder = tmp_path / 'test'
  write_csv(folder / 'college_physics_test.csv', [['What is g?', '9.8', '1', '0', '3', 'A'],
                                                  ['What is c?', '1', '3e8', '0', '2', 'B']])
  write_csv(folder / 'virology_test.csv', [['Virus?', 'yes', 'no', 'maybe', 'never', 'C'],
                                           ['Cell?', 'w', 'x', 'y', 'z', 'D']])
  task = evals.load_mmlu(folder, num_shots=1)  # no dev file: each subject's first row is its shot
  assert [(e.subset, e.target) for e in task.examples] == [('college_physics', 1), ('virology', 3)]
  assert task.examples[0].instruction == ('What is g?\nA. 9.8\nB. 1\nC. 0\nD. 3\nAnswer: A\n\n'
                                          'What is c?\nA. 1\nB. 3e8\nC. 0\nD. 2\nAnswer:')
  path = write_csv(tmp_path / 'hf.csv', [['question', 'subject', 'choices', 'answer'],
                                         ['Q?', 'anatomy', "['a', 'b', 'c']", '2']])
  example, = evals.load_mmlu(path, num_shots=0).examples
  assert (example.subset, example.target, example.choices) == ('anatomy', 2, ('A', 'B', 'C'))


def arc_original_row(stem, texts, labels, key):
  choices = [{'text': t, 'label': l} for t, l in zip(texts, labels)]
  return {'question': {'stem': stem, 'choices': choices}, 'answerKey': key}


def test_arc_both_formats(tmp_path):
  original = write_jsonl(tmp_path / 'ARC-Challenge-Dev.jsonl', [
      arc_original_row('Stem S0', ['rock', 'water', 'fire'], ['1', '2', '3'], '2'),
      arc_original_row('Stem S1', ['sun', 'moon'], ['A', 'B'], 'A')])
  hf = write_parquet(tmp_path / 'arc.parquet', [
      {'question': 'Stem S2', 'answerKey': 'C',
       'choices': {'text': ['red', 'green', 'blue', 'black'], 'label': ['A', 'B', 'C', 'D']}}])
  example, = evals.load_arc(hf, shots_path=original).examples  # 25 wanted, 2 there
  assert example.target == 2 and example.choices == ('A', 'B', 'C', 'D')
  assert example.instruction == (
      'Stem S0\nA. rock\nB. water\nC. fire\nAnswer: B\n\n'
      'Stem S1\nA. sun\nB. moon\nAnswer: A\n\n'
      'Stem S2\nA. red\nB. green\nC. blue\nD. black\nAnswer:')
  example, = evals.load_arc(original, num_shots=1).examples  # row 0 becomes the shot
  assert (example.target, example.choices) == (0, ('A', 'B'))


def test_boolq_hellaswag_winogrande(tmp_path):
  boolq = write_jsonl(tmp_path / 'boolq.jsonl', [
      {'question': 'is the sky blue', 'passage': 'The sky is blue.', 'answer': True},
      {'question': 'is grass red', 'passage': 'Grass is green.', 'answer': False}])
  boolq_train = write_parquet(tmp_path / 'boolq_train.parquet', [
      {'question': 'is ice cold', 'passage': 'Ice is cold.', 'answer': 'true'}])
  task = evals.load_boolq(boolq, shots_path=boolq_train)
  assert [e.target for e in task.examples] == [0, 1]
  assert task.examples[0].instruction == (
      'Ice is cold.\nQuestion: Is ice cold?\nA. Yes\nB. No\nAnswer: A\n\n'
      'The sky is blue.\nQuestion: Is the sky blue?\nA. Yes\nB. No\nAnswer:')

  hellaswag_hf = write_parquet(tmp_path / 'hellaswag.parquet', [
      {'ctx_a': 'A man walks in.', 'ctx_b': 'he', 'ctx': 'A man walks in. he',
       'endings': ['sits.', 'flies.', 'runs.', 'swims.'], 'label': '2'}])
  hellaswag_original = write_jsonl(tmp_path / 'hellaswag_val.jsonl', [
      {'ctx': 'A dog barks.', 'endings': ['It sleeps.', 'It meows.'], 'label': 0}])
  example, = evals.load_hellaswag(hellaswag_hf, num_shots=0).examples
  assert example.instruction == (
      'A man walks in. He\nQuestion: Which is the most logical continuation?\n'
      'A. sits.\nB. flies.\nC. runs.\nD. swims.\nAnswer:')
  assert example.target == 2
  example, = evals.load_hellaswag(hellaswag_original, num_shots=0).examples
  assert (example.choices, example.target) == (('A', 'B'), 0)

  winogrande = write_jsonl(tmp_path / 'winogrande.jsonl', [
      {'sentence': 'Ann gave Bo a gift as _ was kind.', 'option1': 'Ann', 'option2': 'Bo',
       'answer': '1'},
      {'sentence': 'The cup broke the glass as _ was hard.', 'option1': 'glass', 'option2': 'cup',
       'answer': '2'}])
  example, = evals.load_winogrande(winogrande, num_shots=1).examples
  assert example.instruction == (
      'Ann gave Bo a gift as _ was kind.\nA. Ann\nB. Bo\nAnswer: A\n\n'
      'The cup broke the glass as _ was hard.\nA. glass\nB. cup\nAnswer:')
  assert example.target == 1

  tasks = [evals.load_boolq(boolq, num_shots=0), evals.load_winogrande(winogrande, num_shots=0)]
  model = FakeChoiceModel({'sky': 'A', 'grass': 'maybe', 'kind': 'A', 'hard': 'B'},
                          {'sky': 'A', 'grass': 'A', 'kind': 'A', 'hard': 'B'})
  results = evaluate(tasks, model.generate, model.loglik)
  assert results['boolq'] == {'n': 2, 'acc': 0.75, 'invalid': 0.5, 'll_acc': 0.5,
                              'll_acc_norm': 0.5}
  assert results['winogrande'] == {'n': 2, 'acc': 1.0, 'invalid': 0.0, 'll_acc': 1.0,
                                   'll_acc_norm': 1.0}


# DROP.

def test_drop_shots_file_and_hf_format(tmp_path):
  rows = [
      {'passage': 'Passage one.', 'question': 'q0', 'answers_spans': {'spans': ['3']}},
      {'passage': 'Passage one.', 'question': 'q1', 'answers_spans': {'spans': ['7', 'seven']}},
      {'passage': 'Passage two.', 'question': 'q2', 'answers_spans': {'spans': ['Lions', 'Bucs']}},
      {'passage': 'Passage three.', 'question': 'q3', 'answers_spans': {'spans': ['Tom Brady']}},
  ]
  path = write_jsonl(tmp_path / 'drop.jsonl', rows)
  # Without a shots file: the first rows with distinct passages (q0, q2), not evaluated.
  task = evals.load_drop(path, num_shots=2)
  assert [e.target for e in task.examples] == [(('7',), ('seven',)), (('Tom Brady',),)]
  assert task.examples[0].instruction == (
      'Passage one.\nQ: q0\nA: 3\n\nPassage two.\nQ: q2\nA: Lions\n\nPassage one.\nQ: q1\nA:')
  # With one: its first rows in order (the reference's fixed passages), everything evaluated.
  no_date = {'day': '', 'month': '', 'year': ''}
  shots = write_jsonl(tmp_path / 'drop_shots.jsonl', [
      {'passage': f'Shot {i}.', 'question': f's{i}', 'validated_answers': [],
       'answer': {'number': str(i), 'date': no_date, 'spans': []}} for i in range(4)])
  task = evals.load_drop(path, shots_path=shots)
  assert len(task.examples) == 4 and task.examples[0].condition == 'direct'
  assert task.examples[3].instruction == (
      'Shot 0.\nQ: s0\nA: 0\n\nShot 1.\nQ: s1\nA: 1\n\nShot 2.\nQ: s2\nA: 2\n\n'
      'Passage three.\nQ: q3\nA:')
  generate = FakeGenerate({'q0': '3', 'q1': ' seven ', 'q2': 'Lions', 'q3': 'Brady'})
  result = evaluate([task], generate)['drop']
  assert task.headline == 'f1' and generate.batches[0][0]['max_context'] == 3072
  # ucinlp/drop lists alternative answers: 'Lions' is one of q2's.
  assert result == {'n': 4, 'em': 0.75, 'f1': pytest.approx((1 + 1 + 1 + 0.67) / 4)}


def test_drop_original_format(tmp_path):
  no_date = {'day': '', 'month': '', 'year': ''}
  rows = [
      {'passage': 'P.', 'question': 'When?',
       'answer': {'number': '', 'date': {'day': '', 'month': 'May', 'year': '1364'}, 'spans': []},
       'validated_answers': [{'number': '', 'date': no_date, 'spans': ['May 1364']},
                             {'number': '', 'date': no_date, 'spans': ['1364']}]},
      # validated answers stored column-wise, as the HF datasets library writes a list of dicts
      {'passage': 'P.', 'question': 'How many?',
       'answer': {'number': '4', 'date': no_date, 'spans': []},
       'validated_answers': {'number': ['4', ''], 'date': [no_date, no_date],
                             'spans': [[], ['four', 'teams']]}},
  ]
  task = evals.load_drop(write_jsonl(tmp_path / 'drop_dev.jsonl', rows), num_shots=0)
  assert [e.target for e in task.examples] == [
      (('May 1364',), ('1364',)), (('4',), ('four', 'teams'))]
  assert task.examples[0].instruction == 'P.\nQ: When?\nA:'


# The engine-backed model callables: the reference's generation budget.

class FakeEngine:
  """Records what `generate` is asked; answers each prompt with its first `limit` ids."""
  max_len = 10

  def __init__(self):
    self.calls = []

  def generate(self, prompts, limits, sampling, request_seeds, progress=None):
    self.calls.append((prompts, limits, sampling.temperature, request_seeds))
    return [list(range(limit)) for limit in limits]


class FakeTokenizer:
  """Instructions encode to one id per word; ids decode to their count."""

  def encode_instruction(self, text, condition):
    return [1] * len(text.split())

  def decode(self, ids):
    return str(len(ids))


def test_generation_budget_and_too_long_prompts():
  engine = FakeEngine()
  generate_fn, _ = model_fns(engine, FakeTokenizer())
  request = lambda words, **kw: {'instruction': ' '.join(['w'] * words), 'condition': 'direct',
                                 'max_new_tokens': None, 'max_context': None, 'seed': words, **kw}
  outputs = generate_fn([
      request(3),  # room up to the engine's max_len: 10 - 3
      request(4, max_context=6),  # 6 - 4
      request(2, max_new_tokens=1, max_context=6),  # min(1, 4)
      request(6, max_context=6),  # does not fit: empty answer, not an error
      request(12),  # longer than the engine's max_len
      request(2, max_context=64),  # max_context beyond the engine's max_len is capped
      request(5, temperature=0.6),
  ])
  assert outputs == ['7', '2', '1', '', '', '8', '5']
  (prompts, limits, temperature, seeds), (_, hot_limits, hot, hot_seeds) = engine.calls
  assert (limits, temperature, seeds) == ([7, 2, 1, 8], 0.0, [3, 4, 2, 2])
  assert (hot_limits, hot, hot_seeds) == ([5], 0.6, [5])
  # A multiple-choice prompt that does not fit scores as an invalid answer.
  example = Example(' '.join(['w'] * 20), 'direct', 0, ('A', 'B'))
  task = evals.MultipleChoiceTask('mc', [example], loglik=False)
  assert evaluate([task], generate_fn) == {'mc': {'n': 1, 'acc': 0.5, 'invalid': 1.0}}


# Harness and tables.

def test_harness_batches_limits_records_and_tables(tmp_path):
  gsm = evals.load_gsm8k(write_jsonl(tmp_path / 'gsm.jsonl', [
      {'question': f'Q{i}', 'answer': f'#### {i}'} for i in range(5)]))
  mmlu_rows = [mmlu_row(f'M{i}', 'x', i % 4) for i in range(3)]
  mmlu = evals.load_mmlu(write_parquet(tmp_path / 'mmlu.parquet', mmlu_rows), num_shots=0)
  generate = FakeGenerate({**{f'Q{i}': f'{i if i < 3 else -1}' for i in range(5)},
                           'M0': 'A', 'M1': 'A', 'M2': 'C'})
  loglik = FakeLoglik({'M0': 'A', 'M1': 'A', 'M2': 'C'})
  records = {}
  results = evaluate([gsm, mmlu], generate, loglik, batch_size=5, records=records)
  assert [len(b) for b in generate.batches] == [5, 3]
  assert [len(b) for b in loglik.batches] == [5, 5, 2]  # 3 questions x 4 choices
  assert results['gsm8k'] == {'n': 5, 'acc': 0.6, 'invalid': 0.0}
  assert results['mmlu']['acc'] == pytest.approx(2 / 3) and results['mmlu']['n'] == 3
  assert records['gsm8k'][1] == {'instruction': 'Q1', 'condition': 'synth,cot', 'target': 1,
                                 'outputs': ['1'], 'scores': {'acc': 1.0, 'invalid': 0.0}}
  assert records['mmlu'][1]['outputs'][0] == 'A' and len(records['mmlu'][1]['outputs']) == 5
  json.dumps(records)  # per-example outputs are JSON

  generate.batches.clear()
  assert evaluate([gsm], generate, limit=2, batch_size=1) == {
      'gsm8k': {'n': 2, 'acc': 1.0, 'invalid': 0.0}}
  assert [len(b) for b in generate.batches] == [1, 1]

  drop = {'n': 10, 'em': 0.25, 'f1': 0.5}
  assert evals.format_table({'gsm8k': results['gsm8k'], 'drop': drop}).splitlines() == [
      'task    n     acc  invalid      em      f1',
      'gsm8k   5  0.6000   0.0000       -       -',
      'drop   10       -        -  0.2500  0.5000',
  ]
  assert evals.scalar_metrics({'drop': drop}) == {'drop/em': 0.25, 'drop/f1': 0.5}
  table = evals.paper_table({'gsm8k': results['gsm8k'], 'drop': drop},
                            {'gsm8k': 'acc', 'drop': 'f1'}, evals.PAPER_TABLE)
  assert list(table) == ['GSM8K', 'MATH', 'DROP', 'MMLU', 'ARC-C', 'HellaSwag', 'Winogrande',
                         'BoolQ']
  assert table['GSM8K'] == pytest.approx(60.0) and table['DROP'] == 50.0 and table['MMLU'] is None
  assert evals.format_paper_table(table).splitlines() == [
      'GSM8K  MATH  DROP  MMLU  ARC-C  HellaSwag  Winogrande  BoolQ',
      ' 60.0     -  50.0     -      -          -           -      -']


def test_harness_errors(tmp_path):
  gsm = evals.load_gsm8k(
      write_jsonl(tmp_path / 'gsm.jsonl', [{'question': 'Q', 'answer': '#### 1'}]))
  with pytest.raises(ValueError, match='needs a generate_fn'):
    evaluate([gsm], loglik_fn=lambda requests: [])
  with pytest.raises(ValueError, match='returned 0 outputs for 1 requests'):
    evaluate([gsm], lambda requests: [])
  with pytest.raises(ValueError, match='unique'):
    evaluate([gsm, gsm], FakeGenerate({}))


def test_bad_input_errors(tmp_path):
  with pytest.raises(ValueError, match=r'gsm\.jsonl: row 2: .*GSM8K'):
    evals.load_gsm8k(write_jsonl(tmp_path / 'gsm.jsonl', [{'question': 'a', 'answer': '#### 1'},
                                                          {'question': 'b'}]))
  with pytest.raises(ValueError, match=r'row 1: .*not one of'):  # the unlabelled test split
    evals.load_winogrande(write_jsonl(tmp_path / 'w.jsonl', [
        {'sentence': 's _', 'option1': 'a', 'option2': 'b', 'answer': ''}]), num_shots=0)
  with pytest.raises(ValueError, match=r'row 1: .*out of range'):
    evals.load_hellaswag(write_jsonl(tmp_path / 'h.jsonl', [
        {'ctx': 'c', 'endings': ['a', 'b'], 'label': 2}]), num_shots=0)
  with pytest.raises(ValueError, match=r'row 1: .*AIME'):
    evals.load_aime(write_jsonl(tmp_path / 'a.jsonl', [{'problem': 'p', 'answer': 'x'}]))
  with pytest.raises(ValueError, match='no such file'):
    evals.load_arc(tmp_path / 'missing.jsonl')
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"question": ')
  with pytest.raises(ValueError, match=r'broken\.jsonl:1: invalid JSON'):
    evals.load_boolq(broken)
  with pytest.raises(ValueError, match='unknown benchmark'):
    evals.load_benchmark('squad', broken)
  boolq = write_jsonl(tmp_path / 'boolq.jsonl',
                      [{'question': 'q', 'passage': 'p', 'answer': 'false'}])
  assert evals.load_benchmark('boolq', boolq, num_shots=0).examples[0].target == 1
