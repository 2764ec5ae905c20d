"""What a compiled train step must not hold, read off its optimised HLO (tests/test_targets.py).

`findings(hlo_text, ...)` counts, over one run of the step (loop bodies by their trip counts):
conditionals; buffers of a dense attention score or mask ([..., 1 or heads, T, T]); the attention
kernels' calls (cuDNN fmha forward/backward, splash forward/dq/dkv); float32 -> bfloat16
converts of a single layer's weights (the weights are cast once per step, outside the loops); and
the operand types of the GEMMs (cuBLAS calls, dots and convolutions).
"""
import collections
import re

from hrmtext.model import hlo

_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_SPLASH = re.compile(r'/splash_mha_(fwd|dq|dkv)')  # a Mosaic call's source: which splash kernel
_DENSE_SHAPE = re.compile(r'\b\w+\[(\d+(?:,\d+)*)\]')


def findings(hlo_text: str, *, seq_len: int, heads: int, layer_weight_shapes) -> dict:
  module = hlo.parse(hlo_text)
  layer_shapes = {tuple(shape) for shape in layer_weight_shapes}
  found = dict(conditionals=0, dense_square=sorted(_dense_square(hlo_text, seq_len, heads)),
               kernel_calls=collections.Counter(), layer_weight_converts=collections.Counter(),
               gemm_operand_types=collections.Counter())
  for computation, op, count in hlo.executed(module):
    for inner_computation, inner in _with_fused(module, computation, op):
      _look(module, inner_computation, inner, count, layer_shapes, found)
  return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in found.items()}


def _dense_square(hlo_text: str, seq_len: int, heads: int) -> set:
  """Shapes [batch..., 1 or heads, T, T] anywhere in the module."""
  square = set()
  for dims in _DENSE_SHAPE.findall(hlo_text):
    d = tuple(int(x) for x in dims.split(','))
    if len(d) >= 4 and d[-2:] == (seq_len, seq_len) and d[-3] in (1, heads):
      square.add(d)
  return square


def _with_fused(module, computation, op):
  """`op` and, for a fusion, the instructions of its fused computation."""
  yield computation, op
  if op.base == 'fusion':
    for called in op.called():
      for inner in module.computations.get(called, ()):
        yield called, inner


def _look(module, computation, op, count, layer_shapes, found):
  if op.opcode == 'conditional':
    found['conditionals'] += count
  elif op.opcode == 'custom-call':
    target = _TARGET.search(op.attributes).group(1)
    splash = _SPLASH.search(op.attributes) if target == 'tpu_custom_call' else None
    found['kernel_calls'][f'splash {splash.group(1)}' if splash else target] += count
    if 'cublas' in target:
      found['gemm_operand_types'][_operand_types(module, computation, op)] += count
  elif op.opcode in ('dot', 'convolution'):
    found['gemm_operand_types'][_operand_types(module, computation, op)] += count
  elif op.opcode == 'convert' and op.shape.startswith('bf16'):
    source = module.shape(computation, op.operands[0])
    dims = hlo.arrays(op.shape)[0][1]
    if source.startswith('f32') and dims in layer_shapes:
      found['layer_weight_converts'][str(dims)] += count


def _operand_types(module, computation, op) -> str:
  """The element types of a GEMM's two matrix operands, e.g. 'bf16 x bf16'."""
  types = [hlo.arrays(module.shape(computation, name))[0][0] for name in op.operands[:2]]
  return ' x '.join(types)
