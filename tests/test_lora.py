"""LoRA (hrmtext.model.lora): the adapter forward against PEFT on transformers (the independent
oracle) and against the merged weights, the frozen base's missing weight gradients, config
errors; a LoRA fine-tune of a tiny run (only adapters train, the checkpoint refers to its base,
exact resume, the run read by inference and as init_from of a full fine-tune)."""
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrmtext import checkpoint
from hrmtext.errors import UserError
from hrmtext.model import ComputeConfig, LoraConfig, ModelConfig, build_model, lora
from hrmtext.run import Run, find_base
from tests import hf_oracle
from tests.device_checks import DeviceChecks
from tests.test_model import padded_batch, random_batch, small_config

device_check = DeviceChecks(__file__)

# Odd ranks, and targets that leave some parts of the fused projections without an adapter.
LORAS = [
    LoraConfig(rank=3, alpha=5.0, targets='attn.q,attn.v,attn.o,mlp.up,lm_head', stacks='H'),
    LoraConfig(rank=5, alpha=8.0, targets='attn.gate,attn.k,mlp', stacks='both'),
]


def random_adapters(cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> dict:
  """Adapters with both A and B random (B starts at zero in training), large enough to matter."""
  shapes = checkpoint.abstract_params(cfg, lora=lora_cfg)
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      np.asarray(jax.random.normal(k, s.shape) * 0.25 / lora_cfg.rank**0.5)
      for k, s in zip(keys, leaves)])


def save_lora_run(path, base_run, cfg, lora_cfg, adapters) -> None:
  """A LoRA run's checkpoint as training saves one, without training."""
  mngr = Run(str(path)).manager(async_save=False)
  checkpoint.save(mngr, 1, params=adapters, ema=adapters, meta={
      'model': cfg.to_dict(), 'lora': lora_cfg.to_dict(),
      'lora_base': Run(str(base_run)).reference(use_ema=True, relative_to=str(path))})
  mngr.close()


def test_merged_weights_give_the_adapter_forward():
  cfg = small_config()
  for lora_cfg in LORAS:
    model = build_model(cfg, lora=lora_cfg)
    base, _ = lora.split(nn.unbox(model.init(jax.random.key(0))))
    params = lora.combine(base, random_adapters(cfg, lora_cfg))
    batch = jax.tree.map(jnp.asarray, random_batch(cfg))
    adapted, merged = model.logits(params, batch), build_model(cfg).logits(
        lora.merge(params, lora_cfg), batch)
    assert float(jnp.abs(adapted - build_model(cfg).logits(base, batch)).max()) > 0.1
    np.testing.assert_allclose(merged, adapted, atol=1e-4 * float(jnp.abs(adapted).max()))


def test_only_the_targets_are_adapted_and_the_rest_is_the_base():
  cfg = small_config()
  lora_cfg = LORAS[0]
  params = lora.combine(nn.unbox(build_model(cfg).init(jax.random.key(0))),
                        random_adapters(cfg, lora_cfg))
  merged, base = lora.merge(params, lora_cfg), lora.split(params)[0]
  changed = [jax.tree_util.keystr(path) for (path, m), b in zip(
      jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(base))
             if not np.array_equal(m, b)]
  assert changed == ["['H']['layers']['attn']['gqkv']", "['H']['layers']['attn']['o']",
                     "['H']['layers']['mlp']['gate_up']", "['lm_head']['kernel']"]
  gqkv = merged['H']['layers']['attn']['gqkv'] - base['H']['layers']['attn']['gqkv']
  gate_up = merged['H']['layers']['mlp']['gate_up'] - base['H']['layers']['mlp']['gate_up']
  # gate, q, k, v and gate, up: only q, v and up adapted.
  assert [bool(np.any(gqkv[:, :, i])) for i in range(4)] == [False, True, False, True]
  assert [bool(np.any(gate_up[:, :, i])) for i in range(2)] == [False, True]


