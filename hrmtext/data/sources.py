"""Raw instruction/response rows from JSONL or Parquet files, whole or in shards.

A row has string fields `instruction`, `response` and optionally `condition` (comma-separated tags,
default 'direct'); other fields (e.g. held-out rows' `task`, `answer`) are kept. A shard of a file
is read on its own (one task of `prepare`): a byte range of a JSONL file (the lines starting in
it) or a range of a Parquet file's row groups; shards depend only on the file and a shard size.
"""

import json
import math
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


def check_row(row, conditions=None) -> dict:
  """The row with its condition defaulted; BadRowError (without the row's place) if malformed."""
  if isinstance(row, Exception):
    raise row
  if not isinstance(row, dict):
    raise BadRowError(f'expected a JSON object, got {type(row).__name__}')
  row = dict(row)
  if row.get('condition') is None:
    row['condition'] = 'direct'
  for field in ('instruction', 'response', 'condition'):
    if not isinstance(row.get(field), str):
      raise BadRowError(f'field {field!r} must be a string, got {row.get(field)!r:.60}')
  unknown = [t for t in condition_tags(row['condition']) if t not in (conditions or ())]
  if conditions is not None and unknown:
    raise BadRowError(f'unknown condition tag(s) {unknown}; known: {sorted(conditions)}')
  return row


def _parse_line(line: bytes):
  """A JSONL line's value, or the BadRowError saying why it has none."""
  try:
    return json.loads(line.decode('utf-8'))
  except UnicodeDecodeError as e:
    return BadRowError(f'not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})')
  except json.JSONDecodeError as e:
    return BadRowError(f'invalid JSON ({e.msg})')


def where(path: str, record: int) -> str:
  """How messages name record `record` (0-based) of a file: its line, or its Parquet row."""
  return f'{path}: row {record}' if path.endswith('.parquet') else f'{path}:{record + 1}'


def raw_rows(path):
  """Yields (where, parsed row or the exception that parsing raised)."""
  for record, row in shard_records(path, None):
    if row is not None:
      yield where(path, record), row


def _parquet_file(path):
  """A file pyarrow cannot read (corrupt, or not Parquet) is a user error, not a crash."""
  try:
    return pq.ParquetFile(path)
  except pa.ArrowException as e:
    raise BadRowError(f'{path}: not a readable Parquet file ({e})') from None


def input_shards(path: str, shard_bytes: int) -> list[tuple[int, int]]:
  """The shards of an input file of about `shard_bytes` each: (first byte, end byte) of a JSONL
  file, (first row group, end row group) of a Parquet file. At least one."""
  if path.endswith('.parquet'):
    meta = _parquet_file(path).metadata
    shards, first, size = [], 0, 0
    for group in range(meta.num_row_groups - 1):
      size += meta.row_group(group).total_byte_size
      if size >= shard_bytes:
        shards.append((first, group + 1))
        first, size = group + 1, 0
    return shards + [(first, meta.num_row_groups)]
  size = os.path.getsize(path)
  count = max(1, math.ceil(size / shard_bytes))
  return [(k * size // count, (k + 1) * size // count) for k in range(count)]


def records_before(path: str, shard: tuple[int, int]) -> int:
  """Records (lines, Parquet rows) of the file before `shard`: to name a row by its place."""
  if path.endswith('.parquet'):
    meta = _parquet_file(path).metadata
    return sum(meta.row_group(g).num_rows for g in range(shard[0]))
  if shard[0] == 0:
    return 0
  count = 1  # the lines starting before the shard: the first, and one after each newline
  with open(path, 'rb') as f:  # before byte start - 1 (one there starts the shard's first)
    for block in iter(lambda: f.read(min(1 << 24, shard[0] - 1 - f.tell())), b''):
      count += block.count(b'\n')
  return count


def shard_records(path: str, shard: tuple[int, int] | None) -> Iterator[tuple[int, object]]:
  """Yields (record number within the shard, parsed row or the exception parsing raised) of a
  shard of `input_shards` (None: the whole file); a blank line's row is None."""
  if path.endswith('.parquet'):
    parquet = _parquet_file(path)
    groups = range(parquet.metadata.num_row_groups) if shard is None else range(*shard)
    record = 0
    try:
      for batch in parquet.iter_batches(row_groups=list(groups)) if len(groups) else ():
        for row in batch.to_pylist():
          yield record, row
          record += 1
    except pa.ArrowException as e:
      raise BadRowError(f'{path}: not a readable Parquet file ({e})') from None
    return
  start, end = (0, math.inf) if shard is None else shard
  with open(path, 'rb') as f:  # decoded per line: a non-UTF-8 line is one bad row, named
    position = start
    if start > 0:  # the line holding byte start - 1 is the previous shard's
      f.seek(start - 1)
      position += len(f.readline()) - 1
    for record, line in enumerate(f):
      if position >= end:
        break
      position += len(line)
      yield record, (_parse_line(line) if line.strip() else None)


def read_objects(path: str) -> list[dict]:
  """Every row of a JSONL/Parquet file, whatever its fields (eval sets, requests); a malformed row
  raises BadRowError in the same format as `read_rows`."""
  rows = []
  for place, row in raw_rows(path):
    if isinstance(row, Exception):
      raise BadRowError(f'{place}: {row}')
    if not isinstance(row, dict):
      raise BadRowError(f'{place}: expected a JSON object, got {type(row).__name__}')
    rows.append(row)
  return rows


def read_rows(path: str, skip_bad_rows: bool = False, bad_rows: list | None = None,
              conditions=None) -> Iterator[dict]:
  """Yields the rows of one JSONL/Parquet file.

  A malformed row (or, given `conditions`, one with an unknown condition tag) raises BadRowError,
  or with `skip_bad_rows` is left out and its message appended to `bad_rows`.
  """
  source_name(path)  # rejects unsupported suffixes
  for place, row in raw_rows(path):
    try:
      yield check_row(row, conditions)
    except BadRowError as e:
      if not skip_bad_rows:
        raise BadRowError(f'{place}: {e}') from None
      if bad_rows is not None:
        bad_rows.append(f'{place}: {e}')


def write_jsonl(path: str, rows) -> None:
  """Writes rows to `path` atomically (temp file, then rename)."""
  with atomic_open(path, encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
