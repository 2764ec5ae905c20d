"""Test data in the reference layouts, written with plain numpy (independently of hrmtext.data).

`write_reference_dataset` makes a sampled training set as the reference pipeline lays it out, so
tests (and anyone who wants a tiny dataset to train on) can check that it is read unchanged;
`shard_sampled_set` the same set with its tokens in several shards.
"""

import json
import os
import shutil

import numpy as np

IGNORE_LABEL = -100
BOQ, EOQ, EOA, DIRECT, COT = 2, 3, 4, 5, 6  # special ids of the fixture's (imaginary) tokenizer
FIRST_TEXT_ID = 8


def _example(rng, vocab_size, max_inst, max_resp):
  text = lambda n: rng.integers(FIRST_TEXT_ID, vocab_size, n).tolist()
  instruction = [BOQ, int(rng.choice([DIRECT, COT])), *text(rng.integers(1, max_inst - 2)), EOQ]
  response = [*text(rng.integers(1, max_resp)), EOA]
  return instruction, response


def write_reference_dataset(path, *, num_examples=60, epochs=2, vocab_size=300, max_seq_len=65,
                            max_inst=24, max_resp=24, seed=0):
  """Writes a sampled training set in the reference layout; returns each epoch's examples.

  Layout: tokens.npy (uint16, as the reference stores vocabularies below 65536), epoch_<k>/ with
  inst_start/inst_len/resp_start/resp_len.npy (uint64 offsets, int64 lengths) and metadata.json.
  Each example's response is stored *before* its instruction, with a gap after it, so a reader
  must follow the offsets. Epoch k holds a seeded permutation of a random 80% of the examples.
  Returns a list (per epoch) of (instruction ids, response ids) tuples in the epoch's order.
  """
  rng = np.random.default_rng(seed)
  examples = [_example(rng, vocab_size, max_inst, max_resp) for _ in range(num_examples)]
  tokens, starts = [], []
  for instruction, response in examples:
    resp_start = len(tokens)
    tokens += response + [0]
    starts.append((len(tokens), resp_start))
    tokens += instruction
  os.makedirs(path, exist_ok=True)
  np.save(os.path.join(path, 'tokens.npy'), np.array(tokens, np.uint16))
  per_epoch = []
  for k in range(epochs):
    chosen = rng.permutation(num_examples)[:int(0.8 * num_examples)]
    epoch_dir = os.path.join(path, f'epoch_{k}')
    os.makedirs(epoch_dir, exist_ok=True)
    arrays = dict(inst_start=np.array([starts[i][0] for i in chosen], np.uint64),
                  inst_len=np.array([len(examples[i][0]) for i in chosen],
                                    np.int64), resp_start=np.array([starts[i][1] for i in chosen],
                                                                   np.uint64),
                  resp_len=np.array([len(examples[i][1]) for i in chosen], np.int64))
    for name, array in arrays.items():
      np.save(os.path.join(epoch_dir, f'{name}.npy'), array)
    per_epoch.append([(tuple(examples[i][0]), tuple(examples[i][1])) for i in chosen])
  tokenizer_info = dict(tokenizer_path='fixture-tokenizer', boq='<boq>', eoq='<eoq>', eoa='<eoa>',
                        condition_mapping=dict(direct='<direct>',
                                               cot='<cot>'), vocab_size=vocab_size)
  total_length = sum(len(i) + len(r) for i, r in per_epoch[0])
  with open(os.path.join(path, 'metadata.json'), 'w') as f:
    json.dump(
        dict(tokenizer_info=tokenizer_info, vocab_size=None, max_seq_len=max_seq_len,
             total_length=total_length), f)
  return per_epoch


def unpack_batch(batch):
  """(instruction ids, response ids) of every packed example of a batch, read back from the rows.

  Checks the packed format on the way: positions count up from 0 inside a segment, the
  instruction is the segment's prefix, and labels are the inputs shifted by one.
  """
  examples = []
  for row in range(batch['inputs'].shape[0]):
    segments = batch['segment_ids'][row]
    for segment in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == segment)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), 'segment not contiguous'
      inputs, labels = batch['inputs'][row, where], batch['labels'][row, where]
      is_instruction = batch['is_instruction'][row, where].astype(bool)
      assert np.array_equal(batch['positions'][row, where], np.arange(len(where)))
      num_inst = int(is_instruction.sum())
      assert is_instruction[:num_inst].all(), 'instruction must be the prefix of its segment'
      assert (labels[:num_inst - 1] == IGNORE_LABEL).all() and (labels[num_inst - 1:]
                                                                != IGNORE_LABEL).all()
      assert np.array_equal(labels[num_inst - 1:-1],
                            inputs[num_inst:]), 'labels are not shifted inputs'
      examples.append((tuple(inputs[:num_inst].tolist()), tuple(labels[num_inst - 1:].tolist())))
    padding = segments == 0
    assert (batch['inputs'][row, padding] == 0).all() and (batch['labels'][row, padding]
                                                           == IGNORE_LABEL).all()
    assert (batch['positions'][row, padding] == 0).all() and (batch['is_instruction'][row, padding]
                                                              == 0).all()
  return examples


def shard_sampled_set(path, sharded_path, num_shards):
  """Writes the sampled set at `path` again at `sharded_path` with its tokens.npy cut into about
  `num_shards` token shards listed in metadata.json (cut between examples only: an example's
  tokens lie in one shard); returns the shard lengths."""
  tokens = np.load(os.path.join(path, 'tokens.npy'))
  epochs = sorted(name for name in os.listdir(path) if name.startswith('epoch_'))
  spans = []
  for name in epochs:
    index = {n: np.load(os.path.join(path, name, f'{n}.npy')).astype(np.int64)
             for n in ('inst_start', 'inst_len', 'resp_start', 'resp_len')}
    starts = np.minimum(index['inst_start'], index['resp_start'])
    ends = np.maximum(index['inst_start'] + index['inst_len'],
                      index['resp_start'] + index['resp_len'])
    spans += list(zip(starts.tolist(), ends.tolist()))
  inside = np.zeros(len(tokens) + 1, bool)  # positions a cut would split an example at
  for start, end in spans:
    inside[start + 1:end] = True
  allowed = np.flatnonzero(~inside[1:len(tokens)]) + 1
  cuts = np.unique(allowed[np.linspace(0, len(allowed) - 1, num_shards + 1).astype(int)[1:-1]])
  shutil.copytree(path, sharded_path, ignore=shutil.ignore_patterns('tokens.npy'))
  pieces = np.split(tokens, cuts)
  names = [f'tokens-{k:05d}-of-{len(pieces):05d}.npy' for k in range(len(pieces))]
  for name, piece in zip(names, pieces):
    np.save(os.path.join(sharded_path, name), piece)
  with open(os.path.join(path, 'metadata.json')) as f:
    metadata = json.load(f)
  metadata['token_shards'] = [[name, len(piece)] for name, piece in zip(names, pieces)]
  with open(os.path.join(sharded_path, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)
  return [len(piece) for piece in pieces]
