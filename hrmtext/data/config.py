"""Data configuration: one schema for `hrmtext.prepare`, the Grain pipeline and experiment configs.

Experiment configs embed it as `config.data`. The defaults prepare and train the tiny CPU model: a
~20k-example built-in corpus of short verifiable reasoning_gym tasks, a 1024-token BPE tokenizer and
512-token packed rows (gsm_symbolic worked solutions need ~250-550 tokens).
"""

import ml_collections

DEFAULT_CONDITIONS = ('direct', 'cot', 'synth', 'noisy')


def _task(count, condition='direct', **params):
  return ml_collections.ConfigDict(dict(count=count, condition=condition, params=params))


def builtin_tasks() -> ml_collections.ConfigDict:
  """Built-in reasoning_gym tasks: training rows, condition tag and generator params of each.

  Small numbers and short words keep prompts and answers short enough for a few-M-param model.
  """
  return ml_collections.ConfigDict(dict(
      basic_arithmetic=_task(2500, min_terms=2, max_terms=3, min_digits=1, max_digits=2,
                             allow_parentheses=False, allow_negation=False),
      chain_sum=_task(2000, min_terms=2, max_terms=3, min_digits=1, max_digits=2),
      products=_task(1500, min_terms=2, max_terms=2, min_digits=1, max_digits=2),
      leg_counting=_task(1500, min_animals=1, max_animals=3, min_instances=1, max_instances=4),
      count_bits=_task(1500, min_n=1, max_n=1023),
      gcd=_task(1500, min_numbers=2, max_numbers=2, min_value=1, max_value=60),
      spell_backward=_task(2000, min_word_len=3, max_word_len=6),
      letter_counting=_task(1500, min_words=3, max_words=6),
      word_sorting=_task(1500, min_words=3, max_words=4, min_word_length=3, max_word_length=6),
      word_sequence_reversal=_task(1500, min_words=3, max_words=4),
      family_relationships=_task(1500, min_family_size=3, max_family_size=4),
      syllogism=_task(1500),
      gsm_symbolic=_task(1000, condition='cot'),
  ))


def data_config() -> ml_collections.ConfigDict:
  """Every data field with defaults that work for the tiny CPU model."""
  c = ml_collections.ConfigDict()
  # Prepared root (`python -m hrmtext.prepare --output DIR`) or a reference sampled set (holding
  # metadata.json); the trainer reads `<dir>/sampled` in the former case.
  c.dir = 'runs/data/builtin'
  c.seq_len = 512  # packed row length; the mixture cuts examples to seq_len + 1 tokens
  c.epochs = 4  # sampled epochs written by prepare; training wraps around after the last
  c.seed = 0
  c.worker_count = 0  # Grain prefetch processes (0: produce batches in the training process)
  c.worker_buffer_size = 2  # batches each worker prefetches
  c.pack_window_rows = 64  # first-fit-decreasing packs windows of about this many rows of examples
  # At most this many examples per packed row: the bound the attention kernels' run metadata is
  # sized for (cuDNN keeps softmax statistics per run slot; packing.RUN_FIELDS).
  c.max_segments_per_row = 64
  # Train on the response tokens only (the reference data's target_only); False: the instruction
  # tokens too, each predicting the next one. The held-out eval scores responses either way.
  c.target_only = True

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024  # trained sentencepiece BPE size (byte fallback, split digits)
  c.tokenizer.conditions = DEFAULT_CONDITIONS  # condition tags, one special token each
  c.tokenizer.train_rows = 200_000  # rows sampled to train the tokenizer

  c.builtin = ml_collections.ConfigDict()
  c.builtin.tasks = builtin_tasks()
  c.builtin.heldout_per_task = 64  # held-out rows per task, from disjoint seeds, deduplicated
  c.builtin.heldout_gsm_templates = 8  # gsm_symbolic templates reserved for the held-out split

  # Per-epoch sampling: the first rule whose prefix starts the source name wins.
  # max_per_file: row cap per epoch (-1: none); repeat: upsampling factor; long_context:
  # 'truncate' (cut the response) or 'drop' examples longer than seq_len + 1 tokens.
  c.mixture = ml_collections.ConfigDict()
  c.mixture.rules = (dict(prefix='', max_per_file=-1, repeat=1.0, long_context='truncate'),)
  c.mixture.min_resp_length = 2  # responses shorter than this (in tokens, EOA included) are dropped
  return c


def get_config() -> ml_collections.ConfigDict:
  """Entry point for `--config=hrmtext/data/config.py`."""
  return data_config()
