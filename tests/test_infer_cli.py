"""generate / score / evaluate CLIs on a random-weight checkpoint: their outputs equal the engine's
called in-process, and bad input stops them with one line and nothing written."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from hrmtext.data.tokenizer import train_tokenizer
from hrmtext import evals
from hrmtext.evals import evaluate, heldout_tasks
from hrmtext.evals.engine import model_fns
from hrmtext.infer import text
from hrmtext.model import ModelConfig, build_model
from hrmtext import checkpoint
from hrmtext.run import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [f'What is {a} + {b}? The answer is {a + b}. Spell "{w}" backward: {w[::-1]}.'
          for a, b, w in zip(range(0, 400, 7), range(3, 400, 11), ['apple', 'tiger', 'kiwi'] * 30)]
SEQ_LEN = 96


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A prepared data root (tokenizer in sampled/, held-out rows) and a run trained on it: random
  weights whose 'ema' differs from 'params'. The held-out 'echo' task's first response is what
  the checkpoint generates greedily, so its exact match is 0.5, not 0."""
  root = tmp_path_factory.mktemp('cli')
  tok = train_tokenizer(CORPUS * 3, str(root / 'data' / 'sampled'), vocab_size=300,
                        conditions=('direct', 'cot', 'synth'))
  cfg = ModelConfig(vocab_size=512, hidden_size=32, num_heads=2, head_dim=16,
                    intermediate_size=64, layers_per_stack=1)
  model = build_model(cfg)
  params = nn.unbox(model.init(jax.random.key(0)))
  ema = nn.unbox(model.init(jax.random.key(1)))
  mngr = Run(str(root / 'run')).manager(async_save=False)
  checkpoint.save(mngr, 3, meta={'model': cfg.to_dict(), 'tokenizer': str(root / 'data' / 'sampled'),
                                 'config': {'data': {'seq_len': SEQ_LEN}}}, params=params, ema=ema)
  mngr.wait_until_finished()
  mngr.close()
  engine, tok, _ = text.load(str(root / 'run'))
  generate_fn, _ = model_fns(engine, tok)
  echo = generate_fn([{'instruction': 'What is 7 + 8?', 'condition': 'direct'}])[0]
  heldout = root / 'data' / 'raw' / 'heldout'
  heldout.mkdir(parents=True)
  write_rows(heldout / 'echo.jsonl', [
      {'instruction': 'What is 7 + 8?', 'response': echo, 'condition': 'direct', 'answer': echo},
      {'instruction': 'Spell "tiger" backward', 'response': 'regit', 'condition': 'direct',
       'answer': 'regit'}])
  write_rows(heldout / 'add.jsonl', [
      {'instruction': f'What is {a} + 1?', 'response': str(a + 1), 'condition': 'direct',
       'answer': str(a + 1)} for a in range(5)])
  return root


def write_rows(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def cli(name, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', f'hrmtext.{name}', *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0, result.stdout
  assert 'Traceback' not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr
  for fragment in fragments:
    assert fragment in last, last


@pytest.fixture(scope='module')
def engine(run_dir):
  return text.load(str(run_dir / 'run'))[:2]


@pytest.mark.slow
def test_generate_prompt_and_jsonl(run_dir, engine, tmp_path):
  eng, tok = engine
  prompt = tok.encode_instruction('What is 3 + 4?', 'direct')
  want = eng.generate([prompt], 12)[0]
  result = cli('generate', '--checkpoint', run_dir / 'run', '--prompt', 'What is 3 + 4?',
               '--max_new_tokens', 12)
  assert result.returncode == 0, result.stderr
  assert result.stdout.rstrip('\n').splitlines()[-1] == tok.decode(want).rstrip('\n')

  ids_prompt = [5, 17, 40, 2]
  write_rows(tmp_path / 'in.jsonl', [{'instruction': 'What is 3 + 4?', 'id': 'a'},
                                     {'instruction': 'Spell "kiwi" backward', 'condition': 'cot'},
                                     {'instruction_ids': ids_prompt}])
  result = cli('generate', '--checkpoint', run_dir / 'run', '--input', tmp_path / 'in.jsonl',
               '--output', tmp_path / 'out.jsonl', '--max_new_tokens', 12, '--slots', 2)
  assert result.returncode == 0, result.stderr
  rows = read_rows(tmp_path / 'out.jsonl')
  prompts = [prompt, tok.encode_instruction('Spell "kiwi" backward', 'cot'), ids_prompt]
  assert [row['response_ids'] for row in rows] == eng.generate(prompts, 12)
  assert rows[0]['id'] == 'a' and rows[0]['response'] == tok.decode(rows[0]['response_ids'])
  # The raw weights are another model: --noema must change the output.
  result = cli('generate', '--checkpoint', run_dir / 'run', '--input', tmp_path / 'in.jsonl',
               '--output', tmp_path / 'raw.jsonl', '--max_new_tokens', 12, '--noema')
  assert result.returncode == 0, result.stderr
  assert [row['response_ids'] for row in read_rows(tmp_path / 'raw.jsonl')] != [
      row['response_ids'] for row in rows]


@pytest.mark.slow  # with its module fixtures (a trained run), over 15 s
def test_score_text_and_id_rows(run_dir, engine, tmp_path):
  eng, tok = engine
  rows = [{'instruction': 'What is 3 + 4?', 'response': '7'},
          {'instruction': 'Spell "apple" backward', 'response': 'elppa', 'condition': 'cot'},
          {'instruction_ids': [5, 17, 40], 'response_ids': [60, 61, 62, 63]}]
  write_rows(tmp_path / 'pairs.jsonl', rows)
  result = cli('score', '--checkpoint', run_dir / 'run', '--input', tmp_path / 'pairs.jsonl',
               '--output', tmp_path / 'scores.jsonl', '--batch_size', 2)
  assert result.returncode == 0, result.stderr
  got = read_rows(tmp_path / 'scores.jsonl')
  want = eng.score([(tok.encode_instruction('What is 3 + 4?', 'direct'), tok.encode_response('7')),
                    (tok.encode_instruction('Spell "apple" backward', 'cot'),
                     tok.encode_response('elppa')), ([5, 17, 40], [60, 61, 62, 63])])
  for row, original, (logprob, count, greedy) in zip(got, rows, want):
    assert {k: row[k] for k in original} == original
    assert row['logprob'] == pytest.approx(logprob, rel=1e-5, abs=1e-4) and row['logprob'] < 0
    assert (row['num_tokens'], row['greedy']) == (count, greedy)
  assert got[0]['num_tokens'] == len(tok.encode_response('7'))  # the end-of-answer is scored
  assert got[2]['num_tokens'] == 4  # id rows are scored as given


@pytest.mark.slow
def test_evaluate_heldout(run_dir, engine, tmp_path):
  result = cli('evaluate', '--checkpoint', run_dir / 'run', '--limit', 2, '--output_dir',
               tmp_path / 'out')
  assert result.returncode == 0, result.stderr
  with open(tmp_path / 'out' / 'results.json') as f:
    got = json.load(f)['results']
  assert sorted(got) == ['add', 'echo'] and got['add']['n'] == got['echo']['n'] == 2
  assert got['echo']['exact_match'] == 0.5, got
  eng, tok = engine
  assert got == evaluate(heldout_tasks(str(run_dir / 'data')), *model_fns(eng, tok),
                         limit=2, progress=False)
  assert 'echo' in result.stdout and 'exact_match' in result.stdout
  assert len(read_rows(tmp_path / 'out' / 'outputs' / 'echo.jsonl')) == 2


@pytest.mark.slow
def test_evaluate_benchmarks_with_shots_files(run_dir, tmp_path):
  """The paper's table from MMLU (dev shots file) and GSM8K on the tiny checkpoint: printed,
  written as JSON beside the per-example outputs, equal to the harness called in-process."""
  mmlu_row = lambda q, subject, answer: {'question': q, 'subject': subject, 'answer': answer,
                                         'choices': ['apple', 'tiger', 'kiwi', '7']}
  write_rows(tmp_path / 'mmlu_dev.jsonl', [mmlu_row(f'Spell "w{i}"?', s, i % 4)
                                           for i in range(3) for s in ('algebra', 'virology')])
  write_rows(tmp_path / 'mmlu_test.jsonl', [mmlu_row('What is 7 + 8?', 'algebra', 3),
                                            mmlu_row('Spell "kiwi"', 'virology', 2)])
  write_rows(tmp_path / 'gsm8k.jsonl', [{'question': 'What is 7 + 8?', 'answer': 'so\n#### 15'}])
  out = tmp_path / 'out'
  result = cli('evaluate', '--checkpoint', run_dir / 'run', '--max_len', 256, '--benchmarks',
               f'mmlu={tmp_path / "mmlu_test.jsonl"},gsm8k={tmp_path / "gsm8k.jsonl"}',
               '--shots', f'mmlu={tmp_path / "mmlu_dev.jsonl"}', '--output_dir', out)
  assert result.returncode == 0, result.stderr
  with open(out / 'results.json') as f:
    written = json.load(f)
  table = written['paper_table']
  assert list(table) == ['GSM8K', 'MATH', 'DROP', 'MMLU', 'ARC-C', 'HellaSwag', 'Winogrande',
                         'BoolQ']
  assert table['MATH'] is None and table['MMLU'] == 100 * written['results']['mmlu']['acc']
  assert table['GSM8K'] == 100 * written['results']['gsm8k']['acc']
  assert sorted(written['results']['mmlu']['subsets']) == ['algebra', 'virology']
  assert 'GSM8K  MATH  DROP  MMLU' in result.stdout
  mmlu_outputs = read_rows(out / 'outputs' / 'mmlu.jsonl')
  assert len(mmlu_outputs) == 2 and mmlu_outputs[0]['instruction'].count('Answer: ') == 3
  assert len(mmlu_outputs[0]['outputs']) == 5  # the generated letter + 4 choice log-likelihoods
  eng, tok, _ = text.load(str(run_dir / 'run'), max_len=256)
  tasks = [evals.load_mmlu(tmp_path / 'mmlu_test.jsonl', shots_path=tmp_path / 'mmlu_dev.jsonl'),
           evals.load_gsm8k(tmp_path / 'gsm8k.jsonl')]
  assert written['results'] == evaluate(tasks, *model_fns(eng, tok), progress=False)


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path):
  checkpoint_flag = ('--checkpoint', run_dir / 'run')
  out = tmp_path / 'out.jsonl'
  (tmp_path / 'bad.jsonl').write_text('{"instruction": "hi"}\n{"instruction": \n')
  assert_one_line_error(cli('generate', *checkpoint_flag, '--input', tmp_path / 'bad.jsonl',
                            '--output', out), 'bad.jsonl:2')
  write_rows(tmp_path / 'noresp.jsonl', [{'instruction': 'hi', 'response': 'yo'},
                                         {'instruction': 'hi'}])
  assert_one_line_error(cli('score', *checkpoint_flag, '--input', tmp_path / 'noresp.jsonl',
                            '--output', out), 'noresp.jsonl:2', 'response')
  write_rows(tmp_path / 'ids.jsonl', [{'instruction_ids': [1, 100000], 'response_ids': [5]}])
  assert_one_line_error(cli('score', *checkpoint_flag, '--input', tmp_path / 'ids.jsonl',
                            '--output', out), 'ids.jsonl:1', 'token ids')
  assert_one_line_error(cli('generate', *checkpoint_flag, '--prompt', 'x ' * 200), '--max_len')
  assert_one_line_error(cli('score', *checkpoint_flag, '--input', tmp_path / 'ids.jsonl',
                            '--output', out, '--mesh.fsdp=2'), 'does not fit the 1 devices')
  assert_one_line_error(cli('evaluate', '--checkpoint', tmp_path / 'nowhere'), 'no checkpoint')
  assert_one_line_error(cli('evaluate', *checkpoint_flag, '--output_dir',
                            tmp_path / 'bad.jsonl' / 'out'), 'cannot write')  # under a file
  assert_one_line_error(cli('evaluate', *checkpoint_flag, '--benchmarks', 'gsm8k=g.jsonl',
                            '--shots', 'gsm8k=s.jsonl'), 'only few-shot')
  assert sorted(os.listdir(tmp_path)) == ['bad.jsonl', 'ids.jsonl', 'noresp.jsonl']


@pytest.mark.parametrize('name', ['generate', 'score', 'evaluate'])
def test_help(name):
  result = cli(name, '--help')  # absl exits 1 after printing the help
  assert f'python -m hrmtext.{name}' in result.stdout and '--checkpoint' in result.stdout, (
      result.stdout + result.stderr)
