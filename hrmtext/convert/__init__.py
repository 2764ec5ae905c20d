"""Conversion between HF transformers `hrm_text` checkpoints and hrmtext checkpoints."""
from hrmtext.convert.hf import config_from_hf, config_to_hf, hf_to_hrmtext, hrmtext_to_hf, is_hf_dir