def test_the_frozen_base_gets_no_weight_gradient_work():
  """Differentiating the adapters alone skips the base's weight gradients: the backward pass
  does about half the work of differentiating everything (input and weight gradients), at
  projection-dominated sizes."""
  from tests.test_model import flops
  cfg = small_config(layers_per_stack=1, hidden_size=64, head_dim=32, intermediate_size=256)
  model = build_model(cfg, ComputeConfig(remat_policy='none'), lora=LoraConfig(rank=2))
  base, adapters = lora.split(nn.unbox(model.init(jax.random.key(0))))
  batch = jax.tree.map(jnp.asarray, random_batch(cfg, rows=2, length=16))
  loss = lambda p: jnp.sum(model.logits(p, batch)**2)
  forward = flops(loss, lora.combine(base, adapters))
  full = flops(jax.grad(loss), lora.combine(base, adapters))
  adapted = flops(jax.grad(lambda a: loss(lora.combine(base, a))), adapters)
  assert (adapted - forward) / (full - forward) < 0.6, (forward, adapted, full)


@pytest.mark.slow  # about 30 s
def test_dropout_draws_a_mask_per_key_and_only_while_training():
  cfg = small_config()
  lora_cfg = LoraConfig(rank=2, dropout=0.5)
  model = build_model(cfg, lora=lora_cfg)
  base, _ = lora.split(nn.unbox(model.init(jax.random.key(0))))
  params = lora.combine(base, random_adapters(cfg, lora_cfg))
  batch = random_batch(cfg)
  batch = jax.tree.map(jnp.asarray, dict(batch, labels=np.roll(batch['inputs'], -1, axis=1)))
  loss = jax.jit(lambda rng: model.loss_sums(params, batch, rng=rng)['loss_sum'])
  evaluated = float(model.loss_sums(params, batch)['loss_sum'])
  no_dropout = build_model(cfg, lora=LoraConfig(rank=2)).loss_sums(params, batch)['loss_sum']
  assert evaluated == float(no_dropout)
  first, second = (float(loss(jax.random.key(seed))) for seed in (0, 1))
  assert len({first, second, evaluated}) == 3 and float(loss(jax.random.key(0))) == first


def test_adapters_follow_the_axes_of_their_weights_and_the_base_is_frozen_in_base_dtype():
  """An adapter's A keeps its weight's input axes, B its output axes (the rank replicated), in a
  stack under the 'layers' axis too: both shard as the weight does. The train state holds the
  adapters alone as params (float32) and the base in lora.base_dtype."""
  from hrmtext.training import optimizer
  from hrmtext.training.step import init_state
  cfg = small_config()
  model = build_model(cfg, lora=LoraConfig(rank=2, targets='all', base_dtype='bfloat16'))
  boxed = jax.eval_shape(model.init, jax.random.key(0))
  axes = lambda tree, name: tree[name].names
  attn, mlp = boxed['H']['layers']['attn'], boxed['L']['layers']['mlp']
  assert axes(attn, 'gqkv') == ('layers', 'embed', None, 'heads', 'head_dim')
  assert axes(attn, 'gqkv_lora_a') == ('layers', 'embed', None, None)
  assert axes(attn, 'gqkv_lora_b') == ('layers', None, None, 'heads', 'head_dim')
  assert axes(attn, 'o_lora_a') == ('layers', 'heads', 'head_dim', None)
  assert axes(attn, 'o_lora_b') == ('layers', None, 'embed')
  assert axes(mlp, 'down_lora_a') == ('layers', 'mlp', None)
  assert axes(boxed['lm_head'], 'kernel_lora_b') == (None, 'vocab')
  state = init_state(model, optimizer.adam_atan2(1e-3, 0.9, 0.95, 0.1), jax.random.key(0))
  assert all(lora.is_adapter(path[-1].key) and x.dtype == jnp.float32 for path, x in
             jax.tree_util.tree_flatten_with_path(state.params)[0])
  assert {x.dtype for x in jax.tree.leaves((state.base['H'], state.base['lm_head']))} == {
      jnp.dtype(jnp.bfloat16)}
  assert state.base['embed']['embedding'].dtype == jnp.float32  # looked up, not a GEMM operand
  for moments in (state.opt_state.mu, state.opt_state.nu, state.ema):  # of the adapters alone
    assert jax.tree.structure(moments) == jax.tree.structure(state.params)


