"""Evaluation library: loaders on tiny files in each public format, prompts, answer extraction,
scorers, the batching harness and the table, driven by fake model callables."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hrmtext import evals
from hrmtext.evals import scoring
from hrmtext.evals.tasks import Example, MultipleChoiceTask


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
  """Answers the question containing a key of `answers` with its value; records the batches."""

  def __init__(self, answers, default='no idea'):
    self.answers, self.default, self.batches = answers, default, []

  def __call__(self, requests):
    self.batches.append(requests)
    return [next((v for k, v in self.answers.items() if k in query_of(r)), self.default)
            for r in requests]


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


# Scoring.

@pytest.mark.parametrize('text, answer', [
    ('so x = \\boxed{\\frac{1}{2}} then \\boxed{x^{2}}', 'x^{2}'),
    ('steps\n#### 1,234\nextra 5', '1,234'),
    ('\\boxed{7} ... #### 8', '7'),
    ('it costs $5.50, wait, 6 in total.', '6'),
    ('we get 3.5.', '3.5'),
    ('no answer here', None),
    ('cut off \\boxed{12', '12'),
])
def test_extract_final_answer(text, answer):
  assert scoring.extract_final_answer(text) == answer


@pytest.mark.parametrize('prediction, gold, match', [
    ('1,200', '1200', True),
    ('$1200.00', '1200', True),
    ('\\dfrac{1}{2}', '\\frac12', True),
    ('0.5', '\\frac{1}{2}', True),
    ('-\\frac{3}{4}', '-0.75', True),
    ('5\\text{ cm}', '5', True),
    ('30^\\circ', '30', True),
    ('x = 3', '3', True),
    ('\\left( 1, 2 \\right)', '(1,2)', True),
    ('x^2 + 1', 'x^2+1', True),
    ('12', '1,2', False),
    ('1/3', '0.33', False),
    (None, '3', False),
])
def test_answers_match(prediction, gold, match):
  assert scoring.answers_match(prediction, gold) == match


def test_drop_em_f1():
  assert scoring.drop_em_f1(['The Lions', 'Bucs'], ['bucs', 'lions']) == (1.0, 1.0)
  em, f1 = scoring.drop_em_f1(['Tom Brady'], ['Brady'])
  assert em == 0.0 and f1 == pytest.approx(2 / 3)
  # One of two gold spans found: half of the aligned F1.
  assert scoring.drop_em_f1(['Lions'], ['Lions', 'Bucs']) == (0.0, 0.5)
  # Numbers must match: word overlap alone does not count.
  assert scoring.drop_em_f1(['3 yards'], ['4 yards']) == (0.0, 0.0)
  assert scoring.drop_em_f1(['3.0'], ['3']) == (1.0, 1.0)
  assert scoring.drop_match('three', [('3',), ('three',)]) == {'em': 1.0, 'f1': 1.0}


def test_multiple_choice_scores():
  example = Example('q', 'direct', 1, ('ab', 'abcdef'))
  task = MultipleChoiceTask('mc', [example])
  assert task.requests(example) == [
      {'instruction': 'q', 'condition': 'direct', 'response': 'ab'},
      {'instruction': 'q', 'condition': 'direct', 'response': 'abcdef'}]
  # Summed log-prob prefers the short choice, per character the long (right) one.
  assert task.score(example, [(-2.0, True), (-3.0, False)]) == {
      'acc': 0.0, 'acc_norm': 1.0, 'acc_greedy': 0.0}
  assert task.score(example, [(-9.0, False), (-3.0, True)]) == {
      'acc': 1.0, 'acc_norm': 1.0, 'acc_greedy': 1.0}


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
                         'max_new_tokens': 77}
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
  assert task.examples[0] == Example('Question Q0?', 'synth,cot', '1,200')
  generate = FakeGenerate({
      'Q0': 'Total is \\boxed{1200}.',
      'Q1': '2 + 3 = 5\n#### 5',
      'Q2': 'So the answer is -3.',
      'Q3': '#### 8',
      'Q4': 'I cannot tell.',
  })
  assert evaluate([task], generate) == {'gsm8k': {'n': 5, 'acc': 0.6, 'invalid': 0.2}}
  assert generate.batches[0][0]['max_new_tokens'] == 2048


def test_math(tmp_path):
  rows = [
      {'problem': 'Alg A0', 'solution': 'Half: $\\boxed{\\frac{1}{2}}$.', 'type': 'Algebra'},
      {'problem': 'Alg A1', 'solution': 'It is $\\boxed{5}$.', 'type': 'Algebra'},
      {'problem': 'Alg A2', 'solution': '$\\boxed{x^2+1}$', 'type': 'Algebra'},
      {'problem': 'Geo G0', 'solution': 'The angle is $\\boxed{30^\\circ}$.', 'type': 'Geometry'},
  ]
  task = evals.load_math(write_parquet(tmp_path / 'math.parquet', rows))
  assert [e.target for e in task.examples] == ['\\frac{1}{2}', '5', 'x^2+1', '30^\\circ']
  generate = FakeGenerate({'A0': '\\boxed{\\dfrac{1}{2}}', 'A1': '\\boxed{6}',
                           'A2': '$\\boxed{x^2 + 1}$', 'G0': 'so \\boxed{30}'})
  result = evaluate([task], generate)['math']
  assert result['n'] == 4 and result['acc'] == 0.75 and result['invalid'] == 0.0
  assert result['subsets']['Algebra']['acc'] == pytest.approx(2 / 3)
  assert result['subsets']['Geometry'] == {'n': 1, 'acc': 1.0, 'invalid': 0.0}
  assert result['acc_macro'] == pytest.approx((2 / 3 + 1) / 2)
  # MATH-500 style: an explicit answer field wins over the solution.
  path = write_jsonl(tmp_path / 'math500.jsonl',
                     [{'problem': 'p', 'solution': '\\boxed{1}', 'answer': '2'}])
  assert evals.load_math(path).examples[0].target == '2'


# Multiple-choice benchmarks.

def mmlu_row(question, subject, answer):
  return {'question': question, 'subject': subject,
          'choices': [f'{question}-{c}' for c in 'abcd'], 'answer': answer}


def test_mmlu_hf_parquet_with_dev_shots(tmp_path):
  dev = write_parquet(tmp_path / 'dev.parquet', [
      mmlu_row('astroD0', 'astronomy', 1), mmlu_row('histD0', 'history', 2),
      mmlu_row('astroD1', 'astronomy', 0), mmlu_row('astroD2', 'astronomy', 3),
      mmlu_row('histD1', 'history', 0)])
  test = write_parquet(tmp_path / 'test.parquet', [
      mmlu_row('astroT0', 'astronomy', 2), mmlu_row('astroT1', 'astronomy', 3),
      mmlu_row('histT0', 'history', 1)])
  task = evals.load_mmlu(test, shots_path=dev, num_shots=2, shots_per_subject={'history': 1})
  assert [e.target for e in task.examples] == [2, 3, 1]
  assert task.examples[0].choices == ('A', 'B', 'C', 'D')
  assert task.examples[0].instruction == (
      'astroD0\nA. astroD0-a\nB. astroD0-b\nC. astroD0-c\nD. astroD0-d\nAnswer: B\n\n'
      'astroD1\nA. astroD1-a\nB. astroD1-b\nC. astroD1-c\nD. astroD1-d\nAnswer: A\n\n'
      'astroT0\nA. astroT0-a\nB. astroT0-b\nC. astroT0-c\nD. astroT0-d\nAnswer:')
  assert task.examples[2].instruction == (
      'histD0\nA. histD0-a\nB. histD0-b\nC. histD0-c\nD. histD0-d\nAnswer: C\n\n'
      'histT0\nA. histT0-a\nB. histT0-b\nC. histT0-c\nD. histT0-d\nAnswer:')
  assert task.examples[2].condition == 'direct'

  loglik = FakeLoglik({'astroT0': 'C', 'astroT1': 'A', 'histT0': 'B'})  # astroT1 wrong
  result = evaluate([task], loglik_fn=loglik)['mmlu']
  assert result['n'] == 3 and result['acc'] == pytest.approx(2 / 3)
  assert result['acc_norm'] == result['acc_greedy'] == result['acc']
  assert result['subsets']['astronomy']['acc'] == 0.5
  assert result['subsets']['history']['acc'] == 1.0
  assert result['acc_macro'] == 0.75


def test_mmlu_original_csv_folder(tmp_path):
  folder = tmp_path / 'test'
  write_csv(folder / 'college_physics_test.csv', [['What is g?', '9.8', '1', '0', '3', 'A'],
                                                  ['What is c?', '1', '3e8', '0', '2', 'B']])
  write_csv(folder / 'virology_test.csv', [['Virus?', 'yes', 'no', 'maybe', 'never', 'C'],
                                           ['Cell?', 'w', 'x', 'y', 'z', 'D']])
  task = evals.load_mmlu(folder, num_shots=1)  # no dev file: each subject's first row is its shot
  assert [(e.subset, e.target) for e in task.examples] == [('college_physics', 1), ('virology', 3)]
  assert task.examples[0].instruction == ('What is g?\nA. 9.8\nB. 1\nC. 0\nD. 3\nAnswer: A\n\n'
                                          'What is c?\nA. 1\nB. 3e8\nC. 0\nD. 2\nAnswer:')
  # A header row and a "choices" list literal (an HF export to CSV).
  path = write_csv(tmp_path / 'hf.csv', [['question', 'subject', 'choices', 'answer'],
                                         ['Q?', 'anatomy', "['a', 'b', 'c']", '2']])
  example, = evals.load_mmlu(path, num_shots=0).examples
  assert (example.subset, example.target, example.choices) == ('anatomy', 2, ('A', 'B', 'C'))


def arc_original_row(stem, texts, labels, key):
  choices = [{'text': t, 'label': l} for t, l in zip(texts, labels)]
  return {'question': {'stem': stem, 'choices': choices}, 'answerKey': key}


def test_arc_both_formats_and_text_style(tmp_path):
  original = write_jsonl(tmp_path / 'ARC-Challenge-Test.jsonl', [
      arc_original_row('Stem S0', ['rock', 'water', 'fire'], ['1', '2', '3'], '2'),
      arc_original_row('Stem S1', ['sun', 'moon'], ['A', 'B'], 'A')])
  hf = write_parquet(tmp_path / 'arc.parquet', [
      {'question': 'Stem S2', 'answerKey': 'C',
       'choices': {'text': ['red', 'green', 'blue', 'black'], 'label': ['A', 'B', 'C', 'D']}}])
  task = evals.load_arc(original, num_shots=1, choice_style='text')  # row 0 becomes the shot
  example, = task.examples
  assert example.instruction == 'Stem S0\nAnswer: water\n\nStem S1\nAnswer:'
  assert (example.choices, example.target) == (('sun', 'moon'), 0)
  example, = evals.load_arc(hf, shots_path=original, num_shots=2).examples
  assert example.target == 2 and example.choices == ('A', 'B', 'C', 'D')
  assert example.instruction == (
      'Stem S0\nA. rock\nB. water\nC. fire\nAnswer: B\n\n'
      'Stem S1\nA. sun\nB. moon\nAnswer: A\n\n'
      'Stem S2\nA. red\nB. green\nC. blue\nD. black\nAnswer:')
  with pytest.raises(ValueError, match='choice style'):
    evals.load_arc(hf, num_shots=0, choice_style='cloze')


def test_boolq_hellaswag_winogrande(tmp_path):
  boolq = write_jsonl(tmp_path / 'boolq.jsonl', [
      {'question': 'is the sky blue', 'passage': 'The sky is blue.', 'answer': True},
      {'question': 'is grass red', 'passage': 'Grass is green.', 'answer': False}])
  task = evals.load_boolq(boolq, num_shots=0)
  assert [e.target for e in task.examples] == [0, 1]
  assert task.examples[0].instruction == (
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
  example, = evals.load_hellaswag(hellaswag_original, num_shots=0, choice_style='text').examples
  assert example.instruction == (
      'A dog barks.\nQuestion: Which is the most logical continuation?\nAnswer:')
  assert (example.choices, example.target) == (('It sleeps.', 'It meows.'), 0)

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

  tasks = [evals.load_boolq(boolq, num_shots=0),
           evals.load_winogrande(winogrande, num_shots=0, choice_style='text')]
  loglik = FakeLoglik({'sky': 'A', 'grass': 'A', 'kind': 'Ann', 'hard': 'cup'})
  results = evaluate(tasks, loglik_fn=loglik)
  assert results['boolq'] == {'n': 2, 'acc': 0.5, 'acc_norm': 0.5, 'acc_greedy': 0.5}
  assert results['winogrande'] == {'n': 2, 'acc': 1.0, 'acc_norm': 1.0, 'acc_greedy': 1.0}


# DROP.

def test_drop_hf_format_few_shot(tmp_path):
  rows = [
      {'passage': 'Passage one.', 'question': 'q0', 'answers_spans': {'spans': ['3']}},
      {'passage': 'Passage one.', 'question': 'q1', 'answers_spans': {'spans': ['7', 'seven']}},
      {'passage': 'Passage two.', 'question': 'q2', 'answers_spans': {'spans': ['Lions', 'Bucs']}},
      {'passage': 'Passage three.', 'question': 'q3', 'answers_spans': {'spans': ['Tom Brady']}},
      {'passage': 'Passage three.', 'question': 'q4', 'answers_spans': {'spans': ['12']}},
  ]
  task = evals.load_drop(write_jsonl(tmp_path / 'drop.jsonl', rows), num_shots=2)
  # Shots: the first rows with distinct passages (q0, q2); they are not evaluated.
  assert [e.target for e in task.examples] == [(('7',), ('seven',)), (('Tom Brady',),), (('12',),)]
  assert task.examples[0].instruction == (
      'Passage one.\nQ: q0\nA: 3\n\nPassage two.\nQ: q2\nA: Lions\n\nPassage one.\nQ: q1\nA:')
  assert task.examples[0].condition == 'direct'
  generate = FakeGenerate({'q1': ' seven ', 'q3': 'Brady', 'q4': '13'})
  result = evaluate([task], generate)['drop']
  assert result['n'] == 3
  assert result['em'] == pytest.approx(1 / 3)
  assert result['f1'] == pytest.approx((1 + 2 / 3 + 0) / 3)


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


# Harness and table.

def test_harness_batches_limits_and_table(tmp_path):
  gsm = evals.load_gsm8k(write_jsonl(tmp_path / 'gsm.jsonl', [
      {'question': f'Q{i}', 'answer': f'#### {i}'} for i in range(5)]))
  mmlu_rows = [mmlu_row(f'M{i}', 'x', i % 4) for i in range(3)]
  mmlu = evals.load_mmlu(write_parquet(tmp_path / 'mmlu.parquet', mmlu_rows), num_shots=0)
  generate = FakeGenerate({f'Q{i}': f'#### {i if i < 3 else -1}' for i in range(5)})
  loglik = FakeLoglik({'M0': 'A', 'M1': 'A', 'M2': 'C'})
  results = evaluate([gsm, mmlu], generate, loglik, batch_size=5)
  assert [len(b) for b in generate.batches] == [5]
  assert [len(b) for b in loglik.batches] == [5, 5, 2]  # 3 questions x 4 choices
  assert results['gsm8k'] == {'n': 5, 'acc': 0.6, 'invalid': 0.0}
  assert results['mmlu']['acc'] == pytest.approx(2 / 3) and results['mmlu']['n'] == 3

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
  with pytest.raises(ValueError, match='no such file'):
    evals.load_arc(tmp_path / 'missing.jsonl')
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"question": ')
  with pytest.raises(ValueError, match='cannot read'):
    evals.load_boolq(broken)
  with pytest.raises(ValueError, match='unknown benchmark'):
    evals.load_benchmark('squad', broken)
  boolq = write_jsonl(tmp_path / 'boolq.jsonl',
                      [{'question': 'q', 'passage': 'p', 'answer': 'false'}])
  assert evals.load_benchmark('boolq', boolq, num_shots=0).examples[0].target == 1
