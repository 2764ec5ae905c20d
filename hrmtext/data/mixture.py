"""Per-epoch stratified sampling of tokenized sources into the sampled training set layout.

Each source follows the first mixture rule whose `prefix` starts its name. Examples longer than
`seq_len + 1` tokens are cut (the response is truncated) or dropped, as the rule says; examples
whose response then has fewer than `min_resp_length` tokens are dropped. Per epoch a source
contributes round(repeat * eligible rows) rows, capped at `max_per_file`, read from an endless
sequence of per-pass permutations: successive epochs of a capped source see different rows and
every row is used before any repeats. Deterministic by seed.

Memory: an epoch is built from row ids (4 bytes per row below 2**32 rows) and one column of the
tokenized index at a time; nothing else grows with the corpus. Rows are numbered over all
sources' shards back to back, and so are tokens (the sampled set's token stream).
"""

import collections
import zlib
from typing import NamedTuple

import numpy as np

from hrmtext.errors import UserError
from hrmtext.data import layout

LONG_CONTEXT = ('truncate', 'drop')
CUT = 'cut to fit'  # the count of examples `usable` keeps, cut: not a drop reason
KEPT = 'kept'  # the count of usable examples (cut ones included): not a drop reason


def rule_for(name: str, rules) -> dict:
  for rule in rules:
    if name.startswith(rule['prefix']):
      if rule['long_context'] not in LONG_CONTEXT:
        raise UserError(f'mixture rule {rule}: long_context must be one of {LONG_CONTEXT}')
      return rule
  raise UserError(f'source {name!r} matches no mixture rule prefix {[r["prefix"] for r in rules]}')


def usable(inst_len, resp_len, rule, context, min_resp_length, counts=None):
  """(which examples are usable, their responses cut to `context` tokens in all); `counts` gets
  the examples dropped (by reason) and cut."""
  too_long = inst_len + resp_len > context
  resp_len = np.where(too_long, context - inst_len, resp_len)
  keep = resp_len >= min_resp_length
  if rule['long_context'] == 'drop':
    keep &= ~too_long
  if counts is not None:
    counts[f'longer than seq_len + 1 = {context} tokens'] += int((too_long & ~keep).sum())
    counts[f'with a response under min_resp_length = {min_resp_length} tokens (end-of-answer '
           f'included)'] += int((~too_long & ~keep).sum())
    counts[CUT] += int((too_long & keep).sum())
  return keep, resp_len


def describe_dropped(counts: collections.Counter) -> str:
  """'12 dropped (10 longer than ..., 2 ...), 3 cut to fit; 85 kept' from `usable`'s counts
  (and KEPT where counted)."""
  reasons = [f'{n} {reason}' for reason, n in counts.items() if n and reason not in (CUT, KEPT)]
  dropped = sum(n for reason, n in counts.items() if reason not in (CUT, KEPT))
  text = f'{dropped} dropped' + (f' ({", ".join(reasons)})' if reasons else '')
  text += f', {counts[CUT]} {CUT}' if counts[CUT] else ''
  return text + (f'; {counts[KEPT]} {KEPT}' if KEPT in counts else '')


def _id_dtype(count: int):
  return np.uint32 if count <= 1 << 32 else np.int64


def _permutation(key, n: int) -> np.ndarray:
  """np.random.default_rng(key).permutation(n), in 4 bytes per entry where n allows."""
  rows = np.arange(n, dtype=_id_dtype(n))
  return _shuffled(rows, key)


def _shuffled(values: np.ndarray, key) -> np.ndarray:
  """values[np.random.default_rng(key).permutation(len(values))], shuffled in place: the shuffle
  makes the same swaps whatever the array holds."""
  np.random.default_rng(key).shuffle(values)
  return values


def rows_per_epoch(num_rows: int, rule: dict) -> int:
  count = int(round(rule['repeat'] * num_rows))
  return min(count, rule['max_per_file']) if rule['max_per_file'] >= 0 else count


