"""On-disk layouts of the reference data pipeline, read and written here, and their sharded forms.

Tokenized root: one folder per source holding `tokens.npy` and the index arrays
`inst_start/inst_len/resp_start/resp_len.npy` (offsets/lengths into tokens.npy, one entry per row),
plus `tokenizer_info.json` at the root. A source made of several shards holds, instead,
`part-<k>-of-<n>/` folders, each in that layout; one shard is the folder itself (the reference's).

Sampled training set: the tokens, `epoch_<k>/` holding the four index arrays already permuted for
epoch k, and `metadata.json` `{"tokenizer_info", "vocab_size", "max_seq_len", "total_length"}`.
The tokens are the reference's one `tokens.npy`, or token shards listed in metadata.json
(`"token_shards": [[file name, length], ...]`) that readers concatenate: the offsets index that
concatenation. metadata.json is written last: a folder without it is not a sampled set (yet).
Every file or folder is written under a temporary name and renamed when complete. Readers take
local paths or object storage (etils.epath: gs://, s3://, where its filesystem is installed).
"""

import contextlib
import json
import os
import re
import shutil
from typing import NamedTuple

from etils import epath
import numpy as np
from numpy.lib import format as npy_format

from hrmtext.errors import UserError
from hrmtext.files import atomic_path

METADATA_FILE = 'metadata.json'
_EPOCH_DIR = re.compile(r'epoch_(\d+)$')
_PART_DIR = re.compile(r'part-(\d{5})-of-(\d{5})$')
PIECE = 1 << 16  # elements per read or write of the streaming helpers (512 KiB of int64)


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


def is_local(path) -> bool:
  return '://' not in str(path)


# --- .npy files in pieces: bounded memory, and object storage -----------------------------------


class NpyWriter:
  """A 1-D .npy file (local) appended to piece by piece, byte for byte what np.save writes: the
  header is rewritten with the final length on close (numpy leaves room for it to grow)."""

  def __init__(self, path: str, dtype):
    self.dtype, self.length = np.dtype(dtype), 0
    self._file = open(path, 'wb')
    self._write_header()

  def _write_header(self):
    self._file.seek(0)
    npy_format.write_array_header_1_0(self._file, dict(
        descr=npy_format.dtype_to_descr(self.dtype), fortran_order=False, shape=(self.length,)))

  def append(self, values) -> None:
    values = np.ascontiguousarray(values, self.dtype)
    self._file.write(values.data)
    self.length += len(values)

  def close(self) -> None:
    self._write_header()
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close() if exc[0] else self.close()


def _npy_header(f, path):
  """(dtype, length, data offset) of a 1-D .npy file object."""
  try:
    version = npy_format.read_magic(f)
    shape, _, dtype = (npy_format.read_array_header_1_0(f) if version == (1, 0) else
                       npy_format.read_array_header_2_0(f))
  except ValueError as e:
    raise UserError(f'{path}: not a complete .npy file ({e})') from None
  if len(shape) != 1:
    raise UserError(f'{path}: expected a 1-D array, found shape {shape}')
  return dtype, shape[0], f.tell()


def npy_length(path) -> int:
  with epath.Path(path).open('rb') as f:
    return _npy_header(f, path)[1]


def npy_pieces(path, start: int = 0, stop: int | None = None, piece: int = PIECE):
  """Yields elements [start, stop) of a 1-D .npy file in arrays of at most `piece`: what is read
  is all that is held (a memory map would keep every page it touched resident)."""
  with epath.Path(path).open('rb') as f:
    dtype, length, offset = _npy_header(f, path)
    stop = length if stop is None else stop
    f.seek(offset + start * dtype.itemsize)
    for begin in range(start, stop, piece):
      values = np.empty(min(piece, stop - begin), dtype)
      if f.readinto(memoryview(values).cast('B')) != values.nbytes:
        raise UserError(f'{path}: not a complete .npy file (shorter than its header says)')
      yield values


def save_index(directory: str, index: Index) -> None:
  for name, array in index._asdict().items():
    np.save(os.path.join(directory, f'{name}.npy'), np.asarray(array, np.int64))


def load_npy(path, mmap_mode: str | None = None) -> np.ndarray:
  """`np.load` (a memory map only of a local file), with a damaged file (truncated, not .npy)
  as a one-line UserError naming it."""
  try:
    if is_local(path):
      return np.load(os.fspath(path), mmap_mode=mmap_mode)
    with epath.Path(path).open('rb') as f:
      return np.load(f)
  except (ValueError, EOFError) as e:  # numpy says "mmap length is greater than file size", ...
    raise UserError(f'{path}: not a complete .npy file ({e})') from None


