"""HRM-Text model: layers, attention, stacks, recurrence, baselines, loss."""
from hrmtext.model.attention import AttentionMask
from hrmtext.model.config import ComputeConfig, ModelConfig
from hrmtext.model.horizon import (Horizon, architecture_horizon, bp_steps_horizon, fixed_horizon,
                                   full_horizon, per_cycle_horizon)
from hrmtext.model.loss import IGNORE_LABEL, loss_and_metrics, summarize, zero_sums
from hrmtext.model.lora import LoraConfig
from hrmtext.model.models import HrmText, LanguageModel, Transformer, build_model
