"""`python -m hrmtext.rl` end to end on a tiny model trained on the small built-in corpus: what a
step logs and saves, the held-out greedy eval before and after, bitwise resume after kill -9,
one-line errors; the built-in RL prompt split is disjoint from the training and held-out rows;
experiments/rl_probe.py. All but the probe's arithmetic are `slow`: the module's fixture
prepares data, trains and runs RL (about a minute), and a compile alone takes 25 s."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train import (REPO, assert_ok, assert_one_line_error, assert_trees_equal,
                              finalized_steps, load, metric_rows, prepare_small_builtin,
                              read_metrics, run_train, train_env, wait_for)

SEQ_LEN = 128
STEPS = 4
TASKS = ('gcd', 'syllogism')


def rl_command(workdir, *overrides):
  return [sys.executable, '-m', 'hrmtext.rl', f'--config={REPO}/experiments/rl.py',
          f'--workdir={workdir}', *map(str, overrides)]


def run_rl(workdir, *overrides, timeout=400):
  return subprocess.run(rl_command(workdir, *overrides), cwd=REPO, env=train_env(),
                        capture_output=True, text=True, timeout=timeout)


def start_rl(workdir, *overrides) -> subprocess.Popen:
  """An RL process in the background; stdout and stderr go to `<workdir>.log`."""
  with open(f'{workdir}.log', 'w') as log:  # the child holds its own descriptor
    return subprocess.Popen(rl_command(workdir, *overrides), cwd=REPO, env=train_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def signal_after_step(workdir, overrides, step: int, sig) -> subprocess.Popen:
  """An RL run sent `sig` once it logged `step`."""
  proc = start_rl(workdir, *overrides)
  wait_for(lambda: any(r['step'] == step for r in metric_rows(workdir)), proc, f'step {step}')
  proc.send_signal(sig)
  return proc


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(data root, a 10-step tiny run on it, a prompts file, the RL overrides)."""
  root = tmp_path_factory.mktemp('rl')
  data = prepare_small_builtin(root)
  init = root / 'init'
  assert_ok(run_train(init, f'--config.data.dir={data}', f'--config.data.seq_len={SEQ_LEN}',
                      '--config.model.hidden_size=32', '--config.model.head_dim=16',
                      '--config.train.steps=10', f'--config.train.global_batch_tokens={4 * SEQ_LEN}',
                      '--config.eval.every_steps=10'))
  # Built-in prompts of two tasks, rewarded by a user verifier that a random policy meets half
  # the time (the built-in verifiers would give this model 0 everywhere: no signal).
  prompts = root / 'prompts.jsonl'
  rows = []
  for task in TASKS:
    with open(data / 'raw' / 'rl' / f'{task}.jsonl') as f:
      rows += [dict(json.loads(line), verifier='tests.rl_verifiers:even_length')
               for line in list(f)[:20]]
  prompts.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  overrides = [f'--config.init_from={init}', f'--config.rl.prompts={prompts}',
               f'--config.rl.tasks={",".join(TASKS)}', '--config.rl.prompts_per_step=4',
               '--config.rl.group_size=4',
               '--config.rl.max_new_tokens=6', '--config.rl.slots=16',
               '--config.rl.drop_overlong=False',  # a 10-step model rarely ends in 6 tokens
               f'--config.data.seq_len={SEQ_LEN}',
               f'--config.train.global_batch_tokens={4 * SEQ_LEN}', f'--config.train.steps={STEPS}',
               '--config.train.lr=3e-3', '--config.checkpoint.every_steps=2',
               '--config.checkpoint.keep=5', '--config.checkpoint.async_save=False',
               f'--config.eval.every_steps={STEPS}',
               '--config.eval.generate_per_task=3']
  reference = root / 'reference'
  assert_ok(run_rl(reference, *overrides))
  return data, init, overrides, reference


