"""Engines that run `prepare`'s tasks (hrmtext.data.stages): processes on this machine, or Apache
Beam (its DirectRunner here; Dataflow, Flink or Spark runners on a cluster).

`engine.map(fn, tasks)` runs `fn(task)` for every task, returns the results in task order and
raises the user error of a failed task (a malformed row, a missing file) as one line. Tasks are
independent and write their own outputs, so the engine decides only where each one runs.
"""

import glob
import json
import multiprocessing
import os
import shlex
import shutil
import tempfile

from hrmtext.errors import UserError

USER_ERRORS = (UserError, OSError)


def _message(error: BaseException) -> str:
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f'{error.filename}: {error.strerror}'
  return str(error)


def _indexed(item):
  fn, i, task = item
  return i, fn(task)


class LocalEngine:
  """`workers` processes on this machine (1: this process, no pool), started once for all stages."""

  def __init__(self, workers: int):
    if workers < 1:
      raise UserError(f'--workers={workers}: must be >= 1')
    self.workers, self._pool = workers, None

  def map(self, fn, tasks: list, on_result=None) -> list:
    results = [None] * len(tasks)
    if self.workers == 1 or len(tasks) <= 1:
      done = ((i, fn(task)) for i, task in enumerate(tasks))
    else:
      if self._pool is None:
        self._pool = multiprocessing.get_context('spawn').Pool(self.workers)
      done = self._pool.imap_unordered(_indexed, [(fn, i, t) for i, t in enumerate(tasks)])
    try:
      for i, result in done:
        results[i] = result
        if on_result:
          on_result(result)
    except BaseException:
      self.close()  # no worker writes on once the run gives up (its outputs may be removed)
      raise
    return results

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _run_json(item, fn) -> str:
  i, task = item
  try:
    return json.dumps([i, True, fn(task)])
  except USER_ERRORS as e:
    return json.dumps([i, False, _message(e)])


class BeamEngine:
  """An Apache Beam pipeline per stage, its options as on Beam's command line (`options`, e.g.
  '--runner=DirectRunner --direct_num_workers=4'). Results come back through files written
  under `scratch`, which every worker must reach (the output root)."""

  def __init__(self, options: str, scratch: str):
    try:
      # pylint: disable=g-import-not-at-top
      import apache_beam as beam
      from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
      raise UserError('--engine=beam needs Apache Beam: pip install "hrmtext[beam]"') from None
    self.options, self.scratch = shlex.split(options), scratch
    for stale in glob.glob(os.path.join(glob.escape(scratch), '.beam-*.tmp')):  # a killed run's
      shutil.rmtree(stale, ignore_errors=True)
    try:  # a runner Beam does not know fails here, before any work
      beam.Pipeline(options=PipelineOptions(self.options))
    except ValueError as e:
      raise UserError(f'--beam_options={options!r}: {e}') from None

  def map(self, fn, tasks: list, on_result=None) -> list:
    if not tasks:
      return []
    # pylint: disable=g-import-not-at-top
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    folder = tempfile.mkdtemp(prefix='.beam-', suffix='.tmp', dir=self.scratch)
    try:
      with beam.Pipeline(options=PipelineOptions(self.options)) as pipeline:
        _ = (pipeline | beam.Create(list(enumerate(tasks))) | beam.Reshuffle()
             | beam.Map(_run_json, fn) | beam.io.WriteToText(os.path.join(folder, 'results')))
      lines = []
      for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
          lines += [json.loads(line) for line in f if line.strip()]
    finally:
      shutil.rmtree(folder, ignore_errors=True)
    lines.sort(key=lambda line: line[0])
    if len(lines) != len(tasks):
      raise RuntimeError(f'Beam returned {len(lines)} results for {len(tasks)} tasks')
    for _, ok, value in lines:
      if not ok:
        raise UserError(value)
    for _, _, result in lines:
      if on_result:
        on_result(result)
    return [result for _, _, result in lines]

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass
