"""python -m hrmtext.convert --src DIR --dst DIR

Converts between a HF transformers `hrm_text` directory (config.json + safetensors, as a hub
release or `save_pretrained` lays it out, or the authors' own export) and an hrmtext checkpoint
(a run directory with `checkpoints/`); the direction follows from `--src`.

HF -> hrmtext brings the tokenizer: `tokenizer.json` plus a `tokenizer_info.json` with the prompt
tokens (BOQ, EOQ, EOA and one token per condition tag), by default the released models':
boq=<|im_start|> eoq=<|im_end|> eoa=<|box_end|> direct=<|object_ref_start|>
cot=<|object_ref_end|> noisy=<|quad_start|> synth=<|quad_end|>. Change or add some with
--prompt_tokens. generate / score / evaluate then need no --tokenizer. A directory without a
tokenizer converts too: token-id rows still work (EOA from the config's eos_token_id).
hrmtext -> HF writes the tokenizer files and tokenizer_info.json back next to the weights.

A LoRA run (trained with lora.rank > 0) converts to a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) for transformers' HrmTextForCausalLM of its base run, which
`peft.PeftModel.from_pretrained(HrmTextForCausalLM.from_pretrained(BASE_HF), DST)` loads (the
command prints how to export that base); with --merge_lora, to its weights with the adapters
merged in: a HF directory, or (--merged_format=hrmtext) an hrmtext run.
"""
import os

from absl import app, flags

from hrmtext import cli
from hrmtext import hf
from hrmtext.errors import UserError
from hrmtext.files import atomic_path, check_writable
from hrmtext.run import Run, save_merged

_SRC = flags.DEFINE_string('src',
    None, 'HF hrm_text directory or hrmtext run/checkpoint directory.')
_DST = flags.DEFINE_string('dst', None, 'Output directory (must not exist yet).')
_EMA = flags.DEFINE_bool('ema',
    True, 'hrmtext -> HF: export the EMA weights when the checkpoint has them.')
_MERGE_LORA = flags.DEFINE_bool(
    'merge_lora', False, 'A LoRA run: write its weights with the adapters merged in (a HF '
    'directory, or see --merged_format) instead of a PEFT adapter.')
_MERGED_FORMAT = flags.DEFINE_enum(
    'merged_format', 'hf', ['hf', 'hrmtext'], 'With --merge_lora: a HF hrm_text directory or '
    'an hrmtext run (weights only, with the run\'s tokenizer).')
_PROMPT_TOKENS = flags.DEFINE_list('prompt_tokens',
    [], 'HF -> hrmtext: KEY=TOKEN pairs overriding the released '
                  'prompt tokens; KEY is boq, eoq, eoa or a condition tag, e.g. '
                  'eoa=<|im_end|>,math=<|box_start|>.')


def main(_):
  src, dst = _SRC.value, _DST.value
  if not src or not dst:
    raise app.UsageError('both --src and --dst are required')
  if os.path.lexists(dst):
    raise UserError(f'--dst {dst} already exists; refusing to overwrite')
  if not os.path.isdir(src):
    raise UserError(f'--src {src} is not a directory')
  check_writable(dst, folder=True)
  prompt_tokens = hf.parse_prompt_tokens(_PROMPT_TOKENS.value)
  to_hrmtext = hf.is_hf_dir(src)
  if prompt_tokens and not to_hrmtext:
    raise UserError('--prompt_tokens applies to HF -> hrmtext only')
  lora = not to_hrmtext and bool(Run(src).meta().get('lora'))
  if _MERGE_LORA.value and not lora:
    raise UserError(f'--merge_lora needs a LoRA run; {src} is none')
  merged = 'hrmtext' if _MERGE_LORA.value and _MERGED_FORMAT.value == 'hrmtext' else 'HF hrm_text'
  print(f'HF hrm_text -> hrmtext: {src} -> {dst}' if to_hrmtext else
        f'LoRA run -> PEFT adapter: {src} -> {dst}' if lora and not _MERGE_LORA.value else
        f'LoRA run, merged -> {merged}: {src} -> {dst}' if lora else
        f'hrmtext -> HF hrm_text: {src} -> {dst}')
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  note = ''
  try:
    with atomic_path(dst) as tmp:  # renamed into place only once complete
      if to_hrmtext:
        hf.hf_to_hrmtext(src, tmp, prompt_tokens=prompt_tokens)
      elif lora and not _MERGE_LORA.value:
        note = hf.lora_to_peft(src, tmp, use_ema=_EMA.value)
      elif merged == 'hrmtext':
        save_merged(src, tmp, use_ema=_EMA.value, final_path=dst)
      else:
        hf.hrmtext_to_hf(src, tmp, use_ema=_EMA.value)
  except cli.USER_ERRORS as e:
    raise UserError(f'cannot convert {src}: {cli.one_line(e)}') from None
  print(f'wrote {dst}' + (f'; {note}' if note else ''))


if __name__ == '__main__':
  cli.run(main)
