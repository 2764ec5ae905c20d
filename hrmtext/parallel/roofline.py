"""Roofline estimate of a compiled step from its optimised HLO (`compiled.as_text()`).

Each op that runs on its own (a fusion is one op) takes max(FLOPs / peak, bytes / bandwidth)
seconds, or bytes / interconnect bandwidth for a collective; ops inside while loops count as
often as the loop runs (hrmtext.model.hlo), and the sum is the predicted step time. Ops do not
overlap in this model: collectives that the latency-hiding scheduler overlaps with compute make
the real step faster, launch gaps, poor tiling and cache misses make it slower.

  FLOPs: dots and convolutions (2 per multiply-add; a fusion's those inside it), cuBLAS GEMMs
    from their operands, cuDNN and splash attention from q/k/v (see `_attention_flops`); the
    peak is the one for the matmul's operand type (bf16, fp8, f32 at default precision, f32 at
    HIGHEST). Elementwise work counts no FLOPs: it is memory-bound.
  Bytes: operands plus results, except what is read by slices or updated in place: a fusion's
    operand read only through (dynamic-)slices or gathers counts the slices, a buffer updated
    in place (dynamic-update-slice, scatter) the update, so a layer scan's stacked weights and
    residuals count one layer per iteration, as the hardware moves them.

A pure function of the HLO text and a `Ceilings` record, so it runs (and is tested) on CPU, for
programs compiled for devices that are not here (hrmtext.parallel.targets).
"""
import collections
import dataclasses
import math
import re

from hrmtext.model import hlo
from hrmtext.model.flops import peak_flops


@dataclasses.dataclass(frozen=True)
class Ceilings:
  """What one device sustains, and where each figure comes from."""
  name: str
  # FLOP/s by the matmul's operand type: 'bf16' (and f16), 'f8' (and int8), 'f32' (f32 at
  # default precision: TF32 on NVIDIA tensor cores, one bf16 pass on TPU), 'f32_highest'.
  matmul_flops_per_s: dict
  memory_bytes_per_s: float
  interconnect_bytes_per_s: float  # per device, one direction, as a ring collective uses it
  source: str


# H100 bf16 GEMM and copy bandwidth were measured on this project's lent H100 (SXM, 80 GB); the
# rest derive from them or from datasheets, and say so.
_H100_FLOPS = {
    'bf16': 790e12,  # measured, dense GEMM
    'f8': 1580e12,  # assumption: twice bf16, as the datasheet has it
    'f32': 395e12,  # TF32: the datasheet's 495 scaled by measured/marketed bf16 (790/989)
    'f32_highest': 67e12,  # datasheet, FP32 without tensor cores
}
CEILINGS = {
    'h100': Ceilings(
        'h100', _H100_FLOPS, 3.0e12, 450e9,
        'H100: 790 TFLOP/s bf16 GEMM and 3.0 TB/s copy measured on one H100; TF32 and fp8 scaled '
        'from them; NVLink 450 GB/s per direction assumed'),
    'h200': Ceilings(
        'h200', _H100_FLOPS, 4.3e12, 450e9,
        'H200: the H100\'s measured FLOP/s; 4.3 TB/s assumed (the H100\'s measured share of its '
        'datasheet bandwidth, 3.0/3.35, of the H200\'s 4.8); NVLink 450 GB/s per direction '
        'assumed'),
    'v5p': Ceilings(
        'v5p', {'bf16': 459e12, 'f8': 918e12, 'f32': 459e12, 'f32_highest': 459e12 / 6},
        2765e9, 600e9,
        'v5p: datasheet (459 TFLOP/s bf16, 918 TOPS int8, 2765 GB/s HBM, 4800 Gbps ICI per '
        'chip); f32 at HIGHEST assumed 6 bf16 passes'),
}
# jax's device_kind prefixes (a v5p chip is 'TPU v5', a v5e 'TPU v5 lite').
_DEVICE_KINDS = (('NVIDIA H100', 'h100'), ('NVIDIA H200', 'h200'), ('TPU v5p', 'v5p'),
                 ('TPU v5 lite', None), ('TPU v5', 'v5p'))


