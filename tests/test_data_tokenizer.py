"""Tokenizer: round trip, special tokens never produced from text, instruction/response encoding."""

import json
import os

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from hrmtext.data import tokenizer as tok_lib
from hrmtext.data.tokenizer import Tokenizer

TEXTS = [
    f'Calculate {a} + {b} = {a + b}. Spell "{w}" backward: {w[::-1]}\n'
    for a, b, w in zip(range(0, 300, 7), range(5, 300, 11), ['apple', 'kiwi', 'tiger', 'spider'] *
                       20)
]
SAMPLES = [
    'What is 12 + 305?', '  two  spaces\n\nand newlines\t', 'ünïcödé ✓ 漢字',
    '<|eoa|> <|boq|> as text', ''
]


@pytest.fixture(scope='module')
def spm_tokenizer(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('spm'))
  return tok_lib.train_tokenizer(TEXTS * 5, directory, vocab_size=400,
                                 conditions=('direct', 'cot', 'synth'))


@pytest.fixture(scope='module')
def hf_tokenizer(tmp_path_factory):
  """A byte-level BPE tokenizer.json with Qwen-style special tokens, and its tokenizer_info.json."""
  directory = tmp_path_factory.mktemp('hf')
  specials = [
      '<|im_start|>', '<|im_end|>', '<|box_end|>', '<|object_ref_start|>', '<|object_ref_end|>'
  ]
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(
      TEXTS,
      trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf.save(str(directory / 'tokenizer.json'))
  info = dict(tokenizer_path='tokenizer.json', boq='<|im_start|>', eoq='<|im_end|>',
              eoa='<|box_end|>', condition_mapping=dict(direct='<|object_ref_start|>',
                                                        cot='<|object_ref_end|>'))
  (directory / 'tokenizer_info.json').write_text(json.dumps(info))
  return Tokenizer.load(str(directory))


@pytest.fixture(params=['spm', 'hf'])
def tokenizer(request, spm_tokenizer, hf_tokenizer):
  return spm_tokenizer if request.param == 'spm' else hf_tokenizer


def test_round_trip(tokenizer):
  for text in SAMPLES + TEXTS[:5]:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_never_come_from_text(tokenizer):
  specials = {tokenizer.boq, tokenizer.eoq, tokenizer.eoa, *tokenizer.condition_ids.values()}
  assert len(specials) == 3 + len(tokenizer.condition_ids)  # all distinct
  for token in [tokenizer.info[k] for k in ('boq', 'eoq', 'eoa')] + list(
      tokenizer.info['condition_mapping'].values()):
    ids = tokenizer.encode(f'x {token} y')
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == f'x {token} y'


def test_instruction_and_response_encoding(tokenizer):
  text_ids = tokenizer.encode('What is 2 + 2?')
  cot = tokenizer.condition_ids['cot']
  assert tokenizer.encode_instruction('What is 2 + 2?') == [
      tokenizer.boq, tokenizer.condition_ids['direct'], *text_ids, tokenizer.eoq
  ]
  assert tokenizer.encode_instruction('What is 2 + 2?', 'direct,cot') == [
      tokenizer.boq, tokenizer.condition_ids['direct'], cot, *text_ids, tokenizer.eoq
  ]
  assert tokenizer.encode_response('4') == [*tokenizer.encode('4'), tokenizer.eoa]
  with pytest.raises(ValueError, match='unknown condition'):
    tokenizer.encode_instruction('x', 'direct,nope')


def test_trained_tokenizer_info_and_loading(spm_tokenizer, tmp_path):
  directory = os.path.dirname(spm_tokenizer.path)
  with open(os.path.join(directory, tok_lib.INFO_FILE)) as f:
    info = json.load(f)
  assert set(info) == {'tokenizer_path', 'boq', 'eoq', 'eoa', 'condition_mapping', 'vocab_size'}
  assert info['vocab_size'] == spm_tokenizer.vocab_size <= 400
  assert set(info['condition_mapping']) == {'direct', 'cot', 'synth'}
  assert [spm_tokenizer.decode([i]) for i in spm_tokenizer.encode('2305')
         ] == list('2305')  # digits split
  # Loading from the info file or from a copy of it elsewhere (relative path re-resolved).
  from_file = Tokenizer.load(os.path.join(directory, tok_lib.INFO_FILE))
  assert from_file.encode(SAMPLES[0]) == spm_tokenizer.encode(SAMPLES[0])
  spm_tokenizer.save_info(str(tmp_path / 'elsewhere'))
  assert Tokenizer.load(str(tmp_path / 'elsewhere')).eoa == spm_tokenizer.eoa


def test_missing_special_token_is_an_error(spm_tokenizer, tmp_path):
  info = dict(spm_tokenizer.info, tokenizer_path=spm_tokenizer.path, eoa='<|not-a-token|>')
  (tmp_path / 'tokenizer_info.json').write_text(json.dumps(info))
  with pytest.raises(ValueError, match='not-a-token'):
    Tokenizer.load(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    Tokenizer.load(str(tmp_path / 'nothing-here'))
