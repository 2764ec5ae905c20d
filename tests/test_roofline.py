"""The roofline estimate (hrmtext.parallel.roofline) of programs compiled here on CPU, and of
hand-written HLO in the forms XLA:GPU and XLA:TPU emit (cuBLAS, cuDNN and splash calls, loops
without a trip count), which CPU compiles never show."""
import json
import math

import jax
import jax.numpy as jnp
import pytest

from hrmtext.model import hlo
from hrmtext.model.flops import compiled_matmul_flops, peak_flops
from hrmtext.parallel import roofline
from tests.test_targets import SEQ_LEN, lower

# Round ceilings, so expected seconds are easy to write down.
TEST = roofline.Ceilings('test', {'bf16': 1e12, 'f8': 2e12, 'f32': 5e11, 'f32_highest': 1e11},
                         memory_bytes_per_s=1e9, interconnect_bytes_per_s=1e8, source='test')
COMPUTE_ONLY = roofline.Ceilings('compute', TEST.matmul_flops_per_s, math.inf, math.inf, 'test')
M, K, N, TRIPS = 64, 128, 160, 7  # N > K: the carry is the first K columns


def compiled_text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def scanned_matmuls(x, ws):
  """TRIPS matmuls in a scan, each followed by an elementwise fusion, the outputs stacked."""
  def body(h, w):
    y = jnp.tanh(h @ w) * 2.0
    return y[:, :K], y
  return jax.lax.scan(body, x, ws)


@pytest.fixture(scope='module')
def scan_estimate():
  x = jnp.ones((M, K), jnp.bfloat16)
  ws = jnp.ones((TRIPS, K, N), jnp.bfloat16)
  return roofline.estimate(compiled_text(scanned_matmuls, x, ws), TEST)


def test_scanned_dots_count_once_per_trip(scan_estimate):
  assert scan_estimate.flops == 2 * M * K * N * TRIPS
  matmuls = [o for o in scan_estimate.ops if o.flops]
  assert sum(o.count * o.trips for o in matmuls) == TRIPS


# XLA:CPU of jax 0.10 computes a bf16 dot in f32 and fuses the casts into the stacked output's
# in-place update, a form this estimate counts whole (GPU and TPU compiles keep bf16 dots).
@pytest.mark.skipif(tuple(map(int, jax.__version__.split('.')[:2])) < (0, 11),
                    reason='XLA:CPU before jax 0.11 upcasts bf16 dots (another HLO form)')
def test_bytes_cover_operands_but_not_whole_stacked_buffers(scan_estimate):
  """Each trip reads its weight slice and its input, and writes one slice of the stacked
  outputs: not the whole [TRIPS, ...] buffers each time."""
  weights, rows, stacked = TRIPS * K * N * 2, M * K * 2, TRIPS * M * N * 2
  matmul_bytes = sum(o.bytes for o in scan_estimate.ops if o.flops)
  assert matmul_bytes >= weights + TRIPS * rows
  assert scan_estimate.bytes >= weights + rows + stacked
  in_loop = [o for o in scan_estimate.ops if o.trips == TRIPS]
  assert in_loop and all(o.bytes / (o.count * TRIPS) < min(weights, stacked) for o in in_loop)


def test_ops_sorted_and_summed(scan_estimate):
  seconds = [o.seconds for o in scan_estimate.ops]
  assert seconds == sorted(seconds, reverse=True)
  assert scan_estimate.step_s == pytest.approx(sum(seconds))
  for o in scan_estimate.ops:  # each op its roofline: the slower of compute and memory
    assert o.seconds >= o.bytes / TEST.memory_bytes_per_s * (1 - 1e-9)


@pytest.mark.parametrize('dtype, precision, peak', [
    (jnp.bfloat16, None, 'bf16'), (jnp.float32, None, 'f32'),
    (jnp.float32, 'highest', 'f32_highest')])
def test_matmul_runs_at_its_operand_types_peak(dtype, precision, peak):
  a, b = jnp.ones((M, K), dtype), jnp.ones((K, N), dtype)
  text = compiled_text(lambda a, b: jnp.dot(a, b, precision=precision), a, b)
  if peak == 'bf16' and 'bf16[' not in text.split('dot(', 1)[0].rsplit('\n', 1)[-1]:
    peak = 'f32'  # this XLA:CPU (jax 0.10) upcasts the bf16 dot: it runs at f32's peak
  estimate = roofline.estimate(text, COMPUTE_ONLY)
  assert estimate.step_s == pytest.approx(2 * M * K * N / TEST.matmul_flops_per_s[peak])