def ceilings_for(device_kind: str) -> Ceilings | None:
  name = next((n for prefix, n in _DEVICE_KINDS if device_kind.startswith(prefix)), None)
  return CEILINGS.get(name)


@dataclasses.dataclass(frozen=True)
class OpCost:
  """One op, or ops of the same kind from the same source op, over one step."""
  name: str  # the (first) HLO instruction
  kind: str
  source: str  # the jax op it came from (metadata op_name, shortened)
  count: int  # HLO instructions
  trips: float  # executions per step of each (loop bodies times their trip count; a mean)
  flops: float
  bytes: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class Estimate:
  step_s: float
  attention_s: float  # of which attention kernels (counted dense: see _attention_flops)
  interconnect_s: float  # of which collectives
  flops: float
  bytes: float
  ops: list  # OpCost, largest first
  notes: list  # what the estimate could not see
  ceilings: Ceilings


# Collectives: the bytes one device sends (ring algorithms; all-reduce moves its data twice).
_COLLECTIVES = {'all-gather': 'output', 'reduce-scatter': 'operand', 'all-reduce': 'twice',
                'all-to-all': 'operand', 'collective-permute': 'operand',
                'collective-broadcast': 'operand', 'ragged-all-to-all': 'operand'}
_SLICING = ('dynamic-slice', 'slice', 'gather')
_IN_PLACE = {'dynamic-update-slice': 1, 'scatter': 2}  # op -> operand index of the update
_CUBLAS = ('__cublas$gemm', '__cublas$lt$matmul')
_FREE_CALLS = ('AllocateBuffer',)  # XLA:TPU reserving a buffer: no traffic
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NOISE = re.compile(r'^jit\([^)]*\)/|(?:while/body/|eval_jaxpr/|checkpoint/|rematted_computation/)')


def estimate(hlo_text: str, ceilings: Ceilings) -> Estimate:
  """The roofline estimate of one run of the compiled module (one device's program)."""
  module = hlo.parse(hlo_text)
  cost = lambda computation, op: _op_cost(module, computation, op, ceilings)
  groups = collections.defaultdict(list)
  for computation, op, runs in hlo.executed(module, lambda c, i: cost(c, i)[3]):
    kind, flops, nbytes, seconds = cost(computation, op)
    if kind:
      source = _source(module, op)
      groups[(kind, source or op.name)].append(
          (op.name, runs, flops * runs, nbytes * runs, seconds * runs))
  ops = sorted((OpCost(rows[0][0], kind, source if source != rows[0][0] else '', len(rows),
                       sum(r[1] for r in rows) / len(rows),
                       *(sum(r[i] for r in rows) for i in (2, 3, 4)))
                for (kind, source), rows in groups.items()), key=lambda o: -o.seconds)
  return Estimate(
      step_s=sum(o.seconds for o in ops),
      attention_s=sum(o.seconds for o in ops if o.kind.startswith('attention')),
      interconnect_s=sum(o.seconds for o in ops if o.kind in _COLLECTIVES),
      flops=sum(o.flops for o in ops), bytes=sum(o.bytes for o in ops), ops=ops,
      notes=_notes(module, ops), ceilings=ceilings)


def _notes(module: hlo.Module, ops: list) -> list:
  notes = []
  unknown = sum(1 for name, body in module.computations.items() for op in body
                if op.opcode == 'while' and module.trip_count(name, op) is None)
  if unknown:
    notes.append(f'{unknown} while loops without a known trip count, counted once')
  if any(op.opcode == 'conditional' for body in module.computations.values() for op in body):
    notes.append('conditionals: only the slowest branch counted')
  if any(o.kind.startswith('attention') for o in ops):
    notes.append('attention kernels counted dense over the row (causal masks half): packed rows '
                 'do less, so their time is an upper bound')
  opaque = sorted({o.kind for o in ops if o.kind.startswith('custom-call')})
  if opaque:
    notes.append(f'counted by bytes only: {", ".join(opaque)}')
  return notes