def load_index(directory) -> Index:
  return Index(*(load_npy(epath.Path(directory) / f'{name}.npy').astype(np.int64)
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


def remove_stale_temporaries(directory: str) -> None:
  """Removes what a killed writer left of its temporary names (files.atomic_path's folders) in
  `directory`: a rerun then ends with the bytes of a run never interrupted."""
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if name.startswith('.') and name.endswith('.tmp'):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def heldout_dir(root: str, kind: str) -> str:
  """Held-out data of a prepared root: kind 'raw' (JSONL rows) or 'tokenized'."""
  return os.path.join(root, kind, 'heldout')


# --- tokenized root -----------------------------------------------------------------------------


def shard_dir(source_dir: str, shard: int, num_shards: int) -> str:
  """Where shard `shard` of a source's `num_shards` goes (one shard: the source folder)."""
  if num_shards == 1:
    return source_dir
  return os.path.join(source_dir, f'part-{shard:05d}-of-{num_shards:05d}')


def source_shards(source_dir: str) -> list[str] | None:
  """The folders (reference layout) making a tokenized source, in order; None unless complete."""
  if os.path.exists(os.path.join(source_dir, 'resp_len.npy')):
    return [source_dir]
  if not os.path.isdir(source_dir):
    return None
  parts = sorted(name for name in os.listdir(source_dir) if _PART_DIR.match(name))
  count = int(_PART_DIR.match(parts[0]).group(2)) if parts else 0
  if not parts or parts != [f'part-{k:05d}-of-{count:05d}' for k in range(count)]:
    return None
  return [os.path.join(source_dir, name) for name in parts]


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
      if not name.startswith('.') and source_shards(os.path.join(root, name))
  }


def load_source(source_dir: str) -> tuple[np.ndarray, Index]:
  """A whole tokenized source in memory (its shards concatenated): for small ones (held-out)."""
  tokens, indices, offset = [], [], 0
  for directory in source_shards(source_dir) or []:
    index = load_index(directory)
    indices.append(index._replace(inst_start=index.inst_start + offset,
                                  resp_start=index.resp_start + offset))
    tokens.append(load_tokens(directory))
    offset += len(tokens[-1])
  if not tokens:
    raise FileNotFoundError(f'{source_dir}: not a complete tokenized source')
  return np.concatenate(tokens), Index.concatenate(indices)


# --- sampled training set -----------------------------------------------------------------------


def token_shard_name(shard: int, num_shards: int) -> str:
  """The file of token shard `shard` of `num_shards` (one: the reference's tokens.npy)."""
  return 'tokens.npy' if num_shards == 1 else f'tokens-{shard:05d}-of-{num_shards:05d}.npy'


def write_metadata(directory: str, token_shards: list[tuple[str, int]], tokenizer_info: dict,
                   max_seq_len: int, total_length: int) -> None:
  """The sampled set's metadata.json, written last: the set is complete once it exists."""
  metadata = dict(tokenizer_info=tokenizer_info, vocab_size=None, max_seq_len=int(max_seq_len),
                  total_length=int(total_length))
  if len(token_shards) != 1:
    metadata['token_shards'] = [[name, int(length)] for name, length in token_shards]
  with atomic_path(os.path.join(directory, METADATA_FILE)) as tmp, open(tmp, 'w') as f:
    json.dump(metadata, f, indent=2)


def write_epoch(directory: str, k: int, fields) -> None:
  """epoch_<k>/ from (field name, pieces of int64 values) pairs, in Index field order."""
  with temp_dir(os.path.join(directory, f'epoch_{k}')) as tmp:
    for name, pieces in fields:
      with NpyWriter(os.path.join(tmp, f'{name}.npy'), np.int64) as writer:
        for values in pieces:
          writer.append(values)


class _RangedReads:
  """A 1-D .npy file on object storage, read by position: one ranged read per run of
  consecutive positions (a memory map needs a local file)."""

  def __init__(self, path):
    self._path, self._file = path, None

  def __getstate__(self):
    return dict(self.__dict__, _file=None)

  def __getitem__(self, positions):
    if self._file is None:
      self._file = epath.Path(self._path).open('rb')
      self._dtype, self._length, self._offset = _npy_header(self._file, self._path)
    positions = np.asarray(positions, np.int64)
    out = np.empty(len(positions), self._dtype)
    starts = np.flatnonzero(np.diff(positions, prepend=-2) != 1)
    for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), len(positions)]):
      self._file.seek(self._offset + int(positions[begin]) * self._dtype.itemsize)
      out[begin:end] = np.frombuffer(self._file.read((end - begin) * self._dtype.itemsize),
                                     self._dtype)
    return out


