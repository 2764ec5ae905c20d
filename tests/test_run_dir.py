"""The run directory (hrmtext.run) is all a run's readers need: after its data folder moves away,
generate, score, evaluate, convert and a resumed train (on the data's new place) still work; runs
saved before the run kept its tokenizer still load."""
import json
import os
import shutil

import pytest

from hrmtext.data.tokenizer import Tokenizer, train_tokenizer
from hrmtext.errors import UserError
from hrmtext.run import Run
from tests.test_infer_cli import CORPUS, cli, read_rows, write_rows
from tests.test_train import (assert_ok, assert_one_line_error, assert_trees_equal,
                              finalized_steps, load, make_fixture_data, run_train, tiny_overrides)

# 8 steps, a checkpoint every 4 (both kept): the resume test starts from step 4.
STEPS = ['--config.train.steps=8', '--config.checkpoint.every_steps=4',
         '--config.checkpoint.keep=2']


def make_data(root, texts=CORPUS * 3):
  """A prepared root: the fixture's sampled set, tokenized (as it says) with a real sentencepiece
  tokenizer in <root>/tokenizer, and one held-out task."""
  make_fixture_data(root / 'sampled')
  tok = train_tokenizer(texts, str(root / 'tokenizer'), vocab_size=300,
                        conditions=('direct', 'cot', 'synth'))
  metadata = json.loads((root / 'sampled' / 'metadata.json').read_text())
  metadata['tokenizer_info'] = tok.info_relative_to(str(root / 'sampled'))
  (root / 'sampled' / 'metadata.json').write_text(json.dumps(metadata))
  (root / 'raw' / 'heldout').mkdir(parents=True)
  write_rows(root / 'raw' / 'heldout' / 'echo.jsonl', [
      {'instruction': 'What is 7 + 8?', 'response': '15', 'condition': 'direct'}])
  return tok


@pytest.fixture(scope='module')
def moved(tmp_path_factory):
  """(run, resumable copy without its last step, the data's new place): a run trained on data
  that was moved away after training."""
  root = tmp_path_factory.mktemp('run_dir')
  make_data(root / 'data')
  assert_ok(run_train(root / 'run', *tiny_overrides(root / 'data', *STEPS)))
  assert finalized_steps(root / 'run') == [4, 8]
  shutil.copytree(root / 'run', root / 'resumed')
  shutil.rmtree(root / 'resumed' / 'checkpoints' / '8')
  os.rename(root / 'data', root / 'moved')
  return root / 'run', root / 'resumed', root / 'moved'


@pytest.mark.slow
def test_generate_and_score_need_no_data(moved, tmp_path):
  run, _, _ = moved
  assert sorted(os.listdir(run / 'tokenizer')) == ['spm.model', 'tokenizer_info.json']
  result = cli('generate', '--checkpoint', run, '--prompt', 'What is 3 + 4?',
               '--max_new_tokens', 4)
  assert result.returncode == 0, result.stderr
  write_rows(tmp_path / 'pairs.jsonl', [{'instruction': 'What is 3 + 4?', 'response': '7'}])
  result = cli('score', '--checkpoint', run, '--input', tmp_path / 'pairs.jsonl', '--output',
               tmp_path / 'scores.jsonl')
  assert result.returncode == 0, result.stderr
  assert read_rows(tmp_path / 'scores.jsonl')[0]['logprob'] < 0


@pytest.mark.slow
def test_evaluate_says_where_the_data_was(moved, tmp_path):
  """Without --benchmarks, the held-out tasks of the data the run trained on: gone, that is one
  line; the benchmarks, or the held-out set at its new place, evaluate."""
  run, _, data = moved
  assert_one_line_error(cli('evaluate', '--checkpoint', run),
                        f'{run.parent / "data"}, is gone', '--heldout')
  write_rows(tmp_path / 'gsm8k.jsonl', [{'question': 'What is 7 + 8?', 'answer': 'so\n#### 15'}])
  result = cli('evaluate', '--checkpoint', run, '--benchmarks', f'gsm8k={tmp_path / "gsm8k.jsonl"}',
               '--output_dir', tmp_path / 'out')
  assert result.returncode == 0, result.stderr
  assert list(json.loads((tmp_path / 'out' / 'results.json').read_text())['results']) == ['gsm8k']
  result = cli('evaluate', '--checkpoint', run, '--heldout', data, '--limit', 1)
  assert result.returncode == 0, result.stderr
  assert 'echo' in result.stdout