def _source(module: hlo.Module, op: hlo.Instruction) -> str:
  """The jax op an HLO op came from, without the wrappers every op of the step shares."""
  found = _OP_NAME.search(op.attributes)
  if not found and op.base == 'fusion':  # unnamed fusions: what their result computes
    found = _OP_NAME.search(module.root(op.called()[0]).attributes)
  return _NOISE.sub('', found.group(1)) if found else ''


def _op_cost(module, computation, op, ceilings) -> tuple[str, float, float, float]:
  """(kind, FLOPs, bytes, seconds) of one execution of `op`; kind '' for ops that cost nothing."""
  if op.is_free or op.attribute('custom_call_target') in _FREE_CALLS:
    return '', 0.0, 0.0, 0.0
  if op.base in _COLLECTIVES:
    nbytes = _collective_bytes(module, computation, op, _COLLECTIVES[op.base])
    return op.base, 0.0, nbytes, nbytes / ceilings.interconnect_bytes_per_s
  kind, flops = _matmul_work(module, computation, op)
  nbytes = (_fusion_bytes(module, computation, op) if op.base == 'fusion' else
            _op_bytes(module, computation, op))
  compute_s = sum(f / ceilings.matmul_flops_per_s[peak] for peak, f in flops.items())
  return kind, sum(flops.values()), nbytes, max(compute_s, nbytes / ceilings.memory_bytes_per_s)


def _matmul_work(module, computation, op) -> tuple[str, dict]:
  """(kind, FLOPs by peak) of one op: a fusion's the matmuls inside it."""
  if op.base == 'fusion':
    work = collections.Counter()
    fused = op.called()[0]
    for inner in module.computations[fused]:
      work.update(_matmul_work(module, fused, inner)[1])
    return ('matmul fusion' if work else 'fusion'), dict(work)
  if op.opcode in ('dot', 'convolution'):
    return op.opcode, {_peak(_lhs_dtype(module, computation, op), op.attributes): hlo.dot_flops(
        module, computation, op)}
  if op.opcode != 'custom-call':
    return op.opcode, {}
  target = op.attribute('custom_call_target') or ''
  if target in _CUBLAS:
    return 'gemm', {_peak(_lhs_dtype(module, computation, op), op.attributes): _gemm_flops(
        module, computation, op)}
  attention = _attention_flops(module, computation, op, target)
  if attention:
    return attention
  return f'custom-call {target}', {}


def _peak(dtype: str, attributes: str = '') -> str:
  """The ceiling a matmul of `dtype` operands runs at; f32 by the precision in `attributes`."""
  if dtype in ('bf16', 'f16'):
    return 'bf16'
  if dtype.startswith('f8') or dtype in ('s8', 'u8'):
    return 'f8'
  return 'f32_highest' if re.search('highest', attributes, re.IGNORECASE) else 'f32'


def _lhs_dtype(module, computation, op) -> str:
  return hlo.arrays(module.shape(computation, op.operands[0]))[0][0]


def _gemm_flops(module, computation, op) -> float:
  out = hlo.arrays(op.shape)[0][1]
  lhs = hlo.arrays(module.shape(computation, op.operands[0]))[0][1]
  contracting = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', op.attributes)
  k = math.prod(lhs[int(d)] for d in re.findall(r'\d+', contracting.group(1)))
  return 2.0 * math.prod(out) * k