@pytest.mark.slow
def test_builtin_rl_split_is_disjoint_and_verifiable(setup):
  from hrmtext.rl import rewards
  data = setup[0]
  for task in ('gcd', 'syllogism', 'gsm_symbolic'):
    seen = set()
    for split in ('train', 'heldout'):
      with open(data / 'raw' / split / f'{task}.jsonl') as f:
        seen |= {json.loads(line)['instruction'] for line in f}
    with open(data / 'raw' / 'rl' / f'{task}.jsonl') as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) > 100 and not seen & {r['instruction'] for r in rows}
    direct = [r for r in rows if r['condition'] == 'direct']
    for row in direct[:5]:  # reasoning_gym's verifier of each row gives its answer 1, junk 0
      assert rewards.reward(row['answer'], row) == 1.0
      assert rewards.reward('no idea', row) == 0.0


@pytest.mark.slow
def test_a_step_logs_rewards_updates_and_evals(setup):
  data, init, _, reference = setup
  rows = read_metrics(reference)
  assert sorted(rows) == list(range(STEPS + 1))  # step 0: the held-out eval before RL
  for step in (0, STEPS):
    assert set(rows[step]) >= {f'eval_gen/{task}/exact_match' for task in TASKS}
  for step in range(1, STEPS + 1):
    row = rows[step]
    assert 0 <= row['reward/mean'] <= 1 and 0 < row['groups_kept'] <= 1, row
    assert set(row) >= {'reward/std', 'reward/gcd', 'reward/syllogism', 'response_len',
                        'overlong', 'clip_fraction', 'kl', 'entropy', 'loss', 'grad_norm',
                        'time/rollout_s', 'time/train_s', 'rollout_tokens_per_s',
                        'train_tokens_per_s'}, row
    assert row['kl'] == 0 and row['entropy'] > 0 and row['grad_norm'] > 0
  assert finalized_steps(reference) == [2, 4]
  # The policy moved; the EMA (decay 0) is the policy; the run keeps the tokenizer and config.
  _, start, _ = load(init, use_ema=True)
  _, params, _ = load(reference, use_ema=False)
  _, ema, _ = load(reference, use_ema=True)
  assert_trees_equal(params, ema)
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params)))
  assert os.path.isfile(reference / 'tokenizer' / 'tokenizer_info.json')
  with open(reference / 'config.json') as f:
    assert json.load(f)['rl']['group_size'] == 4


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise(setup, tmp_path):
  _, _, overrides, reference = setup
  workdir = tmp_path / 'killed'
  signal_after_step(workdir, overrides, 3, signal.SIGKILL).wait(timeout=60)
  assert finalized_steps(workdir) == [2]
  result = run_rl(workdir, *overrides)
  assert_ok(result)
  assert f'resuming from {workdir / "checkpoints"} step 2' in result.stdout
  assert [r['step'] for r in metric_rows(workdir)] == [0, 1, 2, 3, 4, 4]  # step 4: train, eval
  timing = ('time/', 'rollout_tokens_per_s', 'train_tokens_per_s')
  rows, want = read_metrics(workdir), read_metrics(reference)
  for step in want:
    assert ({k: v for k, v in rows[step].items() if not k.startswith(timing)} ==
            {k: v for k, v in want[step].items() if not k.startswith(timing)}), step
  for use_ema in (False, True):
    assert_trees_equal(load(workdir, use_ema)[1], load(reference, use_ema)[1])


@pytest.mark.slow
def test_errors_are_one_line(setup, tmp_path):
  data, init, overrides, _ = setup
  assert_one_line_error(run_rl(tmp_path / 'a', '--config.init_from='), 'init_from is unset')
  assert_one_line_error(run_rl(tmp_path / 'b', *overrides, '--config.rl.group_size=1'),
                        'rl.group_size=1')
  assert_one_line_error(run_rl(tmp_path / 'b', *overrides, '--config.rl.cycles=3'),
                        "rl.cycles='3'")
  assert_one_line_error(run_rl(tmp_path / 'c', *overrides, f'--config.rl.prompts={tmp_path}/no'),
                        'no such file or folder')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'instruction': 'x', 'answer': '1', 'verifier': 'nope'}) + '\n')
  assert_one_line_error(run_rl(tmp_path / 'd', *overrides, f'--config.rl.prompts={bad}'),
                        'unknown verifier')
  assert not os.path.exists(tmp_path / 'd' / 'checkpoints')


