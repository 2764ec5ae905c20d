"""The released-checkpoint journey with no hand-written files: a HF directory as a hub release looks
(random HrmTextForCausalLM weights, a small `tokenizers` BPE holding the release's special tokens,
a minimal legacy config.json) is converted, then generates what transformers generates and
scores token-id rows; a directory without a tokenizer still scores id rows; export gives the
files back."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import hf_oracle
from tests.hf_oracle import needs_hf, torch, transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = {'boq': '<|im_start|>', 'eoq': '<|im_end|>', 'eoa': '<|box_end|>',
           'direct': '<|object_ref_start|>', 'cot': '<|object_ref_end|>', 'noisy': '<|quad_start|>',
           'synth': '<|quad_end|>'}
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>',
            '<|object_ref_end|>', '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>']
PROMPT = 'What is 3 + 4? Think step by step.'
NEW_TOKENS = 10


def cli(name, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', f'hrmtext.{name}', *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def assert_ok(result):
  assert result.returncode == 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]


def assert_one_line_error(result, *fragments):
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, last


def train_tokenizer(path):
  """A byte-level BPE (as Qwen's) trained with `tokenizers`, the release's special tokens added."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = ['What is 3 + 4? The answer is 7.', 'Think step by step about the numbers.',
           'Paris is the capital of France.'] * 20
  tok.train_from_iterator(texts, trainer)
  tok.save(str(path))
  return tok


