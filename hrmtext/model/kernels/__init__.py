"""Fast attention kernels behind `attention.attention(..., implementation)`.

Each computes the same function as `attention.xla_attention` for packed self-attention
(training, scoring): q/k/v [batch, len, heads, head_dim] and an `AttentionMask` whose query and
key sides are the same tokens. Cached decode always uses the XLA path.
"""
