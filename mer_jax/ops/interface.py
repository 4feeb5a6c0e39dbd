"""The ops seam: the few ops whose best form differs by backend, and the one place that chooses a form per run.

The model calls these ops through an `Ops` value passed in as a module field; it never asks which backend it runs
on. Forms (all compute the same values and gradients, tests/test_ops.py):
- `reference`: plain lax / flax math (grouped conv, nn.BatchNorm sums, nn.Dropout's draw, a sort-free top-k).
  The spec the others are tested against, what export traces, and the GPU/TPU form.
- `xla`: shifted-slice convs, per-row BatchNorm sums and a hashed dropout mask that XLA:CPU fuses into fast loops.
- `cpu_ffi`: the xla form with C++ kernels for the ops a CPU profile named (mer_jax/ops/cpu/).
`choose(config.model.ops, mesh)` picks one once per run; 'auto' follows what docs/PERFORMANCE.md measured.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from mer_jax.ops import cpu_ffi
from mer_jax.ops import reference
from mer_jax.ops import xla
from mer_jax.ops.cpu import build as cpu_build

CHOICES = ("auto", "reference", "xla", "cpu_ffi")

# XLA:GPU options of every form on GPU, for the train step (`compiler_options("train")`) and for the eval step and
# forward passes (`compiler_options("forward")`). Triton's GEMM fusion aborted XLA while it compiled the edge model's
# batch-1 eval forward with jax 0.11.2 (`triton_tiling_propagation.cc:698 Check failed`, docs/PERFORMANCE.md); with
# it off the train step ran 1% slower (18,948 against 19,135 clips/s on one H200). Per jit, not XLA_FLAGS: the
# process environment stays the user's.
GPU_COMPILER_OPTIONS = (("xla_gpu_enable_triton_gemm", False),)

CompilerOptions = tuple[tuple[str, str | bool | int], ...]


@dataclasses.dataclass(frozen=True)
class Ops:
  """One form of each op of the seam. Frozen and hashable: it is a module field and part of the step's cache key.

  Shapes: x (N, H, W, C); depthwise kernels (k, k, 1, C); grey-input kernels (k, k, 1, Co); conv kernels
  (k, k, Ci, Co); pointwise kernels (Ci, Co); scores (B, T); selection (B, K, T); frames (B, T, H, W, 1) uint8.
  """

  name: str
  depthwise_conv: Callable  # (x, kernel, stride, pad) -> (N, Ho, Wo, C)
  pointwise_conv: Callable  # (x, kernel) -> (N, H, W, Co)
  grey_conv: Callable  # (x (N, H, W, 1), kernel, stride, pad) -> (N, Ho, Wo, Co)
  conv: Callable  # (x, kernel, stride, pad) -> (N, Ho, Wo, Co)
  channel_moments: Callable  # (x) -> (sum of x, sum of x^2), each (C,)
  scale_and_shift: Callable  # (x, multiplier (C,), shift (C,)) -> x * multiplier + shift
  dropout_keep_mask: Callable  # (key, rate, shape) -> bool mask, True with probability 1 - rate
  frame_gather: Callable  # (selection, frames) -> (B, K, H, W, 1) in the selection's dtype
  straight_through_topk: Callable  # (scores, k, temperature) -> exact K-hot (B, K, T), soft gradient
  # (option, value) pairs for compiling the train step, and the eval step and forward passes: XLA debug options
  # (jax.jit's compiler_options) of the backend `choose` picked the form for.
  train_compiler_options: CompilerOptions = ()
  forward_compiler_options: CompilerOptions = ()
  # How the train / eval step computes log-mel and audio jitter from raw batches (mer_jax.data.device_features):
  # 'cpu' (FFT, a loop over clips) or 'accelerator' (a DFT matmul and batched jitter, which shard over the batch).
  feature_form: str = "cpu"

  def compiler_options(self, program: str = "train") -> dict[str, str | bool | int] | None:
    """jax.jit's compiler_options for the 'train' step or a 'forward' pass (eval step, prediction); None: none."""
    if program not in ("train", "forward"):
      raise ValueError(f"program={program!r}; use 'train' or 'forward'.")
    return dict(self.train_compiler_options if program == "train" else self.forward_compiler_options) or None


