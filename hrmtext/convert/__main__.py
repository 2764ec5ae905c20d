"""python -m hrmtext.convert --src DIR --dst DIR

Converts between a HF transformers `hrm_text` directory (config.json + safetensors) and an
hrmtext checkpoint (a run directory with `checkpoints/`); the direction follows from `--src`.
"""
import os
import shutil
import sys

from absl import app, flags

from hrmtext.cli import quiet_logs
from hrmtext.convert import hf

flags.DEFINE_string('src', None, 'HF hrm_text directory or hrmtext run/checkpoint directory.')
flags.DEFINE_string('dst', None, 'Output directory (must not exist yet).')
flags.DEFINE_bool('ema', True, 'hrmtext -> HF: export the EMA weights when the checkpoint has them.')
FLAGS = flags.FLAGS


def main(argv):
  quiet_logs()
  del argv
  src, dst = FLAGS.src, FLAGS.dst
  if not src or not dst:
    raise app.UsageError('both --src and --dst are required')
  if os.path.exists(dst):
    sys.exit(f'error: --dst {dst} already exists; refusing to overwrite')
  if not os.path.isdir(src):
    sys.exit(f'error: --src {src} is not a directory')
  partial = dst.rstrip('/') + '.partial'  # renamed into place only once complete
  shutil.rmtree(partial, ignore_errors=True)
  try:
    if hf.is_hf_dir(src):
      print(f'HF hrm_text -> hrmtext: {src} -> {dst}')
      hf.hf_to_hrmtext(src, partial)
    else:
      print(f'hrmtext -> HF hrm_text: {src} -> {dst}')
      hf.hrmtext_to_hf(src, partial, use_ema=FLAGS.ema)
  except (ValueError, FileNotFoundError, KeyError) as e:
    shutil.rmtree(partial, ignore_errors=True)
    sys.exit(f'error: cannot convert {src}: {e}')
  os.rename(partial, dst)
  print(f'wrote {dst}')


if __name__ == '__main__':
  app.run(main)
