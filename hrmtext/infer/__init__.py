"""Inference: KV-cache generation with continuous batching, sampling, log-likelihood scoring."""
from hrmtext.infer.engine import Engine
from hrmtext.infer.sampling import Sampling