def test_config_errors():
  for bad in (dict(targets='attn.x'), dict(stacks='HL'), dict(rank=-1), dict(dropout=1.0),
              dict(base_dtype='int8'), dict(targets=' ,')):
    with pytest.raises(UserError):
      LoraConfig(**bad)
  with pytest.raises(UserError, match='one stack'):
    build_model(small_config(architecture='transformer'), lora=LoraConfig(rank=2, stacks='H'))
  assert LoraConfig(targets='attn,lm_head').target_names == (
      'attn.gate', 'attn.q', 'attn.k', 'attn.v', 'attn.o', 'lm_head')
  assert build_model(small_config(), lora=LoraConfig(rank=0)).lora is None


@device_check
def adapters_shard_as_their_weights_and_train_as_on_one_device():
  """On a (data 2, fsdp 2, tensor 2) mesh: A has its weight's input-axis sharding, B its
  output-axis one, the base its own; a LoRA train step there gives the single-device step's
  adapters, EMA and moments, and keeps them sharded so."""
  from types import SimpleNamespace
  from hrmtext.model import full_horizon
  from hrmtext.parallel import mesh as mesh_lib, sharding
  from hrmtext.training import optimizer
  from hrmtext.training.step import init_state, make_train_step, state_shardings
  cfg = small_config(vocab_size=96)  # the vocabulary splits over 'tensor'
  model = build_model(cfg, lora=LoraConfig(rank=2, alpha=4.0, targets='all'))
  mesh = mesh_lib.make_mesh(SimpleNamespace(data=2, fsdp=2, tensor=2))
  shardings = state_shardings(model, mesh)
  weight = shardings.base['H']['layers']['attn']['gqkv'].spec  # [layers, embed, 4, heads, head_dim]
  a, b = (shardings.params['H']['layers']['attn'][f'gqkv_lora_{x}'].spec for x in 'ab')
  assert weight[1] is not None and weight[3] is not None  # the rules shard embed and heads
  assert tuple(a) == (weight[0], weight[1], None, None)
  assert tuple(b) == (weight[0], None, None, *weight[3:])
  tx = optimizer.adam_atan2(1e-2, weight_decay=0.1)
  state = init_state(model, tx, jax.random.key(0))
  adapters = random_adapters(cfg, model.lora)
  state = state.replace(params=adapters, ema=adapters, opt_state=tx.init(adapters))
  batch = random_batch(cfg, rows=8)
  batch = jax.tree.map(lambda x: jnp.asarray(x)[None],  # one micro-batch
                       dict(batch, labels=np.roll(batch['inputs'], -1, 1)))
  step = make_train_step(model, tx, full_horizon(cfg), ema_decay=0.9)
  want, _ = jax.jit(step)(state, batch)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, *sharding.batch_sharding(mesh).spec))
  with sharding.activate(mesh):
    sharded_step = jax.jit(step, in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, None))
    got, _ = sharded_step(jax.device_put(state, shardings), jax.device_put(batch, batch_sharding))
  assert got.params['H']['layers']['attn']['gqkv_lora_a'].sharding.spec == a
  for name in ('params', 'ema', 'opt_state'):
    for x, y in zip(jax.tree.leaves(getattr(got, name)), jax.tree.leaves(getattr(want, name))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def device_check_output():
  return device_check.output()


@pytest.mark.slow  # a subprocess with 8 CPU devices compiling two train steps
@pytest.mark.parametrize('name', list(device_check.checks))
def test_on_8_cpu_devices(name, device_check_output):
  device_check.assert_passed(name, device_check_output)


@hf_oracle.needs_hf
@pytest.mark.parametrize('index', range(len(LORAS)))
def test_peft_on_transformers_gives_the_lora_forward(tmp_path, index):
  """A LoRA run (its base imported from a HF directory) exports a PEFT adapter that PEFT loads
  onto HrmTextForCausalLM.from_pretrained of that directory: same logits as hrmtext's adapter
  forward, which the run's merged weights (and their HF export) give too."""
  peft = pytest.importorskip('peft', reason='the PEFT oracle needs peft (the hf extra)')
  from hrmtext import hf
  torch, transformers = hf_oracle.torch, hf_oracle.transformers
  lora_cfg = LORAS[index]
  model = hf_oracle.make_hf_model(seed=index, layers=2)
  model.save_pretrained(tmp_path / 'hf')
  hf.hf_to_hrmtext(str(tmp_path / 'hf'), str(tmp_path / 'base'))
  cfg, base, _ = Run(str(tmp_path / 'base')).load_weights()
  adapters = random_adapters(cfg, lora_cfg, seed=index)
  save_lora_run(tmp_path / 'lora', tmp_path / 'base', cfg, lora_cfg, adapters)
  hf.lora_to_peft(str(tmp_path / 'lora'), str(tmp_path / 'peft'))

  tokens, valid, instruction = padded_batch([12, 9, 5], [4, 9, 1], cfg.vocab_size, 12)
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  batch = jax.tree.map(jnp.asarray, dict(inputs=tokens, positions=positions, segment_ids=valid,
                                         is_instruction=instruction))
  ours = np.asarray(build_model(cfg, lora=lora_cfg).logits(lora.combine(base, adapters), batch))
  _, merged, _ = Run(str(tmp_path / 'lora')).load_weights()
  ours_merged = np.asarray(build_model(cfg).logits(merged, batch))

  def hf_logits(model):
    with torch.no_grad():
      return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid),
                   token_type_ids=torch.tensor(instruction)).logits.numpy()

  base_model = transformers.HrmTextForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  theirs = hf_logits(peft.PeftModel.from_pretrained(base_model, tmp_path / 'peft').eval())
  hf.hrmtext_to_hf(str(tmp_path / 'lora'), str(tmp_path / 'merged'))
  theirs_merged = hf_logits(transformers.HrmTextForCausalLM.from_pretrained(tmp_path / 'merged'))
  scale, rows = np.abs(ours).max(), valid.astype(bool)
  assert np.abs(ours - hf_logits(model)).max() / scale > 0.01  # the adapters matter
  for name, other in dict(peft=theirs, merged=ours_merged, hf_merged=theirs_merged).items():
    assert np.abs(ours - other)[rows].max() / scale <= 1e-4, name
  config = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert (config['r'], config['lora_alpha']) == (lora_cfg.rank, lora_cfg.alpha)