REFERENCE = Ops(
  name="reference",
  depthwise_conv=reference.depthwise_conv,
  pointwise_conv=reference.pointwise_conv,
  grey_conv=reference.grey_conv,
  conv=reference.conv,
  channel_moments=reference.channel_moments,
  scale_and_shift=reference.scale_and_shift,
  dropout_keep_mask=reference.dropout_keep_mask,
  frame_gather=reference.einsum_frame_gather,
  straight_through_topk=reference.straight_through_topk,
)

XLA = Ops(
  name="xla",
  depthwise_conv=xla.depthwise_conv,
  pointwise_conv=xla.pointwise_conv,
  grey_conv=xla.grey_conv,
  conv=xla.conv,
  channel_moments=xla.channel_moments,
  scale_and_shift=xla.scale_and_shift,
  dropout_keep_mask=xla.keep_mask,
  frame_gather=xla.einsum_frame_gather,
  straight_through_topk=xla.straight_through_topk,
  train_compiler_options=xla.CPU_TRAIN_COMPILER_OPTIONS,
)

CPU_FFI = dataclasses.replace(
  XLA,
  name="cpu_ffi",
  depthwise_conv=cpu_ffi.depthwise_conv,
  grey_conv=cpu_ffi.grey_conv,
  conv=cpu_ffi.conv,
  channel_moments=cpu_ffi.channel_moments,
  scale_and_shift=cpu_ffi.scale_and_shift,
  frame_gather=cpu_ffi.frame_gather,
)

FORMS = {ops.name: ops for ops in (REFERENCE, XLA, CPU_FFI)}


def choose(choice: str, *, platform: str | None = None, device_count: int | None = None, dtype: str = "float32") -> Ops:
  """The form for a run: `choice` is config.model.ops ('auto', 'reference', 'xla' or 'cpu_ffi'); `platform` and
  `device_count` describe the mesh the run compiles for (default: JAX's default backend, all devices).

  'auto': cpu_ffi on one CPU device in float32 where the kernels build; xla on other CPU set-ups (several devices:
  an FFI call has no partitioning rule; bf16; no compiler); reference on GPUs and TPUs, where the CPU-shaped forms
  were never measured faster. An explicit choice that cannot run here raises with the reason. The form carries the
  compiler options of `platform` (XLA:CPU's for the xla and cpu_ffi forms on CPU, GPU_COMPILER_OPTIONS on GPU) and
  its feature form ('accelerator' off the CPU).
  """
  platform = platform or jax.default_backend()
  device_count = jax.device_count() if device_count is None else device_count
  if choice not in CHOICES:
    raise ValueError(f"config.model.ops={choice!r}; use one of {', '.join(CHOICES)}.")
  if choice == "auto":
    if platform != "cpu":
      return _for_platform(REFERENCE, platform)
    if device_count == 1 and dtype == "float32" and cpu_build.available():
      return CPU_FFI
    return XLA
  if choice == "cpu_ffi":
    problem = None
    if platform != "cpu":
      problem = f"the run compiles for {platform}"
    elif device_count != 1:
      problem = f"the mesh has {device_count} devices and an FFI call has no partitioning rule"
    elif not cpu_build.available():
      problem = cpu_build.unavailable_reason()
    if problem:
      raise ValueError(f"config.model.ops='cpu_ffi' cannot run here: {problem}. Use 'auto' or 'xla'.")
  return _for_platform(FORMS[choice], platform)


def _for_platform(ops: Ops, platform: str) -> Ops:
  """`ops` with the compiler options of `platform`: the forms' own are XLA:CPU's, kept on CPU only."""
  if platform == "cpu":
    return ops
  options = GPU_COMPILER_OPTIONS if platform == "gpu" else ()
  return dataclasses.replace(
    ops, train_compiler_options=options, forward_compiler_options=options, feature_form="accelerator"
  )


def choose_for_mesh(choice: str, mesh: jax.sharding.Mesh, dtype: str = "float32") -> Ops:
  """`choose` for the platform and size of `mesh`."""
  return choose(choice, platform=mesh.devices.flat[0].platform, device_count=mesh.devices.size, dtype=dtype)


def describe(ops: Ops) -> str:
  """One line for the launch log: which form runs and why it matters."""
  return {
    "reference": "reference (plain lax convs and reductions)",
    "xla": "xla (shifted-slice convs and row-summed BatchNorm for XLA:CPU)",
    "cpu_ffi": "cpu_ffi (the xla form plus C++ kernels for depthwise convs, BatchNorm sums, frame gather)",
  }[ops.name]