def write_hub_dir(path, *, with_tokenizer=True, seed=0):
  """A HF directory as a hub release looks; returns its minimal legacy config.json."""
  path.mkdir()
  vocab, eos = 300, 299
  if with_tokenizer:
    tok = train_tokenizer(path / 'tokenizer.json')
    vocab, eos = tok.get_vocab_size(), tok.token_to_id('<|box_end|>')
    (path / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|im_start|>',
         'eos_token': '<|box_end|>', 'model_max_length': 2048}))
  model = hf_oracle.make_hf_model(seed=seed, vocab=vocab, layers=2)
  model.save_pretrained(path)
  # Only what transformers needs, in the legacy form: num_hidden_layers = blocks per stack, no
  # num_layers_per_stack, L_bp_cycles, embedding_scale (1 / initializer_range) or RoPE fields.
  config = {'architectures': ['HrmTextForCausalLM'], 'model_type': 'hrm_text',
            'vocab_size': vocab, 'hidden_size': 64, 'intermediate_size': 128,
            'num_hidden_layers': 2, 'num_attention_heads': 2, 'head_dim': 32,
            'initializer_range': 64**-0.5, 'eos_token_id': eos}
  (path / 'config.json').write_text(json.dumps(config, indent=2))
  return config


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(HF dir, converted hrmtext dir)."""
  root = tmp_path_factory.mktemp('release')
  write_hub_dir(root / 'hub')
  result = cli('convert', f'--src={root / "hub"}', f'--dst={root / "ours"}')
  assert_ok(result)
  return root / 'hub', root / 'ours'


def hf_generate(hf_dir, prompt_ids, eos):
  model = transformers.HrmTextForCausalLM.from_pretrained(hf_dir, attn_implementation='sdpa')
  ids = torch.tensor([prompt_ids])
  with torch.no_grad():  # the whole prompt is the instruction: one bidirectional block
    out = model.eval().generate(ids, token_type_ids=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
  new = out[0, len(prompt_ids):].tolist()
  return new[:-1] if new and new[-1] == eos else new  # our engine leaves the EOA out


@needs_hf
def test_imported_release_generates_as_transformers(release):
  import tokenizers
  from hrmtext.infer import text
  hub, ours = release
  info = json.loads((ours / 'tokenizer' / 'tokenizer_info.json').read_text())
  assert {k: info[k] for k in ('boq', 'eoq', 'eoa')} == {k: RELEASE[k] for k in ('boq', 'eoq', 'eoa')}
  assert info['condition_mapping'] == {k: RELEASE[k] for k in ('direct', 'cot', 'noisy', 'synth')}

  engine, tok, _ = text.load(str(ours))  # no tokenizer given: the imported one
  hf_tok = tokenizers.Tokenizer.from_file(str(hub / 'tokenizer.json'))
  special = lambda name: hf_tok.token_to_id(RELEASE[name])
  prompt = tok.encode_instruction(PROMPT, 'synth,cot')
  assert prompt == [special('boq'), special('synth'), special('cot'),
                    *hf_tok.encode(PROMPT, add_special_tokens=False).ids, special('eoq')]
  assert engine.eoa == special('eoa') == json.loads((hub / 'config.json').read_text())['eos_token_id']
  want = hf_generate(hub, prompt, engine.eoa)
  assert len(want) >= 3, want
  assert engine.generate([prompt], NEW_TOKENS)[0] == want

  result = cli('generate', f'--checkpoint={ours}', '--condition=synth,cot', f'--prompt={PROMPT}',
               f'--max_new_tokens={NEW_TOKENS}')
  assert_ok(result)
  assert result.stdout.removesuffix('\n') == hf_tok.decode(want, skip_special_tokens=True)


@needs_hf
def test_round_trip_gives_the_release_files_back(release, tmp_path):
  hub, ours = release
  back = tmp_path / 'back'
  assert_ok(cli('convert', f'--src={ours}', f'--dst={back}'))
  a, b = load_file(hub / 'model.safetensors'), load_file(back / 'model.safetensors')
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  read_json = lambda path: json.loads(path.read_text())
  assert read_json(back / 'config.json') == read_json(hub / 'config.json')  # still legacy
  for name in set(os.listdir(hub)) - {'config.json', 'model.safetensors'}:  # tokenizer files...
    assert (back / name).read_bytes() == (hub / name).read_bytes(), name
  assert set(os.listdir(back)) == set(os.listdir(hub)) | {'tokenizer_info.json'}
  # The exported tokenizer_info.json carries the prompt tokens into a re-import.
  info = json.loads((back / 'tokenizer_info.json').read_text())
  assert info['tokenizer_path'] == 'tokenizer.json' and info['eoa'] == RELEASE['eoa']
  from hrmtext import hf
  from hrmtext.data.tokenizer import Tokenizer
  custom = dict(info, eoa='<|im_end|>', condition_mapping={'math': '<|box_start|>'})
  (back / 'tokenizer_info.json').write_text(json.dumps(custom))
  hf.hf_to_hrmtext(str(back), str(tmp_path / 'again'))
  tok = Tokenizer.load(str(tmp_path / 'again' / 'tokenizer'))
  assert tok.info['eoa'] == '<|im_end|>' and tok.info['condition_mapping'] == custom['condition_mapping']


@needs_hf
def test_prompt_tokens_flag_and_its_errors(release, tmp_path):
  from hrmtext import hf
  from hrmtext.data.tokenizer import Tokenizer
  hub, _ = release
  hf.hf_to_hrmtext(str(hub), str(tmp_path / 'custom'),
                   prompt_tokens=hf.parse_prompt_tokens(['eoa=<|im_end|>', 'math=<|box_start|>']))
  tok = Tokenizer.load(str(tmp_path / 'custom' / 'tokenizer'))
  assert tok.eoa == tok.eoq and set(tok.condition_ids) == {'direct', 'cot', 'noisy', 'synth', 'math'}
  result = cli('convert', f'--src={hub}', f'--dst={tmp_path / "bad"}', '--prompt_tokens=cot=<|think|>')
  assert_one_line_error(result, "'<|think|>' is not in the vocabulary", '--prompt_tokens')
  assert not (tmp_path / 'bad').exists() and not (tmp_path / 'bad.partial').exists()


@needs_hf
def test_id_rows_need_no_tokenizer(tmp_path):
  from hrmtext.infer import text
  config = write_hub_dir(tmp_path / 'hub', with_tokenizer=False, seed=1)
  ours = tmp_path / 'ours'
  assert_ok(cli('convert', f'--src={tmp_path / "hub"}', f'--dst={ours}'))
  assert not (ours / 'tokenizer').exists()
  engine, tok, _ = text.load(str(ours), need_tokenizer=False)
  assert tok is None and engine.eoa == config['eos_token_id']
  with pytest.raises(ValueError, match='has no tokenizer'):
    text.load(str(ours))  # evaluate needs one

  rows = [{'instruction_ids': [5, 17, 42, 9], 'response_ids': [100, 7, 299]},
          {'instruction_ids': [3, 250], 'response_ids': [12]}]
  (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  result = cli('score', f'--checkpoint={ours}', f'--input={tmp_path / "rows.jsonl"}',
               f'--output={tmp_path / "scored.jsonl"}')
  assert_ok(result)
  scored = [json.loads(line) for line in (tmp_path / 'scored.jsonl').read_text().splitlines()]
  model = transformers.HrmTextForCausalLM.from_pretrained(tmp_path / 'hub',
                                                          attn_implementation='sdpa').eval()
  for row, out in zip(rows, scored):
    full = torch.tensor([row['instruction_ids'] + row['response_ids']])
    n = len(row['instruction_ids'])
    types = (torch.arange(full.shape[1]) < n).long()[None]
    with torch.no_grad():
      logp = torch.log_softmax(model(input_ids=full, token_type_ids=types).logits[0].double(), -1)
    want = logp[n - 1:-1].gather(-1, full[0, n:, None]).sum().item()
    assert out['num_tokens'] == len(row['response_ids'])
    assert abs(out['logprob'] - want) <= 1e-4 * max(1.0, abs(want)), (out, want)

  (tmp_path / 'text.jsonl').write_text(json.dumps({'instruction': 'hi', 'response': 'yo'}) + '\n')
  result = cli('score', f'--checkpoint={ours}', f'--input={tmp_path / "text.jsonl"}',
               f'--output={tmp_path / "text_out.jsonl"}')
  assert_one_line_error(result, 'text.jsonl:1', 'no tokenizer', 'instruction_ids')