@pytest.mark.slow
def test_compile_only_reports_the_memory_of_each_program(tmp_path):
  """--compile_only needs no run: the tiny config's update, prefill and decode compiled here."""
  result = run_rl(tmp_path / 'unused', '--compile_only', '--prompt_len=64', '--vocab=1024')
  assert_ok(result)
  summary, memory = result.stdout.strip().splitlines()[-2:]
  assert 'rows x 256 tokens' in summary and 'engine 128 slots x 96 tokens' in summary, summary
  assert memory.startswith('memory per device: update ') and 'peak' in memory, memory
  assert not os.path.exists(tmp_path / 'unused')
  assert_one_line_error(run_rl(tmp_path / 'x', '--target=h100:1'), '--target needs --compile_only')


@pytest.mark.slow
def test_report_tables_the_evals_and_plots_the_rewards(setup, tmp_path):
  """experiments/rl_report.py (the README's table and plot) on the reference run."""
  reference = setup[3]
  png = tmp_path / 'curve.png'
  result = subprocess.run([sys.executable, 'experiments/rl_report.py', str(reference),
                           f'--plot={png}'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert_ok(result)
  rows = read_metrics(reference)
  lines = result.stdout.splitlines()
  for task in TASKS:
    before = rows[0][f'eval_gen/{task}/exact_match']
    after = rows[STEPS][f'eval_gen/{task}/exact_match']
    assert f'| {task} | {before:.3f} | {after:.3f} ({after - before:+.3f}) |' in lines, lines
  assert any(line.startswith('| mean |') for line in lines)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(setup, tmp_path):
  _, _, overrides, _ = setup
  workdir = tmp_path / 'stopped'
  assert signal_after_step(workdir, overrides, 1, signal.SIGTERM).wait(timeout=120) == 0
  with open(f'{workdir}.log') as f:
    stopped = [line for line in f if 'SIGTERM: saved step' in line]
  assert len(stopped) == 1, stopped
  step = int(stopped[0].split('saved step ')[1].split(',')[0])
  assert finalized_steps(workdir)[-1] == step < STEPS
  result = run_rl(workdir, *overrides)
  assert_ok(result)
  assert f'resuming from {workdir / "checkpoints"} step {step}' in result.stdout


@pytest.mark.slow
def test_rl_on_lora_adapters_deeper_on_a_mesh_of_two_devices(setup, tmp_path):
  """--config.lora.rank: the policy is init_from's frozen weights plus adapters, which alone
  train (and are what the checkpoints hold, with the reference to the base); the update
  (adapters, moments, rows) and the engine (cache rows) sharded over 2 devices; rl.cycles: the
  policy runs (and is saved) at another depth than init_from's."""
  from hrmtext.run import Run
  _, init, overrides, _ = setup
  workdir = tmp_path / 'lora'
  env = dict(train_env(), XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(rl_command(workdir, *overrides, '--config.train.steps=2',
                                     '--config.lora.rank=4', '--config.rl.kl_coef=0.1',
                                     '--config.mesh.fsdp=2', '--config.rl.cycles=3,0'),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert_ok(result)
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in result.stdout
  rows = read_metrics(workdir)
  assert rows[2]['grad_norm'] > 0 and rows[2]['kl'] >= 0
  meta = Run(str(workdir)).meta()
  assert meta['lora']['rank'] == 4 and meta['lora_base']['weights'] == 'ema'
  init_model = Run(str(init)).meta()['model']
  assert (meta['model']['H_cycles'], meta['model']['L_cycles']) == (3, init_model['L_cycles'])
  assert init_model['H_cycles'] != 3
  # The merged weights differ from init_from's only through the adapters' B A products.
  _, merged, _ = Run(str(workdir)).load_weights(use_ema=False)
  _, start, _ = load(init, use_ema=True)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(merged),
                                                       jax.tree.leaves(start))]
  assert any(changed) and not all(changed)  # the embeddings, norms carry no adapter


class _Answers:
  """A tokenizer and engine whose prompt k's answers are given: greedy[k], then sampled[k]."""

  def __init__(self, greedy, sampled):
    self.greedy, self.sampled, self.words = greedy, sampled, sorted(set(greedy) | {
        w for ws in sampled for w in ws})

  def encode_instruction(self, instruction, condition):
    return [int(instruction)]

  def decode(self, ids):
    return ' ' + self.words[ids[0]]

  def generate(self, prompts, max_new_tokens, sampling, seed=0, request_seeds=None):
    if not sampling.temperature:
      return [[self.words.index(self.greedy[p[0]])] for p in prompts]
    group = len(self.sampled[0])
    return [[self.words.index(self.sampled[p[0]][i % group])] for i, p in enumerate(prompts)]


def test_probe_measures_how_much_the_samples_depend_on_the_prompt():
  """experiments/rl_probe.py's numbers, by hand: 4 prompts (answers Yes Yes No No), 2 samples
  each; sampled Yes 5/8 and No 3/8, answers half each: an input-independent policy scores 1/2."""
  from experiments import rl_probe
  fake = _Answers(greedy=['Yes', 'Yes', 'No', 'Yes'],
                  sampled=[['Yes', 'Yes'], ['Yes', 'No'], ['No', 'No'], ['Yes', 'Yes']])
  rows = [dict(instruction=str(k), condition='direct', answer=a)
          for k, a in enumerate(['Yes', 'Yes', 'No', 'No'])]
  result = rl_probe.probe(fake, fake, rows, group=2, max_new_tokens=4, seed=0)
  assert result == pytest.approx({'greedy': 3 / 4, 'sampled': 5 / 8, 'pass@2': 3 / 4,
                                  'independent': 1 / 2, 'dependence': 1 / 8})


@pytest.mark.slow
def test_probe_tables_each_task(setup):
  init = setup[1]
  result = subprocess.run([sys.executable, 'experiments/rl_probe.py', str(init),
                           '--tasks=gcd,syllogism', '--prompts=6', '--group=4',
                           '--max_new_tokens=4'], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=300)
  assert_ok(result)
  lines = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert lines[0] == '| task | greedy | sampled | pass@4 | independent | dependence |'
  rows = {cells[0]: [float(c) for c in cells[1:]]
          for cells in ([c.strip() for c in line.strip('|').split('|')] for line in lines[1:])}
  assert sorted(rows) == ['gcd', 'syllogism']
  for greedy, sampled, pass_at, independent, dependence in rows.values():
    assert 0 <= greedy <= 1 and 0 <= sampled <= pass_at <= 1 and 0 <= independent <= 1
    assert dependence == pytest.approx(sampled - independent, abs=2e-3)
  shown = subprocess.run([sys.executable, 'experiments/rl_probe.py', '--help'], cwd=REPO,
                         env=train_env(), capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0 and 'dependence' in shown.stdout, shown.stderr
  none = subprocess.run([sys.executable, 'experiments/rl_probe.py', str(init), '--group=0'],
                        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
  assert none.returncode == 2 and '--group' in none.stderr.strip().splitlines()[-1]
  missing = subprocess.run([sys.executable, 'experiments/rl_probe.py', str(init), '--tasks=nope'],
                           cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
  assert missing.returncode == 1 and missing.stderr.strip().startswith('error: ') and \
      'nope' in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
