"""training.fit: the fewest micro-batches whose step fits, then the cheapest remat that fits, on a
stand-in for the compiled step's memory (the real one is a compile: tests/test_targets.py and the
README's table run it for the real sizes)."""
from types import SimpleNamespace

import jax
import pytest

from hrmtext.cli import UserError
from hrmtext.model.config import REMAT_POLICIES
from hrmtext.training import fit
from hrmtext.training.config import base_config

GIB = 2**30
# Bytes of a step: the state, plus per row of a micro-batch what each policy keeps for backward.
PER_ROW = {'none': 6.0, 'save_projections': 4.0, 'dots_saveable': 3.5, 'save_attention': 3.0,
           'dots_with_no_batch_dims_saveable': 2.5, 'nothing_saveable': 2.0}
STATE = 10.0


def fake_step_bytes(measured):
  def step_bytes(config):
    rows = config.train.global_batch_tokens // config.data.seq_len // config.train.micro_batches
    measured.append((config.train.micro_batches, config.compute.remat_policy))
    return (STATE + rows * PER_ROW[config.compute.remat_policy]) * GIB
  return step_bytes


def mesh_of(kind='TPU v5', data=1, fsdp=1):
  """A stand-in mesh of a compile-only device with `kind`'s memory (fit reads its devices and
  shape only)."""
  device = SimpleNamespace(platform='tpu', device_kind=kind,
                           client=SimpleNamespace(runtime_type='compile_only_runtime'))
  return SimpleNamespace(devices=SimpleNamespace(flat=[device]),
                         shape={'data': data, 'fsdp': fsdp, 'tensor': 1})


def config_with(rows=48, micro=0, remat='auto'):
  config = base_config()
  config.data.seq_len = 4096
  config.train.update(global_batch_tokens=rows * 4096, micro_batches=micro)
  config.compute.remat_policy = remat
  return config


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(fit, 'FIT_CACHE', str(tmp_path / 'fit.json'))


def test_fewest_micro_batches_then_the_cheapest_remat_that_fits():
  """v5p (95 GB, 84.1 GiB budget): 48 rows fit nowhere at nothing_saveable (106 GiB); 24 rows do
  (58 GiB); at 2 micro-batches every policy up to save_attention (82 GiB) fits, 'dots_saveable'
  (94) does not, so save_attention, the cheapest that fits."""
  measured, lines = [], []
  got = fit.fit(config_with(), mesh_of(), fake_step_bytes(measured), log=lines.append)
  assert (got.train.micro_batches, got.compute.remat_policy) == (2, 'save_attention')
  budget = fit.TPU_MEMORY_BYTES['TPU v5'] * (1 - fit.HEADROOM)
  assert (STATE + 24 * PER_ROW['save_attention']) * GIB <= budget
  assert (STATE + 24 * PER_ROW['dots_saveable']) * GIB > budget
  assert got.eval.rows == 24  # a micro-batch's rows, now that it is known
  assert lines and lines[0].startswith('fit: 2 micro-batches, remat save_attention')
  # A binary search over the micro-batch choices, then the cheaper policies in order.
  assert measured[-4:] == [(2, p) for p in REMAT_POLICIES[:4]]
  assert len(measured) <= 4 + len(fit.micro_batch_choices(48, 1)).bit_length() + 1

  # The second time: from the cache, no measuring.
  again = []
  fit.fit(config_with(), mesh_of(), fake_step_bytes(again), log=lines.append)
  assert again == [] and lines[-1].startswith('fit (cached): 2 micro-batches')


def test_given_micro_batches_or_remat_are_kept():
  measured = []
  got = fit.fit(config_with(micro=4), mesh_of(), fake_step_bytes(measured), log=lambda _: None)
  assert got.train.micro_batches == 4 and got.compute.remat_policy == 'none'  # 10 + 12 * 6 fits
  got = fit.fit(config_with(remat='nothing_saveable'), mesh_of(), fake_step_bytes([]),
                log=lambda _: None)
  assert (got.train.micro_batches, got.compute.remat_policy) == (2, 'nothing_saveable')
  fixed = config_with(micro=2, remat='none')
  assert fit.fit(fixed, mesh_of(), fake_step_bytes(measured), log=lambda _: None) is fixed


def test_nothing_to_fit_on_cpu_and_one_line_when_nothing_fits(monkeypatch):
  cpu = SimpleNamespace(devices=SimpleNamespace(flat=jax.devices()[:1]),
                        shape={'data': 1, 'fsdp': 1, 'tensor': 1})
  got = fit.fit(config_with(), cpu, fake_step_bytes([]), log=lambda _: None)
  assert (got.train.micro_batches, got.compute.remat_policy) == (1, 'nothing_saveable')
  monkeypatch.setitem(fit.TPU_MEMORY_BYTES, 'TPU tiny', 8 * GIB)  # less than the state
  with pytest.raises(UserError, match='does not fit TPU tiny .* even at 48 micro-batches'):
    fit.fit(config_with(), mesh_of('TPU tiny'), fake_step_bytes([]), log=lambda _: None)
  with pytest.raises(UserError, match='42 rows per step do not split over 8 batch shards'):
    fit.fit(config_with(rows=42), mesh_of(fsdp=8), fake_step_bytes([]), log=lambda _: None)


def test_micro_batch_choices_split_rows_over_the_batch_shards():
  assert fit.micro_batch_choices(48, 1) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
  assert fit.micro_batch_choices(48, 8) == [1, 2, 3, 6]
  assert fit.micro_batch_choices(42, 8) == []


def test_a_compiler_s_out_of_memory_refusal_is_a_size():
  def refuses(config):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory'
        ' required for HLO temporaries (173.79G) exceeds available HBM (95.73G).')
  assert fit._bytes_or_oom(refuses, None) == pytest.approx(173.79 * GIB)
