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

A LoRA run (hrmtext.model.lora) saves its adapters as params/ema/opt_state; its meta adds 'lora'
(the LoraConfig), 'lora_base' (`Run.reference` to the frozen weights it adapts: that run's path,
absolute and relative to this one, step, EMA or params, and the digest of the step's checksums)
and 'lora_size'. Reading its weights reads the base's and merges the adapters in: every reader
of a run reads a LoRA run too, as long as its base is where it was (or at the same relative
place) and unchanged.

Runs saved before the run kept its tokenizer still load: their meta 'tokenizer' names the sampled
set they trained on (its tokenizer, and by its parent the data root), and an imported one keeps
its tokenizer_info.json beside checkpoints/.
"""
import functools
import json
import os
import shutil

import jax

from hrmtext import checkpoint
from hrmtext.data.tokenizer import INFO_FILE, Tokenizer
from hrmtext.errors import UserError
from hrmtext.files import atomic_open, atomic_path
from hrmtext.model import LoraConfig, ModelConfig, lora as lora_lib

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
    `shardings` (hrmtext.checkpoint.abstract_params). A LoRA run's: its base's weights with its
    (EMA) adapters merged in, and its meta with the base's HF config and files."""
    cfg, params, meta, lora = self._read(use_ema, step, shardings)
    if lora is None:
      return cfg, params, meta
    base_run = find_base(meta['lora_base'], self.path)
    _, base, base_meta = base_run.load_weights(
        use_ema=meta['lora_base']['weights'] == 'ema', step=meta['lora_base']['step'],
        shardings=shardings)
    merge = jax.jit(functools.partial(lora_lib.merge, lora=lora),
                    out_shardings=jax.tree.map(lambda x: x.sharding, base))
    inherited = {k: base_meta[k] for k in ('hf_config', 'hf_dtypes', 'hf_files') if k in base_meta}
    if os.path.isdir(base_run.hf_files):
      inherited['hf_files'] = base_run.hf_files
    return cfg, merge(lora_lib.combine(base, params)), {**inherited, **meta}

  def meta(self, step: int | None = None) -> dict:
    """The meta of the latest (or given) step."""
    mngr = self.manager(create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {os.path.abspath(self.checkpoints)}')
    meta = checkpoint.read_meta(mngr, step)
    mngr.close()
    return meta

  def load_adapters(self, *, use_ema: bool = True, step: int | None = None
                    ) -> tuple[ModelConfig, LoraConfig, dict, dict]:
    """(ModelConfig, LoraConfig, adapters, meta) of a LoRA run's latest (or given) step."""
    cfg, adapters, meta, lora = self._read(use_ema, step, None)
    if lora is None:
      raise UserError(f'{self.path} is no LoRA run (its checkpoint has no adapters)')
    return cfg, lora, adapters, meta

  def _read(self, use_ema: bool, step: int | None, shardings):
    """(ModelConfig, the saved params or EMA (a LoRA run's: adapters), meta, LoraConfig or
    None)."""
    mngr = self.manager(create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {os.path.abspath(self.checkpoints)}')
    meta = checkpoint.read_meta(mngr, step)
    cfg = ModelConfig.from_dict(meta['model'])
    lora = LoraConfig.from_dict(meta['lora']) if meta.get('lora') else None
    item = 'ema' if use_ema and 'ema' in checkpoint.saved_items(mngr, step) else 'params'
    params = checkpoint.restore(mngr, step, **{
        item: checkpoint.abstract_params(cfg, shardings, lora)})
    mngr.close()
    return cfg, params[item], meta, lora

  def reference(self, *, use_ema: bool, relative_to: str, step: int | None = None) -> dict:
    """What a LoRA run records of its base, this run's latest (or given) step: the run's path
    (absolute, and relative to `relative_to`, the LoRA run's), the step, which weights (its EMA
    when `use_ema` and saved) and the digest of its checksums (hrmtext.checkpoint.digest)."""
    mngr = self.manager(create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {os.path.abspath(self.checkpoints)}')
    ema = use_ema and 'ema' in checkpoint.saved_items(mngr, step)
    ref = {'run': os.path.abspath(self.path),
           'relative': os.path.relpath(self.path, os.path.abspath(relative_to)),
           'step': step, 'weights': 'ema' if ema else 'params',
           'checksum': checkpoint.digest(mngr, step)}
    mngr.close()
    return ref

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


def find_base(ref: dict, lora_run: str) -> Run:
  """The run that `ref` (Run.reference) of LoRA run `lora_run` refers to: at its absolute path,
  else at its place relative to the LoRA run (the two moved together); UserError when it is
  gone or its step's checksums changed (not the weights the adapters were trained on)."""
  for path in (ref['run'], os.path.join(lora_run, ref['relative'])):
    run = Run(path)
    if os.path.isdir(os.path.join(run.checkpoints, str(ref['step']))):
      mngr = run.manager(create=False)
      digest = checkpoint.digest(mngr, ref['step'])
      mngr.close()
      if digest != ref['checksum']:
        raise UserError(f'{run.path} step {ref["step"]}, the base of LoRA run {lora_run}, changed '
                        f'since the adapters were trained on it (its checksums differ)')
      return run
  raise UserError(f'the base of LoRA run {lora_run}, {ref["run"]} step {ref["step"]}, is gone '
                  f'(moved? or the step deleted by a later save)')


def save_merged(src: str, dst: str, *, use_ema: bool = True, final_path: str = '') -> None:
  """A weights-only run at `dst` with LoRA run `src`'s weights merged (its EMA adapters unless
  not `use_ema`), its tokenizer, and its base's HF files (so its HF export is as the base's).
  `final_path`: where `dst` will be (written elsewhere first), for the reference to `src`."""
  run, out = Run(src), Run(dst)
  cfg, params, meta = run.load_weights(use_ema=use_ema)
  if 'lora' not in meta:
    raise UserError(f'{src} is no LoRA run: it has nothing to merge')
  kept = {k: meta[k] for k in ('compute', 'config', 'data_dir', 'hf_config', 'hf_dtypes')
          if k in meta}
  mngr = out.manager(async_save=False)
  checkpoint.save(mngr, 0, params=params, meta={
      'model': cfg.to_dict(), **kept,
      'merged_from': run.reference(use_ema=use_ema, relative_to=final_path or dst)})
  mngr.close()
  tokenizer = run.tokenizer(meta)
  if tokenizer is not None:
    out.save_tokenizer(tokenizer)
  if meta.get('hf_files'):
    shutil.copytree(meta['hf_files'], out.hf_files)


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None