# ---- training ------------------------------------------------------------------------------

LORA_SFT = dict(rank=3, alpha=6.0, dropout=0.1, targets='attn,mlp.down,lm_head', stacks='both')


def lora_config(data_dir, source, **lora_fields):
  from tests.test_sft import sft_config
  c = sft_config(data_dir, source, 'ema')
  c.lora.update(dict(LORA_SFT, **lora_fields))
  return c


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """(data dir, pretrain run, LoRA run): 3 LoRA steps on the tiny pretrain run's EMA."""
  from hrmtext.training.loop import Trainer
  from tests.test_sft import pretrain_config
  from tests.test_train import make_fixture_data
  root = tmp_path_factory.mktemp('lora')
  make_fixture_data(root / 'data')
  Trainer(pretrain_config(root / 'data'), str(root / 'pretrain')).run()
  Trainer(lora_config(root / 'data', root / 'pretrain'), str(root / 'lora')).run()
  return root / 'data', root / 'pretrain', root / 'lora'


@pytest.mark.slow  # the fixture: two training runs
def test_lora_training_trains_the_adapters_alone(lora_run):
  from tests.test_sft import restore_all
  from tests.test_train import assert_trees_equal
  _, pretrain, run = lora_run
  saved = restore_all(run)
  for item in ('params', 'ema'):  # adapters only, B no longer zero
    assert all(lora.is_adapter(path[-1].key) for path, _ in
               jax.tree_util.tree_flatten_with_path(saved[item])[0])
    assert np.any(saved[item]['lm_head']['kernel_lora_b'])
  meta = Run(str(run)).meta()
  assert meta['lora'] == LoraConfig(**LORA_SFT).to_dict()
  base_step = Run(str(pretrain)).manager(create=False).latest_step()
  assert meta['lora_base'] == dict(
      run=str(pretrain), relative='../pretrain', step=base_step, weights='ema',
      checksum=checkpoint.digest(Run(str(pretrain)).manager(create=False), base_step))
  size = lora.count(saved['params'])
  assert meta['lora_size'] == {'params': size, 'bytes': 4 * 4 * size + 4 * (1 + len(
      jax.tree.leaves(saved['params'])))}
  # The merged weights: the base's EMA plus the adapters' (EMA) product, nothing else.
  cfg, merged, _ = Run(str(run)).load_weights()
  _, base, _ = Run(str(pretrain)).load_weights()
  adapters = jax.tree.map(jnp.asarray, saved['ema'])
  want = lora.merge(lora.combine(base, adapters), LoraConfig(**LORA_SFT))
  assert_trees_equal(jax.tree.map(np.asarray, merged), jax.tree.map(np.asarray, want))
  assert not np.array_equal(merged['L']['layers']['attn']['o'], base['L']['layers']['attn']['o'])
  np.testing.assert_array_equal(merged['embed']['embedding'], base['embed']['embedding'])


