"""Random-weight HF `hrm_text` models (the independent oracle) and conversions to hrmtext."""
import numpy as np
import pytest

try:  # the `hf` extra; on Python 3.12 CI installs no torch (its PyPI build is the multi-GB CUDA one)
  import torch
  import transformers
except ImportError:
  torch = transformers = None

# Marks the tests that compare against transformers; they skip, saying why, without torch.
needs_hf = pytest.mark.skipif(
    transformers is None or not hasattr(transformers, 'HrmTextForCausalLM'),
    reason='HF oracle: needs torch and transformers>=5.9 (pip install -e ".[test,hf]")')

from hrmtext.hf import config_from_hf, params_from_hf


def make_hf_model(seed=0, vocab=300, hidden=64, heads=2, head_dim=32, intermediate=128,
                  layers=2, H_cycles=2, L_cycles=3, L_bp_cycles=(2,)):
  torch.manual_seed(seed)
  config = transformers.HrmTextConfig(
      vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
      intermediate_size=intermediate, num_hidden_layers=layers, H_cycles=H_cycles,
      L_cycles=L_cycles, L_bp_cycles=list(L_bp_cycles), initializer_range=hidden**-0.5,
      attn_implementation='sdpa')
  model = transformers.HrmTextForCausalLM(config).eval()
  with torch.no_grad():  # non-zero z_L_init so the test sees it; large enough weights to matter
    model.model.z_L_init.normal_()
    for p in model.parameters():
      if p.dim() == 2:
        p.normal_(0, p.shape[1]**-0.5)
  return model


def to_hrmtext(model):
  """(ModelConfig, params) holding the same weights (transformers' split in-memory layout)."""
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  cfg = config_from_hf(model.config.to_dict())
  return cfg, params_from_hf(tensors, cfg)


def jax_leaves(tree):
  """The leaves of a params tree as NumPy arrays, in a fixed order."""
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
