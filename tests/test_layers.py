"""The package layers of DESIGN.md section 4, as import-linter contracts (setup.cfg): they hold,
and they are the design's."""
import configparser
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Highest first, as setup.cfg lists them. DESIGN's layers: errors -> model, data -> parallel ->
# training, infer -> evals -> rl (its rewards are evals' scorers) -> entry points; with files (atomic
# writes) above errors, and the
# run directory (run, over its checkpoint steps) under both training and infer, its writer and
# its readers.
ENTRY_POINTS = ('train', 'generate', 'score', 'evaluate', 'convert', 'prepare', 'bench',
                'bench_data', 'bench_decode', 'lmeval')
LAYERS = [' : '.join(ENTRY_POINTS), 'hf | cli', 'rl', 'evals', 'training | infer', 'run',
          'checkpoint', 'parallel', 'model : data', 'files', 'errors']


def contracts() -> dict:
  config = configparser.ConfigParser()
  config.read(os.path.join(REPO, 'setup.cfg'))
  prefix = 'importlinter:contract:'
  return {name[len(prefix):]: config[name] for name in config.sections()
          if name.startswith(prefix)}


def test_the_layers_hold():
  """lint-imports (CI runs it through this test) keeps every contract: no module imports from a
  layer above its own, and no package has an import cycle."""
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; from importlinter.cli import lint_imports_command; '
       'sys.exit(lint_imports_command())', '--config', 'setup.cfg', '--no-cache'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  assert f'Contracts: {len(contracts())} kept, 0 broken.' in result.stdout, result.stdout


def test_the_contracts_are_the_designs():
  found = contracts()
  assert sorted(found) == ['acyclic', 'launchers', 'layers']
  layers = found['layers']
  assert (layers['type'], layers['containers'], layers['exhaustive']) == (
      'layers', 'hrmtext', 'true')  # every module of hrmtext has its layer
  assert [line.strip() for line in layers['layers'].strip().splitlines()] == LAYERS
  assert (found['acyclic']['type'], found['acyclic']['ancestors']) == (
      'acyclic_siblings', 'hrmtext')
  launchers = found['launchers']
  assert (launchers['type'], launchers['source_modules'], launchers['forbidden_modules']) == (
      'forbidden', 'hrmtext', 'launch')
