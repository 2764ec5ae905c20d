"""GPU cuDNN flash attention on packed PrefixLM rows: two passes in cuDNN's packed layout.

The packed (ragged) layout describes a row as runs of tokens (start, length), each attended to on
its own, so the work follows the examples' lengths rather than the row's. Two passes give the
PrefixLM mask:
  causal  within each run of one segment id: right for response queries;
  prefix  bidirectional within each instruction: right for instruction queries (the instruction
          is its example's first tokens, so an instruction query sees exactly its instruction);
and each query keeps the pass that is right for it. The runs come with the batch
(`AttentionMask.runs`, made by the host-side packer, which bounds the examples per row: the
run slots and cuDNN's per-slot softmax statistics are sized by that bound); a mask without them
(hand-made batches) has its runs computed here, with one slot per token.

Padding (segment 0) matches the XLA path when a row's padding is one run (trailing, as packing
leaves it); otherwise only padding outputs differ, and nothing labelled depends on them.
Needs Hopper or newer (packed layout), bfloat16/float16 q/k/v, and XLA's cuDNN custom calls, which
come with sharding rules: no shard_map needed.

Compiling for GPUs that are not here (`hrmtext.parallel.targets`): jax checks the packed layout
against the *local* GPU (`check_compute_capability` reads `xla_bridge.local_devices('gpu')` and
the default backend) and the *local* cuDNN library, with no argument or config option to name
another device (jax 0.10 to 0.12), so there is no supported way past it. `_answer_for_target`
below points jax's three checks at the device being compiled for instead (`target_device()`);
for a GPU that is present, that is the same device and the same answers.
"""
import functools

import jax
import jax.numpy as jnp
# The packed layout is not exposed by jax.nn.dot_product_attention (jax 0.10 to 0.12).
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fmha

from hrmtext.errors import UserError
from hrmtext.model.kernels import PackedRuns, compute_capability, is_compile_only, target_device

# The cuDNN a compile-only GPU target is described with (its GpuTargetConfigProto's
# dnn_version_info, see targets): the oldest jax-cuda13-plugin accepts (nvidia-cudnn-cu13>=9.12).
# jax asks for a version only to gate features this kernel does not use (score_mod, MLA, sm_103).
COMPILE_ONLY_CUDNN_VERSION = (9, 12)


def cudnn_attention(q, k, v, mask):
  """q/k/v [batch, len, heads, head_dim] (bf16/fp16); `mask` an AttentionMask in packed form."""
  if k.shape[1] != q.shape[1]:
    raise UserError(f'cudnn attention needs q and kv of one length (self-attention), got '
                    f'{q.shape[1]} and {k.shape[1]}; cached decode uses the xla kernel')
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise UserError(f'cudnn attention needs bfloat16 or float16 activations (model.dtype), '
                    f'got {q.dtype}')
  device = target_device()
  if device.platform != 'gpu':
    raise UserError(f'cudnn attention needs a CUDA GPU, the computation is compiled for '
                    f'{device.device_kind} ({device.platform}); use splash or xla')
  runs = mask.runs or _device_runs(mask)
  is_instruction = mask.q_is_instruction.astype(bool)
  return _packed(q, k, v, is_instruction, (runs.causal_offsets, runs.causal_lengths),
                 (runs.prefix_offsets, runs.prefix_lengths))


def _answer_for_target(local_check, answer):
  """jax's `local_check`, or `answer(device)` where the target is a compile-only GPU."""
  @functools.wraps(local_check)
  def check(*args):
    device = target_device()
    return answer(device, *args) if is_compile_only(device) else local_check(*args)

  return check


def _at_least(device, capability: str) -> bool:
  have = compute_capability(device)
  return have is not None and have >= tuple(map(int, capability.split('.')))


def _cudnn_version(device) -> int:
  del device
  major, minor = COMPILE_ONLY_CUDNN_VERSION
  return major * 10000 + minor * 100  # jax's encoding: 9.12.0 is 91200


# Installed once: each check also runs while differentiating rematerialised layers, after
# `cudnn_attention` has returned, so a patch scoped to the call would not cover it.
cudnn_fmha.check_compute_capability = _answer_for_target(
    cudnn_fmha.check_compute_capability, _at_least)
cudnn_fmha.is_cuda_compute_capability_equal = _answer_for_target(
    cudnn_fmha.is_cuda_compute_capability_equal,
    lambda device, capability: compute_capability(device) == tuple(map(int, capability.split('.'))))
cudnn_fmha.check_cudnn_version = _answer_for_target(cudnn_fmha.check_cudnn_version, _cudnn_version)


def _device_runs(mask) -> PackedRuns:
  """The runs of a mask that came without them: one slot per token (at least 2: with one, jax
  passes cuDNN the unused -1 lengths unfiltered), so every row fits."""
  segment_ids, is_instruction = mask.q_segment_ids, mask.q_is_instruction.astype(bool)
  max_runs = max(2, segment_ids.shape[1])
  return PackedRuns(*_runs(segment_ids, jnp.ones_like(is_instruction), max_runs),
                    *_runs(segment_ids, is_instruction, max_runs))


def _runs(segment_ids, keep, max_runs: int):
  """Packed layout of the runs of one segment id over the `keep` tokens: offsets
  [batch, max_runs + 1] and lengths [batch, max_runs], both int32 and -1 past the row's runs."""
  ids = jnp.where(keep, segment_ids, -1)
  change = ids[:, 1:] != ids[:, :-1]
  edge = jnp.ones_like(change[:, :1])
  starts = jnp.concatenate([edge, change], axis=1) & keep
  ends = jnp.concatenate([change, edge], axis=1) & keep

  def row(starts, ends):
    first = jnp.nonzero(starts, size=max_runs + 1, fill_value=-1)[0]
    last = jnp.nonzero(ends, size=max_runs, fill_value=-1)[0]
    lengths = jnp.where(first[:max_runs] >= 0, last - first[:max_runs] + 1, -1)
    return first.astype(jnp.int32), lengths.astype(jnp.int32)

  return jax.vmap(row)(starts, ends)


def _packed(q, k, v, is_instruction, causal_runs, prefix_runs):
  def attend(runs, mask_type, q, k, v):
    offsets, lengths = runs
    return cudnn_fmha.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1]**-0.5, mask_type=mask_type, qkv_layout='BTNH')

  causal = attend(causal_runs, cudnn_fmha.MaskType.PADDING_CAUSAL, q, k, v)
  # cuDNN leaves tokens outside every run unwritten, in the output and in the gradients: the
  # prefix pass sees only instruction tokens (zeroing the others' gradients), its output only
  # reaches instruction queries.
  instruction = is_instruction[:, :, None, None]
  only_instruction = lambda x: jnp.where(instruction, x, jnp.zeros_like(x))
  prefix = attend(prefix_runs, cudnn_fmha.MaskType.PADDING, *map(only_instruction, (q, k, v)))
  return jnp.where(instruction, prefix, causal)
