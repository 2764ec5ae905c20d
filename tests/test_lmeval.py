"""The lm-evaluation-harness model, offline: local task YAMLs (dataset_path json, data files the
test writes) run by lm-eval on a tiny checkpoint give the log-likelihoods of `hrmtext.score` and
the generations of `hrmtext.generate` (the engine calls those CLIs make)."""
import pytest

lm_eval = pytest.importorskip('lm_eval', reason="lm_eval is not installed: pip install -e '.[lmeval]'")

from hrmtext.infer import text  # noqa: E402
from tests.test_infer_cli import run_dir, write_rows  # noqa: E402,F401

QUESTIONS = [
    {'question': 'What is 7 + 8?', 'choices': ['15', '16', 'apple'], 'answer': 0},
    {'question': 'Spell "kiwi" backward:', 'choices': ['iwik', 'kiwi'], 'answer': 0},
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{extra}
"""
TASKS = {
    'hrm_tiny_mc': ('multiple_choice', 'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
                    'metric_list:\n  - metric: acc'),
    'hrm_tiny_gen': ('generate_until', 'doc_to_target: "{{choices[answer]}}"\n'
                     'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
                     'metric_list:\n  - metric: exact_match'),
    'hrm_tiny_rolling': ('loglikelihood_rolling', 'doc_to_target: "{{question}}"\n'
                         'metric_list:\n  - metric: word_perplexity'),
}


def test_lm_eval_tasks_equal_score_and_generate(run_dir, tmp_path, monkeypatch):  # noqa: F811
  import hrmtext.lmeval  # registers 'hrmtext'
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  data = tmp_path / 'questions.jsonl'
  write_rows(data, QUESTIONS)
  (tmp_path / 'tasks').mkdir()
  for name, (output_type, extra) in TASKS.items():
    (tmp_path / 'tasks' / f'{name}.yaml').write_text(
        TASK_YAML.format(name=name, data=data, output_type=output_type, extra=extra))
  checkpoint = run_dir / 'run'
  results = lm_eval.simple_evaluate(
      model='hrmtext', model_args=f'checkpoint={checkpoint},condition=direct', tasks=list(TASKS),
      task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path / 'tasks')),
      log_samples=True, batch_size=2)
  samples = results['samples']
  engine, tok, _ = text.load(str(checkpoint))

  # loglikelihood (multiple choice) and loglikelihood_rolling: Engine.score, what
  # `hrmtext.score` prints (tests/test_infer_cli.py checks that CLI against the engine).
  pairs = [req for s in samples['hrm_tiny_mc'] for req in s['arguments']]
  rolling = [s['arguments'][0][0] for s in samples['hrm_tiny_rolling']]
  assert len(pairs) == 5 and rolling == [q['question'] for q in QUESTIONS]
  ids = [(tok.encode_instruction(context, 'direct'), tok.encode(continuation))
         for context, continuation in pairs]
  ids += [(tok.encode_instruction('', 'direct'), tok.encode(t)) for t in rolling]
  want = engine.score(ids)
  got = [resp[0] for s in samples['hrm_tiny_mc'] for resp in s['resps']]
  assert [logprob for logprob, _ in got] == pytest.approx([w[0] for w in want[:5]], rel=1e-6)
  assert [greedy for _, greedy in got] == [w[2] for w in want[:5]]
  assert [s['resps'][0][0] for s in samples['hrm_tiny_rolling']] == pytest.approx(
      [w[0] for w in want[5:]], rel=1e-6)

  # generate_until: Engine.generate (`hrmtext.generate`), greedy, cut at the task's stop string.
  contexts = [s['arguments'][0][0] for s in samples['hrm_tiny_gen']]
  generated = engine.generate([tok.encode_instruction(c, 'direct') for c in contexts], 6)
  want = [hrmtext.lmeval.truncate_at_stops(tok.decode(g), ['.']) for g in generated]
  assert [s['resps'][0][0] for s in samples['hrm_tiny_gen']] == want
  assert 'acc,none' in results['results']['hrm_tiny_mc']


def test_truncate_at_stops():
  from hrmtext.lmeval import truncate_at_stops
  assert truncate_at_stops('a. b\n\nc', ['\n\n', '.']) == 'a'
  assert truncate_at_stops('abc', ['x', '']) == 'abc'