@pytest.mark.slow  # a third training run
def test_lora_run_resumes_exactly(lora_run, tmp_path):
  from hrmtext.training.loop import Trainer
  from tests.test_sft import SFT, restore_all
  from tests.test_train import assert_trees_equal
  data_dir, pretrain, run = lora_run
  resumed = tmp_path / 'resumed'
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(SFT['steps']))
  Trainer(lora_config(data_dir, pretrain), str(resumed)).run()
  assert_trees_equal(restore_all(resumed), restore_all(run))
  with pytest.raises(UserError, match='other LoRA adapters'):
    Trainer(lora_config(data_dir, pretrain, rank=4), str(resumed))


@pytest.mark.slow  # builds a full fine-tune
def test_a_lora_run_reads_as_its_merged_weights(lora_run, tmp_path):
  """init_from a LoRA run starts a full fine-tune from the merged weights (continue: refused);
  the inference engine serves the merged weights; a changed base stops every reader."""
  from hrmtext.infer import text
  from hrmtext.training.loop import Trainer
  from tests.test_sft import sft_config
  from tests.test_train import assert_trees_equal
  data_dir, _, run = lora_run
  _, merged, _ = Run(str(run)).load_weights()
  full = Trainer(sft_config(data_dir, run, 'ema'), str(tmp_path / 'full'))
  state, _ = full._initial_state()
  assert_trees_equal(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, merged))
  full.run()  # and trains every weight: a plain run
  meta = Run(str(tmp_path / 'full')).meta()
  assert 'lora' not in meta and meta['model'] == Run(str(run)).meta()['model']
  with pytest.raises(UserError, match='a LoRA run'):
    Trainer(sft_config(data_dir, run, 'continue'), str(tmp_path / 'continue'))
  with pytest.raises(UserError, match='set init_from'):
    Trainer(lora_config(data_dir, ''), str(tmp_path / 'no_base'))
  engine, _, _ = text.load(str(run), need_tokenizer=False)
  assert_trees_equal(jax.tree.map(np.asarray, engine.params), jax.tree.map(np.asarray, merged))
  # generate (score, evaluate, lmeval: the same text.load) on the LoRA run itself.
  from tests.test_infer_cli import cli, read_rows, write_rows
  write_rows(tmp_path / 'in.jsonl', [{'instruction_ids': [5, 17, 40, 2]}])
  result = cli('generate', '--checkpoint', run, '--input', tmp_path / 'in.jsonl', '--output',
               tmp_path / 'out.jsonl', '--max_new_tokens', 6)
  assert result.returncode == 0, result.stderr
  assert [row['response_ids'] for row in read_rows(tmp_path / 'out.jsonl')] == engine.generate(
      [[5, 17, 40, 2]], 6)
  # convert: a PEFT adapter (and how to export its base), or the merged weights as a run.
  from tests.test_convert import convert
  result = convert(run, tmp_path / 'peft')
  assert result.returncode == 0 and 'exports that base' in result.stdout, result.stderr
  assert sorted(p.name for p in (tmp_path / 'peft').iterdir()) == [
      'adapter_config.json', 'adapter_model.safetensors']
  result = convert(run, tmp_path / 'merged', '--merge_lora', '--merged_format=hrmtext')
  assert result.returncode == 0, result.stderr
  assert_trees_equal(jax.tree.map(np.asarray, Run(str(tmp_path / 'merged')).load_weights()[1]),
                     jax.tree.map(np.asarray, merged))
  result = convert(run, tmp_path / 'merged_hf', '--merge_lora')  # HF, and back: the same weights
  assert result.returncode == 0, result.stderr
  assert convert(tmp_path / 'merged_hf', tmp_path / 'back').returncode == 0
  assert_trees_equal(jax.tree.map(np.asarray, Run(str(tmp_path / 'back')).load_weights()[1]),
                     jax.tree.map(np.asarray, merged))
  result = convert(run.parent / 'pretrain', tmp_path / 'not_lora', '--merge_lora')
  assert result.returncode == 1 and 'needs a LoRA run' in result.stderr, result.stderr

  moved = tmp_path / 'moved'  # the runs moved together: the base is found relative to the LoRA run
  for name in ('pretrain', 'lora'):
    shutil.copytree(run.parent / name, moved / name)
  ref = dict(Run(str(moved / 'lora')).meta()['lora_base'], run=str(tmp_path / 'gone'))
  assert find_base(ref, str(moved / 'lora')).path == str(moved / 'pretrain')
  checksums = moved / 'pretrain' / 'checkpoints' / str(ref['step']) / checkpoint.CHECKSUMS
  checksums.write_text(checksums.read_text() + ' ')
  with pytest.raises(UserError, match='changed since the adapters were trained'):
    find_base(ref, str(moved / 'lora'))


