r"""The paper's comparisons at the tiny CPU scale: one arm per argument, the rest the tiny default.

  python -m hrmtext.train --config experiments/ablation.py:ut --workdir runs/ablation/ut
  python experiments/ablation.py --workdir runs/ablation            # every arm, then the table
  python experiments/ablation.py --arms hrm,ut --steps 20 --generate_per_task 4  # a quick look
  python experiments/ablation.py -- --config.data.dir=DATA  # flags after -- go to every run

Every arm trains experiments/tiny_cpu.py's recipe (data, optimizer, schedule, 300 steps of 8 x 512
tokens, seed) on the built-in corpus at the tiny default's size, hidden 128 and n_layers 2; only
the arm's own setting differs. Architectures (hrmtext.model.config.ARCHITECTURES), at HRM's
parameters unless said:
  hrm               HRM-Text: 2 stacks of 1 block, 2 H x 3 L cycles (8 block applications)
  transformer       1 stack of 2 blocks (2 block applications)
  transformer_deep  1 stack of 8 blocks: HRM's 8 block applications (its forward FLOPs), 3x params
  ut, trm, rins     the reference's baselines (8 block applications each)
  trm_match         TRM with half-depth layers and HRM's cycles: HRM's FLOPs, half its blocks
Switches on the HRM arm:
  no_magicnorm      no final RMSNorm on either stack (model.final_norm none)
  post_norm         post-norm blocks, as the reference's norm_type post (model.norm_type post)
  full_bptt         every application differentiable (train.horizon.schedule full)
  fixed_bp          bp_steps 5 from the first step, no warmup (train.horizon.bp_min = bp_max = 5)
  causal            instruction tokens attend causally too (model.attn_type causal)
  all_tokens_loss   loss on the instruction tokens too (data.target_only False)

The runner (`python experiments/ablation.py`) trains each arm in <workdir>/<arm> (an arm whose
result.json exists is not trained again; delete it to retrain), then prints two tables. The first:
parameters, forward and train FLOPs per token (train: at the last step's credit horizon), training
wall time, the held-out teacher-forced loss (token mean, and the mean over tasks) and exact
accuracy of the final EMA weights, and the final in-loop greedy exact match per task on
--generate_per_task examples of each. The second: each arm's held-out loss per task.
"""
import json
import os
import subprocess
import sys
import time

ARCHITECTURE_ARMS = ('hrm', 'transformer', 'transformer_deep', 'ut', 'trm', 'trm_match', 'rins')
SWITCHES = {
    'no_magicnorm': {'model.final_norm': 'none'},
    'post_norm': {'model.norm_type': 'post'},
    'full_bptt': {'train.horizon.schedule': 'full'},
    'fixed_bp': {'train.horizon.bp_min': 5, 'train.horizon.bp_max': 5},
    'causal': {'model.attn_type': 'causal'},
    'all_tokens_loss': {'data.target_only': False},
}
ARMS = (*ARCHITECTURE_ARMS, *SWITCHES)
N_LAYERS = 2  # the tiny default's: one block in each of HRM's two stacks
EVAL_ROWS = 8  # rows per held-out eval batch (any count gives the same metrics)
THIS_FILE = os.path.abspath(__file__)


def tiny_config():
  """experiments/tiny_cpu.py's config."""
  from hrmtext.training.config import experiment_config
  return experiment_config(os.path.join(os.path.dirname(THIS_FILE), 'tiny_cpu.py'))


def get_config(arm: str = 'hrm'):
  from hrmtext.model.config import stack_layers
  if arm not in ARMS:
    raise ValueError(f'unknown arm {arm!r}; have {", ".join(ARMS)}')
  c = tiny_config()
  if arm in ARCHITECTURE_ARMS:
    architecture = 'transformer' if arm == 'transformer_deep' else arm
    layers = 4 * N_LAYERS if arm == 'transformer_deep' else stack_layers(N_LAYERS, architecture)
    c.model.update(architecture=architecture, layers_per_stack=layers)
  c.update_from_flattened_dict(SWITCHES.get(arm, {}))
  # One held-out evaluation, at the end, with greedy generation (set per run by the runner).
  c.eval.update(every_steps=10**9, generate_per_task=32)
  return c


# ---- the runner ------------------------------------------------------------------------------

def train_arm(arm: str, workdir: str, overrides: list[str]) -> float:
  """Trains `arm` in `workdir` (resuming a checkpoint there); the wall seconds it took."""
  command = [sys.executable, '-m', 'hrmtext.train', f'--config={THIS_FILE}:{arm}',
             f'--workdir={workdir}', *overrides]
  print(f'== {arm}: {" ".join(command[1:])}', flush=True)
  start = time.monotonic()
  if subprocess.run(command).returncode:
    raise RuntimeError(f'training arm {arm} failed (see its output above)')
  return time.monotonic() - start