def test_convolution_counts_the_window_positions_on_the_input():
  """Strides, padding and dilation as XLA's own cost analysis counts them (no loop here)."""
  x, w = jnp.ones((2, 3, 17, 13), jnp.float32), jnp.ones((5, 3, 4, 3), jnp.float32)
  compiled = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 1), [(2, 1), (1, 1)], rhs_dilation=(1, 2))).lower(x, w).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert compiled_matmul_flops(compiled.as_text()) == analysis['flops']


def test_memory_bound_op_takes_its_bytes_over_bandwidth():
  x = jnp.ones((256, 512), jnp.float32)
  estimate = roofline.estimate(compiled_text(lambda x: jnp.exp(x) + 1, x), TEST)
  assert estimate.flops == 0
  assert estimate.bytes == 2 * x.nbytes  # read once, written once
  assert estimate.step_s == pytest.approx(estimate.bytes / TEST.memory_bytes_per_s)


def test_real_train_step_on_cpu():
  """The HRM train step of tests/test_targets.py (both stacks, recurrence, credit horizon)."""
  text = lower('xla', jax.devices('cpu')[:1], rows=2).compile().as_text()
  estimate = roofline.estimate(text, roofline.CEILINGS['h100'])
  assert estimate.flops == pytest.approx(compiled_matmul_flops(text))
  assert estimate.step_s > 0 and estimate.ops[0].seconds >= estimate.ops[-1].seconds
  tokens = 2 * SEQ_LEN
  results = roofline.predict(text, 'NVIDIA H100 80GB HBM3', tokens, 1e9, devices=1)
  assert results['predicted_step_s'] == pytest.approx(estimate.step_s)
  assert results['predicted_tokens_per_s'] == pytest.approx(tokens / estimate.step_s)
  assert results['predicted_mfu'] == pytest.approx(
      1e9 * tokens / estimate.step_s / peak_flops('NVIDIA H100'))
  top = results['roofline_top_ops']
  assert len(top) == 10 and [o['seconds'] for o in top] == sorted(
      (o['seconds'] for o in top), reverse=True)
  assert set(top[0]) >= {'name', 'kind', 'count', 'trips', 'flops', 'bytes', 'seconds', 'share'}
  json.dumps(results)  # bench merges it into its JSON line
  lines = roofline.report_lines(results)
  assert lines[1].startswith('predicted: step') and len(lines) >= 12


def test_unknown_device_predicts_nothing():
  results = roofline.predict('', 'cpu', 512, 1e9, devices=1)
  assert results['predicted_step_s'] is None
  assert roofline.report_lines(results)[0].startswith('roofline: n/a')


@pytest.mark.parametrize('device_kind, name', [
    ('NVIDIA H100 80GB HBM3', 'h100'), ('NVIDIA H200', 'h200'), ('TPU v5', 'v5p'),
    ('TPU v5p', 'v5p'), ('TPU v5 lite', None), ('cpu', None)])
def test_ceilings_by_device_kind(device_kind, name):
  ceilings = roofline.ceilings_for(device_kind)
  assert (ceilings and ceilings.name) == name
  if name:
    assert peak_flops(device_kind) is not None