def _attention_flops(module, computation, op, target: str) -> tuple[str, dict] | None:
  """(kind, FLOPs by peak) of an attention kernel, None for other custom calls.

  Dense count: 4 * batch * heads * q_len * kv_len * head_dim forward (QK^T and PV), halved for
  cuDNN's causal masks (it skips the tiles above the diagonal). Packed rows do less: cuDNN's
  ragged layout attends within each example's run, splash skips blocks its mask leaves empty,
  so on packed data this is an upper bound. Backward: cuDNN's about 2.5x the forward (five
  matmuls to two); splash's dq kernel three matmuls, its dkv kernel four.
  """
  if target.startswith('__cudnn$fmha'):
    q, k = (hlo.arrays(module.shape(computation, o))[0] for o in op.operands[:2])
    scores = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]',
                       op.attributes)
    if scores:  # [batch, heads, q_len, kv_len]
      pairs = math.prod(int(d) for d in re.findall(r'\d+', scores.group(1)))
    else:  # q, k [batch, len, heads, head_dim]
      pairs = math.prod(q[1]) // q[1][-1] * k[1][1]
    mask = re.search(r'"mask_type":\s*"(\w+)"', op.attributes)
    causal = 0.5 if mask and 'CAUSAL' in mask.group(1) else 1.0
    backward = 'Backward' in target
    flops = 4.0 * pairs * q[1][-1] * causal * (2.5 if backward else 1.0)
    return f'attention {"bwd" if backward else "fwd"} (cuDNN)', {_peak(q[0]): flops}
  kernel = re.search(r'/splash_mha_(fwd|dq|dkv)', op.attributes)
  if target == 'tpu_custom_call' and kernel:
    # q, k [(batch,) heads, len, head_dim]; each matmul 2 * heads * q_len * kv_len * head_dim.
    floating = [a[0] for a in (hlo.arrays(module.shape(computation, o)) for o in op.operands)
                if a and a[0][0].startswith(('bf', 'f')) and len(a[0][1]) >= 3]
    q, k = floating[:2]
    matmuls = {'fwd': 2, 'dq': 3, 'dkv': 4}[kernel.group(1)]
    flops = 2.0 * matmuls * math.prod(q[1]) * k[1][-2]
    return f'attention {kernel.group(1)} (splash)', {_peak(q[0]): flops}
  return None


def _collective_bytes(module, computation, op, rule: str) -> float:
  operands = sum(hlo.shape_bytes(module.shape(computation, o)) for o in op.operands)
  if rule == 'output':  # an async start's result is (operand, output): the largest array
    return max((hlo.dtype_bytes(t) * math.prod(d) for t, d in hlo.arrays(op.shape)), default=0)
  return 2 * operands if rule == 'twice' else operands


def _op_bytes(module, computation, op) -> float:
  """Bytes an unfused op reads and writes."""
  shape = lambda name: hlo.shape_bytes(module.shape(computation, name))
  out = hlo.shape_bytes(op.shape)
  if op.opcode in _SLICING:
    return 2 * out + sum(shape(o) for o in op.operands[1:] if op.opcode == 'gather')
  if op.opcode in _IN_PLACE:
    update = _IN_PLACE[op.opcode]
    return 2 * shape(op.operands[update]) + sum(shape(o) for o in op.operands[1:update])
  if op.opcode == 'copy-start':  # result: (source, destination, context)
    return 2 * shape(op.operands[0])
  if op.opcode == 'custom-call' and op.shape.startswith('('):
    # Library calls return (results..., scratch): the u8/s8 workspace is not traffic.
    out = sum(hlo.dtype_bytes(t) * math.prod(d) for t, d in hlo.arrays(op.shape)[:-1])
  return out + sum(shape(o) for o in op.operands)


