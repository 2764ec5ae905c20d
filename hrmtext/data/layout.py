"""On-disk layouts of the reference data pipeline, read and written here.

Tokenized root: one folder per source file holding `tokens.npy` and the index arrays
`inst_start/inst_len/resp_start/resp_len.npy` (offsets/lengths into tokens.npy, one entry per row),
plus `tokenizer_info.json` at the root.

Sampled training set: `tokens.npy`, `epoch_<k>/` holding the four index arrays already permuted for
epoch k, and `metadata.json` `{"tokenizer_info", "vocab_size", "max_seq_len", "total_length"}`.
Every folder is written under a temporary name and renamed when complete.
"""

import contextlib
import json
import os
import re
from typing import NamedTuple

import numpy as np

from hrmtext.errors import UserError
from hrmtext.files import atomic_path

METADATA_FILE = 'metadata.json'
_EPOCH_DIR = re.compile(r'epoch_(\d+)$')


class Index(NamedTuple):
  """Per-example offsets and lengths into a tokens array (int64)."""
  inst_start: np.ndarray
  inst_len: np.ndarray
  resp_start: np.ndarray
  resp_len: np.ndarray

  @classmethod
  def from_lengths(cls, inst_len, resp_len) -> 'Index':
    """Examples stored back to back, each its instruction then its response."""
    inst_len, resp_len = np.asarray(inst_len, np.int64), np.asarray(resp_len, np.int64)
    inst_start = np.cumsum(inst_len + resp_len) - (inst_len + resp_len)
    return cls(inst_start, inst_len, inst_start + inst_len, resp_len)

  def take(self, rows) -> 'Index':
    return Index(*(a[rows] for a in self))

  @classmethod
  def concatenate(cls, indices) -> 'Index':
    return cls(*(np.concatenate(arrays).astype(np.int64) for arrays in zip(*indices)))


def concatenate_sources(sources) -> tuple[np.ndarray, list[Index]]:
  """One tokens array for several (tokens, Index) sources, and their indices shifted into it."""
  tokens, indices, offset = [], [], 0
  for source_tokens, index in sources:
    indices.append(
        index._replace(inst_start=index.inst_start + offset, resp_start=index.resp_start + offset))
    tokens.append(np.asarray(source_tokens))
    offset += len(source_tokens)
  return (np.concatenate(tokens) if tokens else np.zeros(0, np.uint32)), indices


def save_index(directory: str, index: Index) -> None:
  for name, array in index._asdict().items():
    np.save(os.path.join(directory, f'{name}.npy'), np.asarray(array, np.int64))


def load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
  """`np.load`, with a damaged file (truncated, not .npy) as a one-line UserError naming it."""
  try:
    return np.load(path, mmap_mode=mmap_mode)
  except (ValueError, EOFError) as e:  # numpy says "mmap length is greater than file size", ...
    raise UserError(f'{path}: not a complete .npy file ({e})') from None


def load_index(directory: str) -> Index:
  return Index(*(load_npy(os.path.join(directory, f'{name}.npy')).astype(np.int64)
                 for name in Index._fields))


def token_dtype(vocab_size: int):
  """The smallest dtype holding ids below vocab_size, as the reference sampled set stores them."""
  for dtype in (np.uint8, np.uint16, np.int32):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return dtype
  raise UserError(f'vocab_size {vocab_size} too large')


def load_tokens(directory: str) -> np.ndarray:
  return load_npy(os.path.join(directory, 'tokens.npy'), mmap_mode='r')


@contextlib.contextmanager
def temp_dir(path):
  """A folder written under a temporary name and renamed to `path` (its parents created) only
  when the block succeeds."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path) as tmp:
    os.makedirs(tmp)
    yield tmp


def heldout_dir(root: str, kind: str) -> str:
  """Held-out data of a prepared root: kind 'raw' (JSONL rows) or 'tokenized'."""
  return os.path.join(root, kind, 'heldout')


# --- tokenized root -----------------------------------------------------------------------------


def write_tokenized_source(directory: str, tokens: np.ndarray, inst_len: np.ndarray,
                           resp_len: np.ndarray) -> None:
  """`tokens` holds each row's instruction then response ids, row after row."""
  with temp_dir(directory) as tmp:
    np.save(os.path.join(tmp, 'tokens.npy'), np.asarray(tokens, np.uint32))
    save_index(tmp, Index.from_lengths(inst_len, resp_len))


def tokenized_sources(root: str) -> dict[str, str]:
  """Source name -> folder, for every complete source folder under a tokenized root (sorted)."""
  return {
      name: os.path.join(root, name) for name in sorted(os.listdir(root))
      if os.path.exists(os.path.join(root, name, 'resp_len.npy')) and not name.endswith('.tmp')
  }


# --- sampled training set -----------------------------------------------------------------------


def write_sampled(directory: str, tokens: np.ndarray, epochs: list[Index], tokenizer_info: dict,
                  vocab_size: int, max_seq_len: int) -> None:
  with temp_dir(directory) as tmp:
    np.save(os.path.join(tmp, 'tokens.npy'), np.asarray(tokens).astype(token_dtype(vocab_size)))
    for k, index in enumerate(epochs):
      os.makedirs(os.path.join(tmp, f'epoch_{k}'))
      save_index(os.path.join(tmp, f'epoch_{k}'), index)
    metadata = dict(tokenizer_info=tokenizer_info, vocab_size=None, max_seq_len=int(max_seq_len),
                    total_length=int(epochs[0].inst_len.sum() + epochs[0].resp_len.sum()))
    with open(os.path.join(tmp, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)


class SampledSet:
  """A sampled training set on disk: tokens (memory-mapped), metadata and per-epoch indices."""

  def __init__(self, directory: str):
    if not os.path.exists(os.path.join(directory, METADATA_FILE)):
      raise FileNotFoundError(f'{directory}: no {METADATA_FILE}; not a sampled training set '
                              '(run `python -m hrmtext.prepare --output DIR`)')
    self.directory = directory
    with open(os.path.join(directory, METADATA_FILE)) as f:
      try:
        self.metadata = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f'{f.name}: invalid JSON ({e})') from None
    epochs = sorted(int(m.group(1)) for m in map(_EPOCH_DIR.match, os.listdir(directory)) if m)
    if epochs != list(range(len(epochs))) or not epochs:
      raise FileNotFoundError(
          f'{directory}: expected folders epoch_0..epoch_<k>, found epochs {epochs}')
    self.num_epochs = len(epochs)

  @property
  def max_seq_len(self) -> int:
    return int(self.metadata['max_seq_len'])

  def tokens(self) -> np.ndarray:
    return load_tokens(self.directory)

  def epoch(self, k: int) -> Index:
    return load_index(os.path.join(self.directory, f'epoch_{k}'))