def _passes(num_rows: int, rule: dict, epoch: int):
  """(pass, first, end) of each pass of the source's endless chain of permutations that `epoch`
  reads: positions [first, end) of that pass's permutation, in order."""
  count = rows_per_epoch(num_rows, rule)
  if num_rows == 0 or count == 0:
    return []
  first = epoch * count
  return [(p, max(first - p * num_rows, 0), min(first + count - p * num_rows, num_rows))
          for p in range(first // num_rows, (first + count - 1) // num_rows + 1)]


def _pass_key(seed: int, name: str, p: int) -> list[int]:
  return [seed, zlib.crc32(name.encode()), p]


def epoch_rows(num_rows: int, rule: dict, epoch: int, seed: int, name: str) -> np.ndarray:
  """Row ids a source contributes to `epoch` (positions of an endless chain of permutations)."""
  parts = [_permutation(_pass_key(seed, name, p), num_rows)[first:end]
           for p, first, end in _passes(num_rows, rule, epoch)]
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Shard(NamedTuple):
  """A tokenized shard (reference layout): its folder, rows, and its tokens' offset in the token
  stream of all shards."""
  directory: str
  rows: int
  token_base: int


class Source(NamedTuple):
  name: str
  rule: dict
  shards: list  # of Shard


def plan_sources(source_dirs: dict[str, str], rules) -> tuple[list[Source], list[tuple[str, int]]]:
  """The sources in order with their shards, and (tokens.npy, length) of every shard in that
  order: the sampled set's token stream. Reads only .npy headers."""
  sources, token_files, base = [], [], 0
  for name, directory in source_dirs.items():
    shards = []
    for shard in layout.source_shards(directory):
      tokens = f'{shard}/tokens.npy'
      length = layout.npy_length(tokens)
      shards.append(Shard(shard, layout.npy_length(f'{shard}/resp_len.npy'), base))
      token_files.append((tokens, length))
      base += length
    sources.append(Source(name, rule_for(name, rules), shards))
  return sources, token_files


def _lengths(shard: Shard):
  """(inst_len, resp_len) pieces of a shard."""
  return zip(layout.npy_pieces(f'{shard.directory}/inst_len.npy'),
             layout.npy_pieces(f'{shard.directory}/resp_len.npy'))


def count_usable(shard: Shard, rule: dict, context: int, min_resp_length: int) -> dict:
  """The shard's usable rows and its rows dropped and cut, by reason (`usable`'s counts)."""
  counts, kept = collections.Counter(), 0
  for inst_len, resp_len in _lengths(shard):
    kept += int(usable(inst_len, resp_len, rule, context, min_resp_length, counts)[0].sum())
  return dict(usable=kept, counts=dict(counts))


def _usable_ids(source: Source, context, min_resp_length, dtype) -> np.ndarray:
  """Ids (numbered within the source) of its usable rows."""
  ids, count, base = np.empty(sum(shard.rows for shard in source.shards), dtype), 0, 0
  for shard in source.shards:
    for inst_len, resp_len in _lengths(shard):
      keep = np.flatnonzero(usable(inst_len, resp_len, source.rule, context, min_resp_length)[0])
      ids[count:count + len(keep)] = keep + base
      count, base = count + len(keep), base + len(inst_len)
  return ids[:count]


def epoch_order(sources: list[Source], epoch: int, seed: int, context: int,
                min_resp_length: int) -> np.ndarray:
  """Epoch `epoch` as ids of rows numbered over all sources, in the epoch's shuffled order
  (`epoch_rows` of each source, back to back, then shuffled): 8 bytes per row at most."""
  row_bases = np.cumsum([0] + [sum(s.rows for s in source.shards) for source in sources])
  dtype = _id_dtype(int(row_bases[-1]))
  parts = []
  for source, base in zip(sources, row_bases):
    ids = _usable_ids(source, context, min_resp_length, dtype)
    passes = _passes(len(ids), source.rule, epoch)
    for p, first, end in passes:
      if len(passes) == 1 and (first, end) == (0, len(ids)):  # one whole pass: no copy
        parts.append(_shuffled(ids, _pass_key(seed, source.name, p)))
      else:
        parts.append(ids[_permutation(_pass_key(seed, source.name, p), len(ids))[first:end]])
      parts[-1] += dtype(base)
    del ids
  rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
  del parts
  return _shuffled(rows, [seed, epoch])


def _column(sources: list[Source], name: str, dtype, with_token_base: bool = False) -> np.ndarray:
  """One index column of every row of all sources (starts shifted into the token stream)."""
  shards = [shard for source in sources for shard in source.shards]
  column, begin = np.empty(sum(s.rows for s in shards), dtype), 0
  for shard in shards:
    for values in layout.npy_pieces(f'{shard.directory}/{name}.npy'):
      if values.size and (values.max() > np.iinfo(dtype).max):
        raise UserError(f'{shard.directory}/{name}.npy: values too large for {dtype.__name__}')
      column[begin:begin + len(values)] = values
      if with_token_base:
        column[begin:begin + len(values)] += shard.token_base
      begin += len(values)
  return column


def epoch_fields(sources: list[Source], order: np.ndarray, context: int, totals: list):
  """(field name, pieces of int64 values) of the epoch's index arrays, one column in memory at a
  time; `totals` gets the epoch's token count when the last field is read."""

  def gathered(names, combine):
    columns = [_column(sources, n, np.int64 if 'start' in n else np.int32, 'start' in n)
               for n in names]
    for begin in range(0, len(order), layout.PIECE):
      rows = order[begin:begin + layout.PIECE]
      yield combine(*(column[rows].astype(np.int64) for column in columns))

  def resp_len(resp, inst):
    cut = np.where(inst + resp > context, context - inst, resp)
    totals.append(int((inst + cut).sum()))
    return cut

  return [('inst_start', gathered(['inst_start'], lambda x: x)),
          ('inst_len', gathered(['inst_len'], lambda x: x)),
          ('resp_start', gathered(['resp_start'], lambda x: x)),
          ('resp_len', gathered(['resp_len', 'inst_len'], resp_len))]


def no_examples_error(num_rows: int, num_sources: int, counts: collections.Counter) -> UserError:
  kept = num_rows - sum(n for reason, n in counts.items() if reason != CUT)
  rest = '; the mixture rules (repeat, max_per_file) take none of the rest' if kept else ''
  return UserError(f'no examples to sample: of the {num_rows} examples in {num_sources} sources, '
                   f'{describe_dropped(counts)}{rest}' if num_rows else
                   f'no examples to sample: the {num_sources} sources are empty')
