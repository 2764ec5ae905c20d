"""HRM-Text model: layers, attention, stacks, recurrence, baselines, loss."""
from hrmtext.model.attention import AttentionMask
from hrmtext.model.config import ModelConfig
from hrmtext.model.horizon import Horizon, credit_horizon
from hrmtext.model.loss import IGNORE_LABEL, loss_and_metrics, summarize, zero_sums
from hrmtext.model.models import HrmText, LanguageModel, Transformer, build_model