def _fusion_bytes(module, computation, op) -> float:
  """Bytes a fusion reads and writes: its operands and results, less what it does not touch."""
  fused = op.called()[0]
  body = module.computations[fused]
  by_name = {i.name: i for i in body}
  users = collections.defaultdict(list)
  for inner in body:
    for operand in inner.operands:
      users[operand].append(inner)

  def through_bitcasts(name):  # the instructions that read `name`, looking through bitcasts
    for user in users[name]:
      if user.opcode == 'bitcast':
        yield from through_bitcasts(user.name)
      else:
        yield user, name

  def origin(name):
    while by_name.get(name) is not None and by_name[name].opcode == 'bitcast':
      name = by_name[name].operands[0]
    return name

  root = module.root(fused)
  results = [by_name[origin(r)] for r in root.operands] if root.opcode == 'tuple' else [
      by_name[origin(root.name)]]
  in_place = {origin(r.operands[0]) for r in results if r.opcode in _IN_PLACE}
  total = 0.0
  for param in (i for i in body if i.opcode == 'parameter'):
    full, read = hlo.shape_bytes(param.shape), 0.0
    for user, name in through_bitcasts(param.name):
      if user.opcode in _SLICING and user.operands[0] == name:
        read += hlo.shape_bytes(user.shape)
      elif not (param.name in in_place and user.opcode in _IN_PLACE
                and user.operands[0] == name):
        read = full
        break
    total += min(read, full)
  for result in results:
    written = (result.operands[_IN_PLACE[result.opcode]] if result.opcode in _IN_PLACE else
               result.name)
    total += hlo.shape_bytes(module.shape(fused, written))
  return total


def predict(hlo_text: str, device_kind: str, tokens_per_step: int, flops_per_token: float,
            devices: int) -> dict:
  """bench's keys for a compiled step (one device's program of `devices`): predicted step
  seconds, tokens/s and MFU (analytic `flops_per_token` over the marketed peak,
  hrmtext.model.flops.peak_flops), the 10 ops that dominate and the ceilings used; None where
  the device's ceilings are unknown."""
  ceilings, peak = ceilings_for(device_kind), peak_flops(device_kind)
  if ceilings is None:
    return dict.fromkeys(KEYS)
  result = estimate(hlo_text, ceilings)
  tokens_per_s = tokens_per_step / result.step_s if result.step_s else None
  return {
      'predicted_step_s': result.step_s,
      'predicted_tokens_per_s': tokens_per_s,
      'predicted_mfu': (flops_per_token * tokens_per_s / (peak * devices)
                        if tokens_per_s and peak else None),
      'roofline_top_ops': [
          {**dataclasses.asdict(o), 'share': o.seconds / result.step_s} for o in result.ops[:10]],
      'roofline_ceilings': ceilings.name,
      'roofline_attention_s': result.attention_s,
      'roofline_interconnect_s': result.interconnect_s,
      'roofline_notes': result.notes,
  }


KEYS = ('predicted_step_s', 'predicted_tokens_per_s', 'predicted_mfu', 'roofline_top_ops',
        'roofline_ceilings', 'roofline_attention_s', 'roofline_interconnect_s', 'roofline_notes')
# predict's keys that are not one number or word: not for bench's `key=value` line.
NOT_FLAT = ('roofline_top_ops', 'roofline_notes')


def report_lines(results: dict) -> list:
  """`predict`'s keys as text lines, for bench to print."""
  if results.get('predicted_step_s') is None:
    return ['roofline: n/a (no ceilings for this device; have '
            f'{", ".join(sorted(CEILINGS))})']
  r, mfu = results, results['predicted_mfu']
  lines = [
      f'roofline ({CEILINGS[r["roofline_ceilings"]].source})',
      f'predicted: step {r["predicted_step_s"]:.4g} s (attention kernels '
      f'{r["roofline_attention_s"]:.3g} s, collectives {r["roofline_interconnect_s"]:.3g} s), '
      f'{r["predicted_tokens_per_s"]:,.0f} tokens/s, MFU '
      + ('n/a' if mfu is None else f'{mfu:.1%}'),
      *(f'  note: {n}' for n in results['roofline_notes']),
      'top ops:  share  seconds  count x trips    TFLOP       GB  kind  op (source)',
  ]
  for o in results['roofline_top_ops']:
    lines.append(f'  {o["share"]:6.1%} {o["seconds"]:8.3g} {o["count"]:>5} x {o["trips"]:<6.4g} '
                 f'{o["flops"] / 1e12:8.3g} {o["bytes"] / 1e9:8.3g}  {o["kind"]}  {o["name"]}'
                 + (f' ({_tail(o["source"])})' if o['source'] else ''))
  return lines


def _tail(text: str, width: int = 70) -> str:
  return text if len(text) <= width else '...' + text[-width + 3:]
