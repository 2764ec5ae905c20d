"""Per-epoch stratified sampling of tokenized sources into the sampled training set layout.

Each source follows the first mixture rule whose `prefix` starts its name. Examples longer than
`seq_len + 1` tokens are cut (the response is truncated) or dropped, as the rule says; examples
whose response then has fewer than `min_resp_length` tokens are dropped. Per epoch a source
contributes round(repeat * eligible rows) rows, capped at `max_per_file`, read from an endless
sequence of per-pass permutations: successive epochs of a capped source see different rows and
every row is used before any repeats. Deterministic by seed.
"""

import collections
import zlib

import ml_collections
import numpy as np

from hrmtext.errors import UserError
from hrmtext.data.layout import Index, concatenate_sources, load_index, load_tokens, write_sampled
from hrmtext.data.tokenizer import Tokenizer

LONG_CONTEXT = ('truncate', 'drop')
CUT = 'cut to fit'  # the count of examples `eligible` keeps, cut: not a drop reason


def rule_for(name: str, rules) -> dict:
  for rule in rules:
    if name.startswith(rule['prefix']):
      if rule['long_context'] not in LONG_CONTEXT:
        raise UserError(f'mixture rule {rule}: long_context must be one of {LONG_CONTEXT}')
      return rule
  raise UserError(f'source {name!r} matches no mixture rule prefix {[r["prefix"] for r in rules]}')


def eligible(index: Index, rule: dict, context: int, min_resp_length: int,
             counts: collections.Counter | None = None) -> Index:
  """The source's usable examples, cut to `context` tokens (instruction + response); `counts`
  gets the examples dropped (by reason) and cut."""
  too_long = index.inst_len + index.resp_len > context
  resp_len = np.where(too_long, context - index.inst_len, index.resp_len)
  keep = resp_len >= min_resp_length
  if rule['long_context'] == 'drop':
    keep &= ~too_long
  if counts is not None:
    counts[f'longer than seq_len + 1 = {context} tokens'] += int((too_long & ~keep).sum())
    counts[f'with a response under min_resp_length = {min_resp_length} tokens (end-of-answer '
           f'included)'] += int((~too_long & ~keep).sum())
    counts[CUT] += int((too_long & keep).sum())
  return Index(index.inst_start, index.inst_len, index.resp_start, resp_len).take(keep)


def describe_dropped(counts: collections.Counter) -> str:
  """'12 dropped (10 longer than ..., 2 ...), 3 cut to fit' from `eligible`'s counts."""
  reasons = [f'{n} {reason}' for reason, n in counts.items() if n and reason != CUT]
  dropped = sum(n for reason, n in counts.items() if reason != CUT)
  text = f'{dropped} dropped' + (f' ({", ".join(reasons)})' if reasons else '')
  return text + (f', {counts[CUT]} {CUT}' if counts[CUT] else '')


def epoch_rows(num_rows: int, rule: dict, epoch: int, seed: int, name: str) -> np.ndarray:
  """Row ids a source contributes to `epoch` (positions of an endless chain of permutations)."""
  count = int(round(rule['repeat'] * num_rows))
  if rule['max_per_file'] >= 0:
    count = min(count, rule['max_per_file'])
  if num_rows == 0 or count == 0:
    return np.zeros(0, np.int64)
  positions = np.arange(epoch * count, (epoch + 1) * count)
  passes = positions // num_rows
  rows = np.empty(count, np.int64)
  for p in np.unique(passes):
    permutation = np.random.default_rng([seed, zlib.crc32(name.encode()), p]).permutation(num_rows)
    rows[passes == p] = permutation[positions[passes == p] % num_rows]
  return rows


def sample_epochs(sources: dict[str, tuple[np.ndarray, Index]], mixture: ml_collections.ConfigDict,
                  context: int, epochs: int, seed: int,
                  counts: collections.Counter | None = None) -> tuple[np.ndarray, list[Index]]:
  """All sources' tokens concatenated, and each epoch's shuffled index into them; `counts` as
  `eligible`'s."""
  names = list(sources)
  tokens, shifted = concatenate_sources(sources[name] for name in names)
  parts = []
  for name, index in zip(names, shifted):
    rule = rule_for(name, mixture.rules)
    parts.append((name, rule, eligible(index, rule, context, mixture.min_resp_length, counts)))
  indices = []
  for epoch in range(epochs):
    index = Index.concatenate([
        usable.take(epoch_rows(len(usable.inst_len), rule, epoch, seed, name))
        for name, rule, usable in parts
    ])
    indices.append(index.take(
        np.random.default_rng([seed, epoch]).permutation(len(index.inst_len))))
  return tokens, indices


def write_mixture(source_dirs: dict[str, str], out_dir: str, data_cfg: ml_collections.ConfigDict,
                  tokenizer: Tokenizer, counts: collections.Counter | None = None) -> list[Index]:
  """Samples `data_cfg.epochs` epochs of the tokenized sources into a sampled set at out_dir;
  `counts` as `eligible`'s. A UserError, with nothing written, when no example is left."""
  sources = {name: (load_tokens(d), load_index(d)) for name, d in source_dirs.items()}
  context = data_cfg.seq_len + 1
  counts = collections.Counter() if counts is None else counts
  tokens, epochs = sample_epochs(sources, data_cfg.mixture, context, data_cfg.epochs, data_cfg.seed,
                                 counts)
  if not any(len(epoch.inst_len) for epoch in epochs):
    total = sum(len(index.inst_len) for _, index in sources.values())
    kept = total - sum(n for reason, n in counts.items() if reason != CUT)
    rest = '; the mixture rules (repeat, max_per_file) take none of the rest' if kept else ''
    raise UserError(f'no examples to sample: of the {total} examples in {len(sources)} sources, '
                    f'{describe_dropped(counts)}{rest}' if total else
                    f'no examples to sample: the {len(sources)} sources are empty')
  write_sampled(out_dir, tokens, epochs, tokenizer.info_relative_to(out_dir), tokenizer.vocab_size,
                max_seq_len=context)
  return epochs
