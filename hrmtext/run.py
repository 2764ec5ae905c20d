"""The run directory: what training leaves, and the one contract between training and every reader
of a run (generate, score, evaluate, convert, a resumed or fine-tuning train).

  <run>/checkpoints/<step>/  the steps (hrmtext.checkpoint): params, ema, opt_state and meta
  <run>/tokenizer/           the run's tokenizer, standing alone: a copy of the data's, taken when
                             training starts (an imported HF run's points into hf_files/)
  <run>/hf_files/            an imported HF directory's other files (tokenizer, generation
                             config), verbatim, for the export
  <run>/config.json          the resolved experiment config
  <run>/metrics.jsonl        one JSON row per logged step and per eval
  <run>/tb/                  TensorBoard logs and profiles

A step's meta: 'model', 'compute', 'config' and 'data_dir' (the absolute data root it trained on);
an imported step's: 'model', 'horizon', 'hf_config' and 'hf_dtypes'. A reader needs the run
directory alone, so a run keeps working when its data moves or is deleted.

Runs saved before the run kept its tokenizer still load: their meta 'tokenizer' names the sampled
set they trained on (its tokenizer, and by its parent the data root), and an imported one keeps
its tokenizer_info.json beside checkpoints/.
"""
import json
import os
import shutil

from hrmtext import checkpoint
from hrmtext.data.tokenizer import INFO_FILE, Tokenizer
from hrmtext.errors import UserError
from hrmtext.files import atomic_open, atomic_path
from hrmtext.model import ModelConfig

CHECKPOINTS = 'checkpoints'
TOKENIZER = 'tokenizer'
HF_FILES = 'hf_files'
CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tb'


class Run:
  """The run directory `path`; a run's checkpoints/ folder stands for its run (as --checkpoint
  and init_from accept either)."""

  def __init__(self, path: str):
    path = os.path.normpath(path)
    self.path = (os.path.dirname(path) or '.') if os.path.basename(path) == CHECKPOINTS else path
    self.checkpoints = os.path.join(self.path, CHECKPOINTS)
    self.tokenizer_dir = os.path.join(self.path, TOKENIZER)
    self.hf_files = os.path.join(self.path, HF_FILES)
    self.config_file = os.path.join(self.path, CONFIG)
    self.metrics_file = os.path.join(self.path, METRICS)
    self.tensorboard_dir = os.path.join(self.path, TENSORBOARD)

  # ---- checkpoints --------------------------------------------------------------------------

  def manager(self, **options) -> checkpoint.Manager:
    """The manager of the run's steps (options: hrmtext.checkpoint.manager's)."""
    return checkpoint.manager(self.checkpoints, **options)

  def load_weights(self, *, use_ema: bool = True, step: int | None = None, shardings=None
                   ) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, params, meta) of the latest (or given) step: its EMA weights when saved, on
    `shardings` (hrmtext.checkpoint.abstract_params)."""
    mngr = self.manager(create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {os.path.abspath(self.checkpoints)}')
    meta = checkpoint.read_meta(mngr, step)
    cfg = ModelConfig.from_dict(meta['model'])
    item = 'ema' if use_ema and 'ema' in checkpoint.saved_items(mngr, step) else 'params'
    params = checkpoint.restore(mngr, step, **{item: checkpoint.abstract_params(cfg, shardings)})
    mngr.close()
    return cfg, params[item], meta

  # ---- tokenizer ----------------------------------------------------------------------------

  def has_tokenizer(self) -> bool:
    return os.path.isfile(os.path.join(self.tokenizer_dir, INFO_FILE))

  def save_tokenizer(self, tokenizer: Tokenizer) -> None:
    """Makes `tokenizer` (the data's, as training starts) the run's: copied into <run>/tokenizer/,
    in place of any copy there."""
    with atomic_path(self.tokenizer_dir) as tmp:
      tokenizer.copy_to(tmp)
      shutil.rmtree(self.tokenizer_dir, ignore_errors=True)  # the rename needs the place free

  def check_tokenizer(self, tokenizer: Tokenizer) -> None:
    """UserError unless `tokenizer` (the data of a resumed run) encodes as the run's own."""
    if not tokenizer.same_as(Tokenizer.load(self.tokenizer_dir)):
      raise UserError(f'the data was tokenized with {tokenizer.path}, not with the tokenizer of '
                      f'the run {self.path} ({self.tokenizer_dir})')

  def tokenizer(self, meta: dict) -> Tokenizer | None:
    """The run's tokenizer (of older runs: see the module's doc); None for a run imported without
    one. `meta`: a step's."""
    if self.has_tokenizer():
      return Tokenizer.load(self.tokenizer_dir)
    sampled = meta.get('tokenizer')
    if sampled:
      if not os.path.exists(sampled):
        raise UserError(f'{self.path} keeps no tokenizer of its own (an older run) and the data '
                        f'it trained on, {sampled}, is gone; pass --tokenizer')
      return Tokenizer.load(sampled)
    beside = os.path.join(self.path, INFO_FILE)
    return Tokenizer.load(beside) if os.path.isfile(beside) else None

  def data_dir(self, meta: dict) -> str | None:
    """The data root step `meta` trained on (absolute); None for an imported run."""
    if 'data_dir' in meta:
      return meta['data_dir']
    sampled = meta.get('tokenizer')  # an older run's: its sampled set, <root>/sampled or the root
    if not sampled:
      return None
    return os.path.dirname(sampled) if os.path.basename(sampled) == 'sampled' else sampled

  # ---- logs ---------------------------------------------------------------------------------

  def write_config(self, config) -> None:
    """config.json: the run's resolved config (an ml_collections ConfigDict)."""
    os.makedirs(self.path, exist_ok=True)
    with atomic_open(self.config_file) as f:
      f.write(config.to_json_best_effort(indent=2))

  def append_metrics(self, step: int, metrics: dict) -> None:
    with open(self.metrics_file, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')

  def drop_metrics_after(self, step: int) -> int:
    """Forgets the metrics of the steps after `step` (a run killed after its last checkpoint
    logged steps it will now redo) and every unreadable line (one cut short by a kill or a full
    disk); returns how many lines were unreadable."""
    if not os.path.exists(self.metrics_file):
      return 0
    with open(self.metrics_file) as f:
      rows = [(line, _json_or_none(line)) for line in f if line.strip()]
    kept = [line for line, row in rows if row and row['step'] <= step]
    with atomic_open(self.metrics_file) as f:
      f.writelines(line if line.endswith('\n') else line + '\n' for line in kept)
    return sum(row is None for _, row in rows)


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None