# ---- memory: the XL LoRA SFT step ----------------------------------------------------------

def test_xl_lora_sft_trains_the_adapters_on_a_bf16_base():
  """`experiments/sft.py:XL --config.lora.rank=16` as bench --compile_only builds it (the
  README's memory table), abstract: the adapters of every projection and the LM head are the
  trainable parameters, rank x (in + out) each, and the frozen base is held in bf16."""
  from hrmtext.parallel.mesh import make_mesh
  from hrmtext.training.config import experiment_config
  from hrmtext.training.program import build_program
  config = experiment_config('experiments/sft.py', 'XL')
  config.lora.rank = 16
  config.train.update(steps=10, micro_batches=8)
  config.compute.remat_policy = 'nothing_saveable'
  program = build_program(config, make_mesh(config.mesh), vocab_size=65536, epoch_tokens=None,
                          log=lambda _: None)
  state, cfg = program.abstract_state(), program.model_cfg
  d, attn, mlp, r = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.mlp_size, 16
  per_layer = r * (4 * (d + attn) + (attn + d) + 2 * (d + mlp) + (mlp + d))
  want = 2 * cfg.layers_per_stack * per_layer + r * (d + cfg.vocab_size)
  assert lora.count(state.params) == want
  assert want < 0.02 * lora.count(state.base)
  assert {x.dtype for x in jax.tree.leaves((state.base['L'], state.base['H'],
                                            state.base['lm_head']))} == {jnp.dtype(jnp.bfloat16)}
  assert (program.config.data.seq_len, program.config.train.global_batch_tokens) == (4096, 32768)


@pytest.mark.slow  # a compile in a fresh process
def test_bench_compiles_a_lora_step():
  """bench --compile_only of a LoRA config: it counts all the parameters and the trainable ones,
  and the step's arguments hold the base once (no moments or EMA of it)."""
  from tests.test_real_size import compile_only
  report = compile_only('--config.lora.rank=4', '--config.lora.targets=attn.q,attn.v',
                        '--vocab=1000')
  trainable, params = report['trainable_params'], report['params']
  assert 0 < trainable < 0.1 * params
  argument = report['per_device_memory_bytes']['argument']
  assert 4 * (params + 3 * trainable) <= argument < 4 * 4 * params / 2, report


def test_the_readme_lora_sft_command_configures_adapters_of_the_tiny_run():
  from tests.test_real_size import load_config
  from hrmtext.training.config import validate
  c = load_config('experiments/sft.py', '--config.init_mode=ema', '--config.lora.rank=16',
                  '--config.train.lr=2e-3')
  validate(c)
  assert LoraConfig.from_dict(c.lora) == LoraConfig(rank=16)
  assert (c.init_from, c.init_mode, c.train.lr) == ('runs/tiny', 'ema', 2e-3)


if __name__ == '__main__':
  device_check.run()
