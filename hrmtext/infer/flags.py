"""Flags shared by the inference entry points (generate, score, evaluate)."""
import ml_collections
from absl import flags
from ml_collections import config_flags

from hrmtext.errors import UserError

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Run directory (or its checkpoints/).')
TOKENIZER = flags.DEFINE_string('tokenizer', '', 'tokenizer_info.json or a folder holding one '
                                '(default: the run\'s: the copy training took of the data\'s, or '
                                'for an imported HF checkpoint the one convert wrote).')
EOA_ID = flags.DEFINE_integer('eoa_id', None, 'End-of-answer token id, where generation stops '
                              "(default: the tokenizer's EOA; without a tokenizer, the imported "
                              "HF config's eos_token_id).")
EMA = flags.DEFINE_bool('ema', True, 'Use the EMA weights when the checkpoint has them.')
SLOTS = flags.DEFINE_integer('slots', 8, 'Sequences decoded together (continuous batching).')
MAX_LEN = flags.DEFINE_integer('max_len', 0, 'KV-cache length: prompt + response tokens '
                               '(default: the training row length).')
MESH = config_flags.DEFINE_config_dict(
    'mesh', ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
    'Devices to serve on, as training\'s --config.mesh: --mesh.fsdp=4 --mesh.tensor=2 shards the '
    'weights and KV cache over 8 devices (-1: all the remaining ones). Default: one device.')
CYCLES = flags.DEFINE_list('cycles', [], 'H,L: run the recurrence with H_cycles H and L_cycles L '
                           'instead of the trained counts (test-time depth; the KV cache gets a '
                           'slot per application). UT and RINS have one H cycle.')


def load(need_tokenizer: bool = True):
  """(engine, tokenizer, meta) of --checkpoint; the tokenizer may be None (token-id rows only)
  unless `need_tokenizer`."""
  from hrmtext.infer import text
  if not CHECKPOINT.value:
    raise UserError('--checkpoint is required')
  if SLOTS.value < 1 or MAX_LEN.value < 0:
    raise UserError('--slots must be >= 1 and --max_len >= 0')
  if EOA_ID.value is not None and EOA_ID.value < 0:
    raise UserError(f'--eoa_id {EOA_ID.value}: a token id is >= 0')
  return text.load(CHECKPOINT.value, tokenizer=TOKENIZER.value, use_ema=EMA.value,
                   slots=SLOTS.value, max_len=MAX_LEN.value, eoa_id=EOA_ID.value,
                   need_tokenizer=need_tokenizer, cycles=cycles(), mesh_config=MESH.value)


def cycles() -> tuple[int, int] | None:
  """--cycles as (H_cycles, L_cycles); None when not given."""
  if not CYCLES.value:
    return None
  if len(CYCLES.value) != 2 or not all(c.isdigit() and int(c) > 0 for c in CYCLES.value):
    raise UserError(f'--cycles {",".join(CYCLES.value)}: give two counts >= 1 as H,L (e.g. 3,4)')
  return int(CYCLES.value[0]), int(CYCLES.value[1])