class TokenShards:
  """The tokens of a sampled set as one array indexed by position, over any number of .npy
  shards: memory-mapped where local, ranged reads on object storage. Shards open when first read
  (a pickled copy, e.g. in a Grain worker, opens its own)."""

  def __init__(self, paths: list, lengths: list[int]):
    self.paths = [str(p) for p in paths]
    self.ends = np.cumsum(np.asarray(lengths, np.int64))
    self._arrays = [None] * len(self.paths)

  def __getstate__(self):
    return dict(self.__dict__, _arrays=[None] * len(self.paths))

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  @property
  def num_shards(self) -> int:
    return len(self.paths)

  def shard(self, k: int):
    if self._arrays[k] is None:
      path = self.paths[k]
      # A plain view of the memory map: fancy indexing a np.memmap is slower.
      self._arrays[k] = (np.asarray(load_npy(path, mmap_mode='r')) if is_local(path) else
                         _RangedReads(path))
    return self._arrays[k]

  def shard_of(self, positions) -> np.ndarray:
    """The shard holding each position."""
    return np.searchsorted(self.ends, positions, side='right')

  def take_grouped(self, positions: np.ndarray, groups) -> np.ndarray:
    """tokens[positions], given (shard, begin, end): positions[begin:end] lie in that shard."""
    if self.num_shards == 1:
      return self.shard(0)[positions]
    out = np.empty(len(positions), self.dtype)
    for k, begin, end in groups:
      base = int(self.ends[k - 1]) if k else 0
      out[begin:end] = self.shard(k)[positions[begin:end] - base]
    return out

  def __getitem__(self, positions) -> np.ndarray:
    """tokens[positions] for an array of positions."""
    positions = np.asarray(positions, np.int64)
    shards = self.shard_of(positions)
    order = np.argsort(shards, kind='stable')
    first = np.flatnonzero(np.diff(shards[order], prepend=-1))
    groups = zip(shards[order][first].tolist(), first.tolist(), [*first[1:].tolist(), len(order)])
    out = np.empty(len(positions), self.dtype)
    out[order] = self.take_grouped(positions[order], groups)
    return out

  def __array__(self, dtype=None, copy=None):
    starts = [0, *self.ends[:-1].tolist()]
    values = np.concatenate([np.asarray(self.shard(k)[np.arange(end - start)])
                             for k, (start, end) in enumerate(zip(starts, self.ends.tolist()))])
    return values if dtype is None else values.astype(dtype)

  @property
  def dtype(self):
    if not hasattr(self, '_dtype'):
      with epath.Path(self.paths[0]).open('rb') as f:
        self._dtype = _npy_header(f, self.paths[0])[0]
    return self._dtype


class SampledSet:
  """A sampled training set (local or on object storage): metadata, tokens and epoch indices."""

  def __init__(self, directory):
    self.directory = str(directory)
    path = epath.Path(directory)
    if not (path / METADATA_FILE).exists():
      raise FileNotFoundError(f'{directory}: no {METADATA_FILE}; not a sampled training set '
                              '(run `python -m hrmtext.prepare --output DIR`)')
    try:
      self.metadata = json.loads((path / METADATA_FILE).read_text())
    except json.JSONDecodeError as e:
      raise UserError(f'{path / METADATA_FILE}: invalid JSON ({e})') from None
    epochs = sorted(int(m.group(1)) for m in (_EPOCH_DIR.match(p.name) for p in path.iterdir())
                    if m)
    if epochs != list(range(len(epochs))) or not epochs:
      raise FileNotFoundError(
          f'{directory}: expected folders epoch_0..epoch_<k>, found epochs {epochs}')
    self.num_epochs = len(epochs)

  @property
  def max_seq_len(self) -> int:
    return int(self.metadata['max_seq_len'])

  def tokens(self) -> TokenShards:
    path = epath.Path(self.directory)
    shards = self.metadata.get('token_shards')
    if shards is None:
      return TokenShards([path / 'tokens.npy'], [npy_length(path / 'tokens.npy')])
    return TokenShards([path / name for name, _ in shards], [length for _, length in shards])

  def epoch_dir(self, k: int):
    return epath.Path(self.directory) / f'epoch_{k}'

  def epoch(self, k: int) -> Index:
    return load_index(self.epoch_dir(k))
