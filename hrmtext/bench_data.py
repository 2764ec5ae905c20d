r"""Measures the training input pipeline: packed tokens/s on this machine and packing efficiency.

  python -m hrmtext.bench_data --data_dir runs/data/builtin --seq_len 4096

Reads the sampled set of a prepared root (or a reference sampled set; its tokens in one file or in
shards), builds batches of --rows x --seq_len through the Grain pipeline as the trainer does, and
reports tokens/s (all row slots, and real tokens only) plus the packing efficiency of every epoch's
plan.
"""

import time

from absl import flags
from tqdm import tqdm

from hrmtext import cli
from hrmtext.data import packing, pipeline
from hrmtext.data.config import data_config
from hrmtext.data.layout import SampledSet
from hrmtext.errors import UserError

_DATA_DIR = flags.DEFINE_string('data_dir',
    None, 'Prepared root or sampled set folder.', required=True)
_SEQ_LEN = flags.DEFINE_integer('seq_len', 4096, 'Packed row length.')
_ROWS = flags.DEFINE_integer('rows', 8, 'Rows per batch (one process).')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches to time (after one warm-up batch).')
_WORKER_COUNT = flags.DEFINE_integer('worker_count', 0, 'Grain prefetch processes.')


def main(_):
  if min(_ROWS.value, _BATCHES.value, _SEQ_LEN.value) < 1 or _WORKER_COUNT.value < 0:
    raise UserError('--rows, --batches and --seq_len must be >= 1, --worker_count >= 0')
  cfg = data_config()
  cfg.dir, cfg.worker_count = _DATA_DIR.value, _WORKER_COUNT.value
  iterator = pipeline.make_train_iterator(cfg, rows_per_process=_ROWS.value, seq_len=_SEQ_LEN.value,
                                          process_index=0, process_count=1, seed=cfg.seed)
  next(iterator)  # plans, memory maps and worker start-up are not part of the steady state
  real_tokens, start = 0, time.perf_counter()
  for _ in tqdm(range(_BATCHES.value), desc='batches'):
    real_tokens += int((next(iterator)['segment_ids'] > 0).sum())
  seconds = time.perf_counter() - start
  slots = _BATCHES.value * _ROWS.value * _SEQ_LEN.value
  source = pipeline.TrainBatches(pipeline.sampled_dir(cfg), seq_len=_SEQ_LEN.value,
                                 rows_per_process=1, process_index=0, process_count=1,
                                 seed=cfg.seed, window_rows=cfg.pack_window_rows,
                                 max_segments=cfg.max_segments_per_row)
  shards = SampledSet(pipeline.sampled_dir(cfg)).tokens().num_shards
  print(f'pipeline: {slots / seconds:,.0f} packed tokens/s '
        f'({real_tokens / seconds:,.0f} non-padding) rows={_ROWS.value} seq_len={_SEQ_LEN.value} '
        f'worker_count={_WORKER_COUNT.value} token_shards={shards}')

  for k, plan in enumerate(source.plans):
    print(f'epoch {k}: {plan.num_rows} rows, packing efficiency '
          f'{packing.packing_efficiency(plan, source.lengths, _SEQ_LEN.value):.4f}')


if __name__ == '__main__':
  cli.run(main)
