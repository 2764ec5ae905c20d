r"""Measures the training input pipeline: packed tokens/s on this machine and packing efficiency.

  python -m hrmtext.data.bench --data_dir runs/data/builtin --seq_len 4096

Reads the sampled set of a prepared root (or a reference sampled set), builds batches of
--rows x --seq_len through the Grain pipeline as the trainer does, and reports tokens/s (all row
slots, and real tokens only) plus the packing efficiency of every epoch's plan.
"""

import time

from absl import flags
from tqdm import tqdm

from hrmtext import cli
from hrmtext.data import packing, pipeline
from hrmtext.data.config import data_config

flags.DEFINE_string('data_dir', None, 'Prepared root or sampled set folder.', required=True)
flags.DEFINE_integer('seq_len', 4096, 'Packed row length.')
flags.DEFINE_integer('rows', 8, 'Rows per batch (one process).')
flags.DEFINE_integer('batches', 100, 'Batches to time (after one warm-up batch).')
flags.DEFINE_integer('worker_count', 0, 'Grain prefetch processes.')
FLAGS = flags.FLAGS


def main(_):
  if min(FLAGS.rows, FLAGS.batches, FLAGS.seq_len) < 1 or FLAGS.worker_count < 0:
    raise cli.UserError('--rows, --batches and --seq_len must be >= 1, --worker_count >= 0')
  cfg = data_config()
  cfg.dir, cfg.worker_count = FLAGS.data_dir, FLAGS.worker_count
  iterator = pipeline.make_train_iterator(cfg, rows_per_process=FLAGS.rows, seq_len=FLAGS.seq_len,
                                          process_index=0, process_count=1, seed=cfg.seed)
  next(iterator)  # plans, memory maps and worker start-up are not part of the steady state
  real_tokens, start = 0, time.perf_counter()
  for _ in tqdm(range(FLAGS.batches), desc='batches'):
    real_tokens += int((next(iterator)['segment_ids'] > 0).sum())
  seconds = time.perf_counter() - start
  slots = FLAGS.batches * FLAGS.rows * FLAGS.seq_len
  print(f'pipeline: {slots / seconds:,.0f} packed tokens/s '
        f'({real_tokens / seconds:,.0f} non-padding) rows={FLAGS.rows} seq_len={FLAGS.seq_len} '
        f'worker_count={FLAGS.worker_count}')

  source = pipeline.TrainBatches(pipeline.sampled_dir(cfg), seq_len=FLAGS.seq_len,
                                 rows_per_process=1, process_index=0, process_count=1,
                                 seed=cfg.seed, window_rows=cfg.pack_window_rows)
  for k, plan in enumerate(source.plans):
    print(f'epoch {k}: {plan.num_rows} rows, packing efficiency '
          f'{packing.packing_efficiency(plan, source.lengths, FLAGS.seq_len):.4f}')


if __name__ == '__main__':
  cli.run(main)
