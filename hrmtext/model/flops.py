"""Model FLOPs per token (matmuls only, 2 per multiply-add), for tokens/s -> TFLOP/s and MFU.

Attention is counted as causal over the whole row (half of the full score matrix), the usual
convention; packing makes the work actually needed smaller. Rematerialisation is not counted.
"""
from hrmtext.model import hlo
from hrmtext.model.config import ModelConfig
from hrmtext.model.horizon import Horizon, full_horizon

# Dense bf16 peak per chip, by jax device_kind prefix (the first that matches; jax calls a v5p
# chip 'TPU v5', a v5e 'TPU v5 lite').
PEAK_FLOPS = {
    'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v5': 459e12, 'TPU v6': 918e12,
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


def compiled_matmul_flops(hlo_text: str) -> float:
  """Matmul FLOPs (2 per multiply-add, as above) of a compiled module's optimised HLO text
  (`compiled.as_text()`), each while-loop body counted as often as it runs (XLA's own cost
  analysis counts it once, so the scanned layers and recurrence make it far too small).

  Dots and convolutions count (XLA:TPU writes dots as convolutions); ops whose work XLA does not
  show (custom calls such as cuBLAS, cuDNN or Pallas kernels) count zero: see
  hrmtext.parallel.roofline for those.
  """
  module = hlo.parse(hlo_text)
  return sum(hlo.fused_dot_flops(module, computation, instruction) * times
             for computation, instruction, times in hlo.executed(module))
