"""Raw instruction/response rows from JSONL or Parquet files.

A row has string fields `instruction`, `response` and optionally `condition` (comma-separated tags,
default 'direct'); other fields (e.g. held-out rows' `task`, `answer`) are kept.
"""

import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from hrmtext.errors import UserError
from hrmtext.files import atomic_open
from hrmtext.data.tokenizer import condition_tags

SUFFIXES = ('.jsonl', '.parquet')


class BadRowError(UserError):
  """A malformed input row; the message names the file and line (JSONL) or row (Parquet)."""


def source_name(path: str) -> str:
  """The source's name (file name without suffix); mixture rules match it by prefix."""
  name = os.path.basename(path)
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  raise BadRowError(f'{path}: unsupported input file (expected {" or ".join(SUFFIXES)})')


def _checked(row, where, conditions):
  if not isinstance(row, dict):
    raise BadRowError(f'{where}: expected a JSON object, got {type(row).__name__}')
  row = dict(row)
  if row.get('condition') is None:
    row['condition'] = 'direct'
  for field in ('instruction', 'response', 'condition'):
    if not isinstance(row.get(field), str):
      raise BadRowError(f'{where}: field {field!r} must be a string, got {row.get(field)!r:.60}')
  unknown = [t for t in condition_tags(row['condition']) if t not in (conditions or ())]
  if conditions is not None and unknown:
    raise BadRowError(f'{where}: unknown condition tag(s) {unknown}; known: {sorted(conditions)}')
  return row


def raw_rows(path):
  """Yields (where, parsed row or the exception that parsing raised)."""
  if path.endswith('.parquet'):
    yield from _parquet_rows(path)
    return
  with open(path, 'rb') as f:  # decoded per line: a non-UTF-8 line is one bad row, named
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line.decode('utf-8'))
      except UnicodeDecodeError as e:
        row = BadRowError(f'not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})')
      except json.JSONDecodeError as e:
        row = BadRowError(f'invalid JSON ({e.msg})')
      yield f'{path}:{line_no}', row


def _parquet_rows(path):
  """A file pyarrow cannot read (corrupt, or not Parquet) is a user error, not a crash."""
  index = 0
  try:
    for batch in pq.ParquetFile(path).iter_batches():
      for row in batch.to_pylist():
        yield f'{path}: row {index}', row
        index += 1
  except pa.ArrowException as e:
    raise BadRowError(f'{path}: not a readable Parquet file ({e})') from None


def read_objects(path: str) -> list[dict]:
  """Every row of a JSONL/Parquet file, whatever its fields (eval sets, requests); a malformed row
  raises BadRowError in the same format as `read_rows`."""
  rows = []
  for where, row in raw_rows(path):
    if isinstance(row, Exception):
      raise BadRowError(f'{where}: {row}')
    if not isinstance(row, dict):
      raise BadRowError(f'{where}: expected a JSON object, got {type(row).__name__}')
    rows.append(row)
  return rows


def read_rows(path: str, skip_bad_rows: bool = False, bad_rows: list | None = None,
              conditions=None) -> Iterator[dict]:
  """Yields the rows of one JSONL/Parquet file.

  A malformed row (or, given `conditions`, one with an unknown condition tag) raises BadRowError,
  or with `skip_bad_rows` is left out and its message appended to `bad_rows`.
  """
  source_name(path)  # rejects unsupported suffixes
  for where, row in raw_rows(path):
    try:
      if isinstance(row, Exception):
        raise BadRowError(f'{where}: {row}')
      yield _checked(row, where, conditions)
    except BadRowError as e:
      if not skip_bad_rows:
        raise
      if bad_rows is not None:
        bad_rows.append(str(e))


def write_jsonl(path: str, rows) -> None:
  """Writes rows to `path` atomically (temp file, then rename)."""
  with atomic_open(path, encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