@pytest.mark.slow
def test_convert_exports_the_run_s_tokenizer(moved, tmp_path):
  run, _, _ = moved
  assert_ok(cli('convert', '--src', run, '--dst', tmp_path / 'hf'))
  exported = Tokenizer.load(str(tmp_path / 'hf'))
  assert exported.same_as(Tokenizer.load(str(run / 'tokenizer')))
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['eos_token_id'] == exported.eoa


@pytest.mark.slow
def test_resume_on_the_moved_data_is_exact(moved):
  """The resumed run checks the data's tokenizer against its own copy, and trains on as the
  uninterrupted run did; data made with another tokenizer is refused in one line."""
  run, resumed, data = moved
  assert_one_line_error(run_train(resumed, *tiny_overrides(run.parent / 'data', *STEPS)),
                        str(run.parent / 'data'))  # still pointing at the old place
  other = run.parent / 'other'
  make_data(other, texts=[text.upper() for text in CORPUS * 3])
  assert_one_line_error(run_train(resumed, *tiny_overrides(other, *STEPS)),
                        'the data was tokenized with', 'not with the tokenizer of the run')
  assert finalized_steps(resumed) == [4]
  result = run_train(resumed, *tiny_overrides(data, *STEPS))
  assert_ok(result)
  assert f'resuming from {resumed / "checkpoints"} step 4' in result.stdout
  for use_ema in (False, True):
    assert_trees_equal(load(resumed, use_ema)[1], load(run, use_ema)[1])
  meta = load(resumed, True)[2]
  assert meta['data_dir'] == str(data) and 'tokenizer' not in meta


# ---- older runs -------------------------------------------------------------------------------

def test_older_runs_tokenizer_and_data_root(tmp_path):
  """Before the run kept its tokenizer: a trained run's meta named its sampled set, an imported
  one's tokenizer_info.json lay beside checkpoints/."""
  tok = train_tokenizer(CORPUS, str(tmp_path / 'data' / 'sampled'), vocab_size=300,
                        conditions=('direct',))
  trained = Run(str(tmp_path / 'trained' / 'checkpoints'))  # a checkpoints/ folder is its run's
  assert trained.path == str(tmp_path / 'trained')
  meta = {'tokenizer': str(tmp_path / 'data' / 'sampled')}
  assert trained.tokenizer(meta).same_as(tok)
  assert trained.data_dir(meta) == str(tmp_path / 'data')
  assert trained.data_dir({'tokenizer': str(tmp_path / 'set')}) == str(tmp_path / 'set')
  shutil.move(tmp_path / 'data', tmp_path / 'moved')
  with pytest.raises(UserError, match='keeps no tokenizer of its own .* is gone; pass --tokenizer'):
    trained.tokenizer(meta)

  imported = Run(str(tmp_path / 'imported'))
  assert imported.tokenizer({}) is None and imported.data_dir({}) is None
  shutil.copytree(tmp_path / 'moved' / 'sampled', tmp_path / 'imported' / 'hf_files')
  info = dict(tok.info, tokenizer_path=os.path.join('hf_files', 'spm.model'))
  (tmp_path / 'imported' / 'tokenizer_info.json').write_text(json.dumps(info))
  assert imported.tokenizer({}).same_as(Tokenizer.load(str(tmp_path / 'moved' / 'sampled')))
  assert Run(str(tmp_path / 'new')).data_dir({'data_dir': '/data', 'tokenizer': '/x'}) == '/data'


@pytest.mark.slow
def test_init_from_refuses_data_of_another_tokenizer(moved, tmp_path):
  """Fine-tuning a run on data tokenized otherwise would read its token ids as other words."""
  run, _, data = moved
  other = tmp_path / 'other'
  make_data(other, texts=[text.upper() for text in CORPUS * 3])
  assert_one_line_error(run_train(tmp_path / 'tuned', *tiny_overrides(other, *STEPS),
                                  f'--config.init_from={run}'),
                        'init_from: the data was tokenized with', 'not with the tokenizer of the run')
  assert finalized_steps(tmp_path / 'tuned') == []
  assert_ok(run_train(tmp_path / 'same', *tiny_overrides(data, '--config.train.steps=1'),
                      f'--config.init_from={run}'))
