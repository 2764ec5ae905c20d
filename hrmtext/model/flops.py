"""Model FLOPs per token (matmuls only, 2 per multiply-add), for tokens/s -> TFLOP/s and MFU.

Attention is counted as causal over the whole row (half of the full score matrix), the usual
convention; packing makes the work actually needed smaller. Rematerialisation is not counted.
"""
from hrmtext.model.config import ModelConfig
from hrmtext.model.horizon import Horizon

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


def train_flops_per_token(cfg: ModelConfig, horizon: Horizon | None, seq_len: int) -> float:
  """Forward of every application + backward (2x forward) of the differentiable ones."""
  stack = stack_forward_flops(cfg, seq_len)
  head = 2 * cfg.hidden_size * cfg.vocab_size
  if cfg.architecture == 'transformer' or horizon is None:
    applications = differentiable = 1 if cfg.architecture == 'transformer' else (
        cfg.H_cycles * (cfg.L_cycles + 1))
  else:
    applications = len(horizon.L) + len(horizon.H)
    differentiable = sum(horizon.L) + sum(horizon.H)
  return stack * (applications + 2 * differentiable) + 3 * head