def arm_result(arm: str, workdir: str, wall_s: float) -> dict:
  """The table row of a trained arm: sizes and costs and the teacher-forced held-out metrics
  (over all tasks and per task) from its checkpoint's EMA weights, greedy exact match from its
  last in-loop evaluation."""
  import jax
  import ml_collections
  from hrmtext.data import pipeline
  from hrmtext.model import build_model
  from hrmtext.model.flops import forward_flops_per_token, train_flops_per_token
  from hrmtext.run import Run
  from hrmtext.training import schedules
  from hrmtext.training.step import heldout_metrics, make_eval_step
  run = Run(workdir)
  cfg, params, meta = run.load_weights()
  train, data = meta['config']['train'], ml_collections.ConfigDict(meta['config']['data'])
  with open(run.metrics_file) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  last_eval = [row for row in rows if 'eval/loss' in row][-1]
  steps = max(row['step'] for row in rows)
  horizon = schedules.horizon_schedule(train['horizon'], cfg, steps)(steps - 1)  # the last step's
  batches = pipeline.make_eval_batches(data, rows=EVAL_ROWS, seq_len=data.seq_len)
  heldout = heldout_metrics(jax.jit(make_eval_step(build_model(cfg))), params, batches)
  return {
      'arm': arm, 'steps': steps, 'wall_s': wall_s,
      'params': sum(x.size for x in jax.tree.leaves(params)),
      'forward_flops': forward_flops_per_token(cfg, data.seq_len),
      'train_flops': train_flops_per_token(cfg, horizon, data.seq_len),
      'eval_loss': heldout['eval/loss'], 'eval_exact': heldout['eval/exact_accuracy'],
      'eval_loss_per_task': {task: heldout[f'eval/{task}/loss'] for task in batches},
      'greedy_exact': last_eval.get('eval_gen/exact_match'),
      'greedy_per_task': per_task(last_eval, 'eval_gen', 'exact_match'),
  }


def per_task(metrics: dict, prefix: str, name: str) -> dict:
  """{task: value} of the metrics keyed '<prefix>/<task>/<name>'."""
  return {key.split('/')[1]: value for key, value in metrics.items()
          if key.startswith(f'{prefix}/') and key.count('/') == 2 and key.endswith(f'/{name}')}


def format_table(results: list[dict]) -> str:
  """The comparison (greedy exact match per task), then each arm's held-out loss per task."""
  number = lambda x, fmt: '-' if x is None else format(x, fmt)
  tasks = sorted({task for r in results for task in r['greedy_per_task']})
  header = ['arm', 'params', 'fwd FLOPs/tok', 'train FLOPs/tok', 'steps', 'wall', 'eval loss',
            'task-mean eval loss', 'TF exact', 'greedy exact', *tasks]
  table = [header]
  for r in results:
    table.append([r['arm'], f'{r["params"] / 1e6:.2f}M', f'{r["forward_flops"] / 1e6:.1f}M',
                  f'{r["train_flops"] / 1e6:.1f}M', str(r['steps']), f'{r["wall_s"] / 60:.1f} min',
                  f'{r["eval_loss"]:.3f}', number(task_mean(r), '.3f'), f'{r["eval_exact"]:.3f}',
                  number(r['greedy_exact'], '.3f'),
                  *(number(r['greedy_per_task'].get(task), '.2f') for task in tasks)])
  loss_tasks = sorted({task for r in results for task in r.get('eval_loss_per_task', {})})
  losses = [['arm (held-out loss per task)', *loss_tasks]]
  for r in results:
    losses.append([r['arm'], *(number(r.get('eval_loss_per_task', {}).get(task), '.3f')
                               for task in loss_tasks)])
  return markdown(table) + '\n\n' + markdown(losses)


def task_mean(result: dict) -> float | None:
  """The held-out loss with every task weighted alike (the token mean favours long responses)."""
  losses = list(result.get('eval_loss_per_task', {}).values())
  return sum(losses) / len(losses) if losses else None


def markdown(table: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(row) + ' |' for row in table]
  return '\n'.join([lines[0], '|' + '---|' * len(table[0]), *lines[1:]])


def main(argv):
  from absl import flags
  from hrmtext.errors import UserError
  values = flags.FLAGS
  arms = values.arms or list(ARMS)
  unknown = [arm for arm in arms if arm not in ARMS]
  if unknown:
    raise UserError(f'unknown arms {unknown}; have {", ".join(ARMS)}')
  overrides = [*argv[1:], f'--config.eval.generate_per_task={values.generate_per_task}']
  if values.steps:
    overrides.append(f'--config.train.steps={values.steps}')
  results = []
  for arm in arms:
    workdir = os.path.join(values.workdir, arm)
    result_file = os.path.join(workdir, 'result.json')
    if not os.path.exists(result_file):
      wall_s = train_arm(arm, workdir, overrides)
      with open(result_file, 'w') as f:
        json.dump(arm_result(arm, workdir, wall_s), f, indent=1)
    with open(result_file) as f:
      results.append(json.load(f))
  print(format_table(results))


if __name__ == '__main__':
  from absl import flags
  from hrmtext import cli
  flags.DEFINE_string('workdir', 'runs/ablation', 'Folder of the arms\' run directories.')
  flags.DEFINE_list('arms', [], f'Arms to train and tabulate (default: all): {", ".join(ARMS)}.')
  flags.DEFINE_integer('steps', 0, 'Train steps per arm (0: the recipe\'s 300).')
  flags.DEFINE_integer('generate_per_task', 32, 'Held-out examples per task generated greedily '
                       'at the end of each run.')
  cli.run(main, extra_args=True)  # after --: flags for every arm's hrmtext.train
