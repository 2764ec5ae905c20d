"""Tokenizer with PrefixLM special tokens: a trained sentencepiece BPE model or a HF tokenizer.json.

Both are described by `tokenizer_info.json` in the reference format:
`{"tokenizer_path", "boq", "eoq", "eoa", "condition_mapping": {tag: token string}, "vocab_size"}`.
A relative `tokenizer_path` is relative to the folder holding the json file. `encode` never
produces special tokens from raw text: their strings inside text are encoded as plain text.
"""

import filecmp
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import sentencepiece as spm
import tokenizers

from hrmtext.errors import UserError
from hrmtext.files import atomic_open

INFO_FILE = 'tokenizer_info.json'
SPM_FILE = 'spm.model'
BOQ, EOQ, EOA = '<|boq|>', '<|eoq|>', '<|eoa|>'


def condition_token(tag: str) -> str:
  return f'<|{tag}|>'


def condition_tags(condition: str) -> list[str]:
  """Tags of a comma-separated condition such as 'synth,cot'."""
  return [t.strip() for t in condition.split(',') if t.strip()]


class _SentencePiece:
  """sentencepiece backend; special tokens are control symbols, which encode() never emits."""

  def __init__(self, path):
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    return self._sp.decode(ids)  # control symbols decode to ''

  def token_id(self, token):
    token_id = self._sp.piece_to_id(token)  # unknown pieces map to the unk id
    return token_id if self._sp.id_to_piece(token_id) == token else None


class _HuggingFace:
  """HF `tokenizers` backend (a tokenizer.json); special tokens are its added tokens."""

  def __init__(self, path):
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.encode_special_tokens = True  # special-token strings in text stay plain text
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def token_id(self, token):
    return self._tok.token_to_id(token)


class Tokenizer:
  """Encodes text and PrefixLM examples.

  instruction = [BOQ, one id per condition tag, text..., EOQ]; response = [text..., EOA].
  """

  def __init__(self, info: dict, info_dir: str = '.'):
    self.info = dict(info)
    self.path = _resolve(info['tokenizer_path'], info_dir)
    backend = _HuggingFace if self.path.endswith('.json') else _SentencePiece
    self._backend = backend(self.path)
    self.vocab_size = self._backend.vocab_size
    self.boq, self.eoq, self.eoa = (self._special_id(info[k]) for k in ('boq', 'eoq', 'eoa'))
    self.condition_ids = {
        tag: self._special_id(tok) for tag, tok in info['condition_mapping'].items()
    }

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    """From a tokenizer_info.json, a folder holding one, or a sampled set (its metadata.json)."""
    if os.path.isdir(path):
      if os.path.exists(os.path.join(path, INFO_FILE)):
        path = os.path.join(path, INFO_FILE)
      elif os.path.exists(os.path.join(path, 'metadata.json')):
        with open(os.path.join(path, 'metadata.json')) as f:
          return cls(json.load(f)['tokenizer_info'], path)
      else:
        raise FileNotFoundError(f'{path}: holds neither {INFO_FILE} nor metadata.json')
    with open(path) as f:
      return cls(json.load(f), os.path.dirname(path))

  def _special_id(self, token):
    token_id = self._backend.token_id(token)
    if token_id is None:
      raise UserError(f'{self.path}: special token {token!r} is not in the vocabulary')
    return token_id

  def encode(self, text: str) -> list[int]:
    return self._backend.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._backend.decode([int(i) for i in ids])

  def condition_tag_ids(self, condition: str) -> list[int]:
    """One id per tag of a comma-separated condition such as 'synth,cot'."""
    tags = condition_tags(condition)
    unknown = [t for t in tags if t not in self.condition_ids]
    if unknown:
      raise UserError(f'unknown condition tag(s) {unknown}; known: {sorted(self.condition_ids)}')
    return [self.condition_ids[t] for t in tags]

  def encode_instruction(self, instruction: str, condition: str = 'direct') -> list[int]:
    return [self.boq, *self.condition_tag_ids(condition), *self.encode(instruction), self.eoq]

  def encode_response(self, text: str) -> list[int]:
    return [*self.encode(text), self.eoa]

  def info_relative_to(self, directory: str) -> dict:
    """tokenizer_info for a json file in `directory` (the model path relative to it)."""
    return dict(self.info, tokenizer_path=os.path.relpath(self.path, directory),
                vocab_size=self.vocab_size)

  def save_info(self, directory: str) -> str:
    """Writes tokenizer_info.json into `directory`, pointing at this tokenizer's model file."""
    os.makedirs(directory, exist_ok=True)
    return _write_json(os.path.join(directory, INFO_FILE), self.info_relative_to(directory))

  def copy_to(self, directory: str) -> 'Tokenizer':
    """This tokenizer in `directory`, standing alone: its model file (unless a file of that name
    is there already) and a tokenizer_info.json next to it."""
    name = os.path.basename(self.path)
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(os.path.join(directory, name)):
      shutil.copy2(self.path, os.path.join(directory, name))
    copy = Tokenizer(dict(self.info, tokenizer_path=name), directory)
    copy.save_info(directory)
    return copy

  def same_as(self, other: 'Tokenizer') -> bool:
    """Whether `other` encodes as this one: the same model file bytes and prompt tokens."""
    prompt_tokens = lambda t: [t.info[k] for k in ('boq', 'eoq', 'eoa', 'condition_mapping')]
    return (prompt_tokens(self) == prompt_tokens(other) and
            filecmp.cmp(self.path, other.path, shallow=False))


def _resolve(path, info_dir):
  candidates = [path] if os.path.isabs(path) else [os.path.join(info_dir, path), path]
  for candidate in candidates:
    if os.path.exists(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(
      f'tokenizer file {path!r} not found (looked in {info_dir!r} and the current folder)')


def _write_json(path, obj):
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2)
  return path


def train_tokenizer(texts: Iterable[str], directory: str, vocab_size: int,
                    conditions: Sequence[str]) -> Tokenizer:
  """Trains a byte-fallback BPE sentencepiece model on `texts`; writes it and tokenizer_info.json.

  Digits are split (one token per digit) so arithmetic stays learnable; rare characters fall back
  to bytes and normalisation is off, so decode(encode(text)) == text for any text.
  """
  os.makedirs(directory, exist_ok=True)
  condition_mapping = {tag: condition_token(tag) for tag in conditions}
  text_errors = []  # raised by `texts` itself (a malformed input row): that is the error to report

  def sentences():
    try:
      yield from texts
    except Exception as e:  # re-raised below, not swallowed
      text_errors.append(e)
      raise

  with atomic_open(os.path.join(directory, SPM_FILE), 'wb') as model_file:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=sentences(), model_writer=model_file, vocab_size=vocab_size,
          model_type='bpe', control_symbols=[BOQ, EOQ, EOA, *condition_mapping.values()], pad_id=0,
          unk_id=1, bos_id=-1, eos_id=-1, byte_fallback=True, split_digits=True,
          character_coverage=0.9995, normalization_rule_name='identity', add_dummy_prefix=False,
          remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # e.g. a vocab_size too small for the corpus's characters
      if text_errors:  # sentencepiece wraps it in a RuntimeError with its own stack ("At: ...")
        raise text_errors[0] from None
      raise UserError(f'tokenizer training failed: {str(e).splitlines()[0].split("] ")[-1]}') from e
  info = dict(tokenizer_path=SPM_FILE, boq=BOQ, eoq=EOQ, eoa=EOA,
              condition_mapping=condition_mapping)
  tokenizer = Tokenizer(info, directory)
  tokenizer.save_info(directory)
  return tokenizer
