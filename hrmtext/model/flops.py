"""Model FLOPs per token (matmuls only, 2 per multiply-add), for tokens/s -> TFLOP/s and MFU.

Attention is counted as causal over the whole row (half of the full score matrix), the usual
convention; packing makes the work actually needed smaller. Rematerialisation is not counted.
"""
import math
import re

from hrmtext.model.config import ModelConfig
from hrmtext.model.horizon import Horizon, full_horizon

# Dense bf16 peak per chip, by jax device_kind prefix.
PEAK_FLOPS = {
    'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6': 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_FLOPS.items() if device_kind.startswith(k)), None)


def stack_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of one stack application."""
  d, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  per_layer = 2 * d * 4 * hd + 2 * hd * d + 3 * 2 * d * cfg.mlp_size + 2 * seq_len * hd
  return cfg.layers_per_stack * per_layer


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward of every stack application and the LM head (inference, teacher-forced eval)."""
  head = 2 * cfg.hidden_size * cfg.vocab_size
  return stack_forward_flops(cfg, seq_len) * sum(cfg.applications) + head


def train_flops_per_token(cfg: ModelConfig, horizon: Horizon | None, seq_len: int) -> float:
  """Forward of every application + backward (2x forward) of the differentiable ones (`horizon`;
  None: all)."""
  horizon = horizon or full_horizon(cfg)
  applications = len(horizon.L) + len(horizon.H)
  head = 2 * cfg.hidden_size * cfg.vocab_size
  return stack_forward_flops(cfg, seq_len) * (applications + 2 * horizon.differentiable) + 3 * head


_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) \((.*)\) -> .*\{$')
_PARAM = re.compile(r'([\w.\-]+): \w+\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (?:\w+\[([\d,]*)\]\S*|\(.*?\)) ([\w\-]+)\((.*)$')
_CALLED = re.compile(r'(?:calls|body)=%([\w.\-]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def compiled_matmul_flops(hlo_text: str) -> float:
  """Matmul FLOPs (2 per multiply-add, as above) of a compiled module's optimised HLO text
  (`compiled.as_text()`), each while-loop body counted as often as it runs (XLA's own cost
  analysis counts it once, so the scanned layers and recurrence make it far too small).

  Ops whose work XLA does not show (custom calls such as cuDNN or Pallas kernels) count zero.
  """
  shapes, body, entry, name = {}, {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name = header.group(1)
      entry = name if line.startswith('ENTRY') else entry
      body[name] = []
      shapes.update({(name, p): dims for p, dims in _PARAM.findall(header.group(2))})
    elif name and (instruction := _INSTRUCTION.match(line)):
      body[name].append(instruction.groups())
      shapes[(name, instruction.group(1))] = instruction.group(2)

  def dims(computation, operand):
    text = shapes.get((computation, operand.strip().lstrip('%')))
    return [int(d) for d in text.split(',') if d] if text else []

  memo = {}

  def flops(computation):
    if computation not in memo:
      total = 0.0
      for _, out_dims, opcode, rest in body.get(computation, []):
        if opcode == 'dot':
          lhs = rest.split(',')[0]
          contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest).group(1)
          lhs_dims = dims(computation, lhs)
          k = math.prod(lhs_dims[int(i)] for i in contracting.split(',') if i)
          total += 2 * math.prod(int(d) for d in out_dims.split(',') if d) * k
        for called in _CALLED.findall(rest):
          trips = _TRIP_COUNT.search(rest) if opcode == 'while' else None
          total += flops(called) * (int(trips.group(1)) if trips else 1)
      memo[computation] = total
    return memo[computation]

  return flops(entry)