# XLA:GPU: a cuBLAS GEMM returns (result, workspace); cuDNN attention forward and backward carry
# the score shape [batch, heads, q_len, kv_len] and the mask in their backend_config. XLA:TPU:
# a splash kernel's metadata spans lines, dots are convolutions, loops have no known_trip_count,
# only a condition.
LIBRARY_HLO = '''HloModule jit_step, is_scheduled=true

%fused_update (param_0: bf16[8,1536], param_1: bf16[1,1536], param_2: s32[]) -> bf16[8,1536] {
  %param_0 = bf16[8,1536]{1,0} parameter(0)
  %param_1 = bf16[1,1536]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %update = bf16[8,1536]{1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %zero.1)
}

%body (p: (s32[], bf16[4,4096,12,128])) -> (s32[], bf16[4,4096,12,128]) {
  %p = (s32[], bf16[4,4096,12,128]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %q = bf16[4,4096,12,128]{3,2,1,0} get-tuple-element(%p), index=1
  %fwd = (bf16[4,12,4096,128]{3,1,2,0}, f32[4,12,4096]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/layers/attn/dot_product_attention_fwd"}, backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["4", "12", "4096", "4096"], "tuple_shapes": []}, "mask_type": "PADDING_CAUSAL"}}
  %bwd = (bf16[4,4096,12,128]{3,2,1,0}, bf16[4,4096,12,128]{3,2,1,0}, bf16[4,4096,12,128]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"dimensions": ["4", "12", "4096", "4096"]}, "mask_type": "NO_MASK"}}
  %lhs = bf16[16384,1536]{1,0} bitcast(%q)
  %w = bf16[1536,4096]{1,0} constant({...})
  %gemm = (bf16[16384,4096]{1,0}, s8[4194304]{0}) custom-call(%lhs, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"precision_config":{"operand_precision":["DEFAULT","DEFAULT"]}}}
  %ag = bf16[8,1536]{1,0} all-gather(%w), dimensions={0}
  %buffer = bf16[8,1536]{1,0} constant({...})
  %row = bf16[1,1536]{1,0} constant({...})
  %fs = ((bf16[8,1536]{1,0}, bf16[1,1536]{1,0}, s32[]), bf16[8,1536]{1,0}, s32[]) fusion-start(%buffer, %row, %i), kind=kLoop, calls=%fused_update
  %fd = bf16[8,1536]{1,0} fusion-done(%fs)
  %a = bf16[2,256,256,1,1]{4,3,2,1,0} constant({...})
  %b = bf16[256,4,2,128,1]{4,3,2,1,0} constant({...})
  %conv = bf16[2,256,4,2,128]{4,3,2,1,0} convolution(%a, %b), window={size=1x4x2 pad=0_0x3_3x1_1 rhs_reversal=0x1x1}, dim_labels=0bf12_i12o0->0b12f
  ROOT %t = (s32[], bf16[4,4096,12,128]{3,2,1,0}) tuple(%i, %q)
}

%cond (p.1: (s32[], bf16[4,4096,12,128])) -> pred[] {
  %p.1 = (s32[], bf16[4,4096,12,128]{3,2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x: bf16[4,4096,12,128], heads: bf16[12,4096,128]) -> bf16[4,4096,12,128] {
  %x = bf16[4,4096,12,128]{3,2,1,0} parameter(0)
  %heads = bf16[12,4096,128]{2,1,0} parameter(1)
  %m = s8[1,1,1]{2,1,0} constant({...})
  %zero = s32[] constant(2)
  %start = s32[] copy(%zero)
  %init = (s32[], bf16[4,4096,12,128]{3,2,1,0}) tuple(%start, %x)
  %loop = (s32[], bf16[4,4096,12,128]{3,2,1,0}) while(%init), condition=%cond, body=%body
  %tpu = bf16[12,4096,128]{2,1,0:T(8,128)(2,1)} custom-call(%m, %heads, %heads, %heads), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="jit(step)/vmap(splash)/splash_mha_dkv_no_residuals/splash_mha_dkv_no_residuals/pallas_call"}
  ROOT %out = bf16[4,4096,12,128]{3,2,1,0} get-tuple-element(%loop), index=1
}
'''


def test_gpu_and_tpu_library_calls():
  module = hlo.parse(LIBRARY_HLO)
  assert module.trip_count('main', module.instruction('main', 'loop')) == 3  # 2 <= i < 5
  estimate = roofline.estimate(LIBRARY_HLO, COMPUTE_ONLY)
  ops = {o.name: o for o in estimate.ops}
  scores = 4 * 12 * 4096 * 4096
  assert ops['fwd'].flops == 3 * 4 * scores * 128 / 2  # dense, causal half, 3 trips
  assert ops['bwd'].flops == 3 * 2.5 * 4 * scores * 128  # no mask: the whole matrix
  assert ops['gemm'].flops == 3 * 2 * 16384 * 4096 * 1536
  assert ops['fwd'].kind == 'attention fwd (cuDNN)' and ops['gemm'].kind == 'gemm'
  # The splash dkv kernel: four matmuls of q [12, 4096, 128] against k's 4096 keys; once.
  assert ops['tpu'].flops == 4 * 2 * 12 * 4096 * 4096 * 128
  assert ops['ag'].kind == 'all-gather' and ops['ag'].bytes == 3 * 8 * 1536 * 2
  # XLA:TPU's dot [2*256, 256] x [256, 4*2*128] as a convolution whose padded windows stand for
  # the output's 4 x 2 dimensions: each output element one real window position.
  assert ops['conv'].flops == 3 * 2 * (2 * 256) * 256 * (4 * 2 * 128)
  # An async fusion counts once, at its start; updating one row in place moves that row.
  assert 'fd' not in ops and ops['fs'].bytes == 3 * (2 * 1536 * 2 + 4)
  bounded = roofline.estimate(LIBRARY_HLO, TEST)
  gemm = {o.name: o for o in bounded.ops}['gemm']
  assert gemm.bytes == 3 * 2 * (16384 * 1536 + 1536 * 4096 + 16384 * 4096)  # no workspace
  assert bounded.interconnect_s == pytest.approx(3 * 8 * 1536 * 2 / TEST.interconnect_bytes_per_s)
