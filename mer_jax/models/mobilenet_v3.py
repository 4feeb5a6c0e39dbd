"""MobileNetV3-Small backbone (Howard et al. 2019) in flax.linen, following torchvision's block table.

The stem takes one grey channel, so the backbone without its classifier has exactly 926,720 parameters
(BatchNorm scale and bias counted, running statistics apart). Padding is symmetric `(k - 1) // 2` as in
torchvision (flax's 'SAME' pads stride-2 convs asymmetrically), so a port of torchvision weights gives the
same numbers. BatchNorm: torch momentum 0.01 is flax momentum 0.99; eps 1e-3.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax.models import batch_norm
from mer_jax.ops.cpu import kernels as cpu_kernels


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted-residual block of the table: kernel, expanded and output channels, SE, activation, stride."""
  kernel: int
  expanded: int
  out: int
  use_se: bool
  activation: str  # 'relu' or 'hardswish'
  stride: int


# torchvision `_mobilenet_v3_conf('mobilenet_v3_small')`: (kernel, expanded, out, SE, activation, stride).
SMALL_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(3, 16, 16, True, "relu", 2),
    BlockSpec(3, 72, 24, False, "relu", 2),
    BlockSpec(3, 88, 24, False, "relu", 1),
    BlockSpec(5, 96, 40, True, "hardswish", 2),
    BlockSpec(5, 240, 40, True, "hardswish", 1),
    BlockSpec(5, 240, 40, True, "hardswish", 1),
    BlockSpec(5, 120, 48, True, "hardswish", 1),
    BlockSpec(5, 144, 48, True, "hardswish", 1),
    BlockSpec(5, 288, 96, True, "hardswish", 2),
    BlockSpec(5, 576, 96, True, "hardswish", 1),
    BlockSpec(5, 576, 96, True, "hardswish", 1),
)
STEM_CHANNELS = 16
LAST_CHANNELS = 576  # 6 x the last block's output, torchvision's `lastconv_output_channels`.
BATCHNORM_EPSILON = 1e-3
BATCHNORM_MOMENTUM = 0.99


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible`: round to a multiple of `divisor`, never more than 10% below `value`."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


def activation_fn(name: str):
  return {"relu": nn.relu, "hardswish": nn.hard_swish}[name]


def shifted_slices_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """(N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C) as a sum of k*k shifted, strided slices times weights.

  The same math as a grouped conv with one group per channel. XLA's CPU backend runs grouped convs (and
  their gradients above all) through a slow generic path; this form is elementwise work it fuses into a
  few loops. GPUs/TPUs handle both forms well.
  """
  kernel_size = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  batch, height, width, channels = x.shape
  out_height = (height - kernel_size) // stride + 1
  out_width = (width - kernel_size) // stride + 1
  out = None
  for row in range(kernel_size):
    for col in range(kernel_size):
      window = jax.lax.slice(
          x, (0, row, col, 0),
          (batch, row + stride * (out_height - 1) + 1, col + stride * (out_width - 1) + 1, channels),
          (1, stride, stride, 1))
      term = window * kernel[row, col, 0]
      out = term if out is None else out + term
  return out


def depthwise_kernel_grad(x: jax.Array, output_grad: jax.Array, kernel_size: int, stride: int,
                          pad: int) -> jax.Array:
  """d loss / d kernel (k, k, 1, C) of `shifted_slices_conv` from its input x (N, H, W, C) and output
  gradient (N, Ho, Wo, C).

  Autodiff of the shifted slices gives k*k reductions of `window * output_grad` over (N, Ho, Wo): XLA's
  CPU backend hands each to a library reduction that cannot read a strided window in place, so every
  window was first copied out (k*k copies of the activation per layer: 40% of the backbone's train step).
  Here each tap's products are taken column by column and summed over the output columns (and rows, for
  small maps) inside the loop that reads the window, the k*k partial sums are stacked next to each
  other, and one reduction finishes them. Stride-2 inputs are split once into their 4 phases so that
  every window is a unit-stride slice.
  """
  batch, out_height, out_width, channels = output_grad.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  phases = {(p, q): x[:, p::stride, q::stride, :] for p in range(stride) for q in range(stride)}
  accumulator = jnp.promote_types(output_grad.dtype, jnp.float32)  # float32 sums for bf16 compute too
  grad_columns = batch_norm.position_columns(output_grad)
  partial_sums = []
  for row in range(kernel_size):
    for col in range(kernel_size):
      source = phases[(row % stride, col % stride)]
      top, left = row // stride, col // stride
      window = jax.lax.slice(source, (0, top, left, 0), (batch, top + out_height, left + out_width, channels))
      # Multiplying slices, not whole arrays: a whole-array product has many readers and is written out.
      products = [(window_column * grad_column).astype(accumulator)
                  for window_column, grad_column in zip(batch_norm.position_columns(window), grad_columns)]
      partial = sum(products[1:], products[0])
      partial_sums.append(partial if partial.ndim == 3 else partial[:, None])  # (N, Ho or 1, C)
  stacked = jnp.stack(partial_sums, axis=2)  # (N, Ho or 1, k*k, C): the taps of one row side by side
  return jnp.sum(stacked, axis=(0, 1)).reshape(kernel_size, kernel_size, 1, channels)


def depthwise_input_grad(output_grad: jax.Array, kernel: jax.Array, stride: int, pad: int, height: int,
                         width: int) -> jax.Array:
  """d loss / d x (N, H, W, C) of `shifted_slices_conv(x, kernel, stride, pad)` from its output gradient
  (N, Ho, Wo, C), in gather form: each input position sums its neighbours' gradients.

  Autodiff gives the scatter form, k*k padded copies of `output_grad * tap` added up, and XLA:CPU
  recomputed the producer of `output_grad` (BatchNorm and activation backward) inside each pad. The
  gather form is shifted slices like the forward. With stride s, input rows a = s*u + p of one phase p
  only see the taps p, p + s, ...: each of the s*s phases is a small unit-stride sum over one padded copy
  of `output_grad`, and the phases are interleaved back.
  """
  batch, out_height, out_width, channels = output_grad.shape
  kernel_size = kernel.shape[0]
  most_taps = -(-kernel_size // stride)
  # Padded-input rows [pad, pad + H) are u in [first, last) of each phase.
  first_row, last_row = pad // stride, -(-(pad + height) // stride)
  first_col, last_col = pad // stride, -(-(pad + width) // stride)
  grad = jnp.pad(output_grad, ((0, 0), (most_taps - 1, max(0, last_row - out_height)),
                               (most_taps - 1, max(0, last_col - out_width)), (0, 0)))
  phase_rows = []
  for row_phase in range(stride):
    phase_cols = []
    for col_phase in range(stride):
      taps = kernel[row_phase::stride, col_phase::stride, 0]  # (Tp, Tq, C)
      out = None
      for t in range(taps.shape[0]):
        for u in range(taps.shape[1]):
          top, left = first_row - t + most_taps - 1, first_col - u + most_taps - 1
          window = jax.lax.slice(grad, (0, top, left, 0),
                                 (batch, top + last_row - first_row, left + last_col - first_col, channels))
          term = window * taps[t, u]
          out = term if out is None else out + term
      phase_cols.append(out)
    phase_rows.append(jnp.stack(phase_cols, axis=3))  # (N, rows, cols, s, C)
  interleaved = jnp.stack(phase_rows, axis=2).reshape(
      batch, (last_row - first_row) * stride, (last_col - first_col) * stride, channels)
  top, left = pad - first_row * stride, pad - first_col * stride
  return interleaved[:, top:top + height, left:left + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_slices_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C) in XLA ops: `shifted_slices_conv`
  forward, `depthwise_input_grad` and `depthwise_kernel_grad` for the gradients."""
  return shifted_slices_conv(x, kernel, stride, pad)


def _depthwise_conv_forward(x, kernel, stride, pad):
  # The padded input is what the forward reads and what the kernel gradient needs: keeping it saves
  # padding the activation a second time in the backward.
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return shifted_slices_conv(padded, kernel, stride, 0), (padded, kernel)


def _depthwise_conv_backward(stride, pad, residuals, output_grad):
  padded, kernel = residuals
  kernel_size = kernel.shape[0]
  height, width = padded.shape[1] - 2 * pad, padded.shape[2] - 2 * pad
  input_grad = depthwise_input_grad(output_grad, kernel, stride, pad, height, width)
  kernel_grad = depthwise_kernel_grad(padded, output_grad, kernel_size, stride, 0)
  return input_grad, kernel_grad.astype(kernel.dtype)


shifted_slices_depthwise_conv.defvjp(_depthwise_conv_forward, _depthwise_conv_backward)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C), zero padding `pad`.

  On one CPU device in float32: the FFI kernels of `cpu_kernels` (train step 0.78x the time of the
  XLA-op form below, 2-core x86). Elsewhere: `shifted_slices_depthwise_conv`, which XLA partitions over a
  mesh (the FFI call has no partitioning rule, so on several devices XLA would gather the whole batch to
  each), runs on GPUs/TPUs, computes in bf16, and needs no C++ compiler (MER_JAX_NATIVE_KERNELS=0 selects
  it too). Both give the same values and gradients (test_mobilenet_v3).
  """
  if cpu_kernels.applies(x, kernel):
    return cpu_kernels.depthwise_conv(x, kernel, stride, pad)
  return shifted_slices_depthwise_conv(x, kernel, stride, pad)


class DepthwiseConv(nn.Module):
  """Depthwise kxk conv without bias; its `kernel` (k, k, 1, C) is laid out exactly as nn.Conv's."""
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.kernel_size, 1, channels))
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, (self.kernel_size - 1) // 2)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 conv (N, H, W, Ci) x (Ci, Co) -> (N, H, W, Co), with its weight gradient taken channel-major.

  The weight gradient sums x (M, Ci) times the output gradient (M, Co) over all M = N*H*W positions.
  With both position-major, XLA:CPU copies x into (Ci, M) in the backward before its matrix product
  (a separate pass over the activation). Here the forward keeps x already transposed as the residual,
  written alongside x's producer, and the backward is a plain (Ci, M) x (M, Co) product: the backbone's
  train fwd+bwd 289-309 -> 276-277 ms, the full train step ~10-20 ms faster, on 2 CPU cores. GPUs
  multiply transposed operands in place, so `ConvBatchNorm` uses this on the CPU only.
  """
  return jnp.dot(x, kernel)


def _pointwise_conv_forward(x, kernel):
  return jnp.dot(x, kernel), (x.reshape(-1, x.shape[-1]).T, kernel)


def _pointwise_conv_backward(residuals, output_grad):
  x_channel_major, kernel = residuals
  input_grad = jnp.dot(output_grad, kernel.T)
  kernel_grad = jnp.dot(x_channel_major, output_grad.reshape(-1, output_grad.shape[-1]))
  return input_grad, kernel_grad


pointwise_conv.defvjp(_pointwise_conv_forward, _pointwise_conv_backward)


class PointwiseConv(nn.Module):
  """1x1 conv without bias; its `kernel` (1, 1, Ci, Co) is laid out (and initialised) exactly as nn.Conv's."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
    return pointwise_conv(x.astype(self.dtype), kernel.reshape(kernel.shape[2:]).astype(self.dtype))


def plain_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, groups: int = 1) -> jax.Array:
  """(N, H, W, Ci) x (k, k, Ci / groups, Co) -> (N, Ho, Wo, Co): XLA's conv, `pad` on each side (nn.Conv's
  math); what export traces for the formulations above (edge runtimes have fast conv kernels)."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def single_channel_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Conv from one input channel, (N, H, W, 1) x (k, k, 1, C) -> (N, Ho, Wo, C): forward as k*k shifted
  slices times each tap's C weights; input gradient by `single_channel_input_grad`; kernel gradient by the
  FFI kernel `cpu_kernels.one_channel_kernel_grad` on one CPU device in float32 (paired A/B of the train
  step 0.97; then 0.97-0.98 more, reading each output gradient once for all taps), else XLA's conv gradient.

  XLA:CPU runs a conv with a single input channel (grey pixels) through its generic path at a few GFLOP/s:
  the stem on 128 frames of 112 px took 13 ms on 2 cores, the slices, fused into one loop, 1.8 ms; the
  conv's input gradient 11.9 ms, the form below 4.4 ms. The slices' autodiff kernel gradient would be k*k
  strided reductions that XLA copies out first, hence the conv's gradient or the FFI kernel. Export traces
  `plain_conv` instead (export.export_friendly_ops): edge runtimes have fast conv kernels.
  """
  return shifted_slices_conv(x, kernel, stride, pad)


def _single_channel_conv_forward(x, kernel, stride, pad):
  return shifted_slices_conv(x, kernel, stride, pad), (x, kernel)


def single_channel_input_grad(output_grad: jax.Array, kernel: jax.Array, stride: int, pad: int, height: int,
                              width: int) -> jax.Array:
  """d loss / d x (N, H, W, 1) of `single_channel_conv` from its output gradient (N, Ho, Wo, C).

  One dot over the C channels gives each tap's share of every output position, (N, Ho, Wo, k*k); each
  tap's plane is then placed where that tap reads the input (a pad with stride - 1 zeros between
  positions) and the k*k planes are added, one fused loop over the input. On one CPU device in float32 the
  FFI kernel `cpu_kernels.one_channel_input_grad` places the shares instead: for the stem (128 frames of
  112 px) 0.6 against ~1.9 ms, at the end of the backward where nothing runs beside it (paired A/B of the
  train step 0.971 and 0.982).
  """
  kernel_size, channels = kernel.shape[0], kernel.shape[-1]
  _, out_height, out_width, _ = output_grad.shape
  tap_grads = jnp.einsum("nijc,tc->nijt", output_grad, kernel.reshape(kernel_size * kernel_size, channels))
  if cpu_kernels.applies(tap_grads) and kernel_size <= 7:
    return cpu_kernels.one_channel_input_grad(tap_grads, stride, pad, height, width)
  padded_height, padded_width = height + 2 * pad, width + 2 * pad
  total = None
  for tap in range(kernel_size * kernel_size):
    row, col = divmod(tap, kernel_size)
    placed = jax.lax.pad(
        tap_grads[..., tap:tap + 1], jnp.zeros((), tap_grads.dtype),
        ((0, 0, 0), (row, padded_height - row - (stride * (out_height - 1) + 1), stride - 1),
         (col, padded_width - col - (stride * (out_width - 1) + 1), stride - 1), (0, 0, 0)))
    total = placed if total is None else total + placed
  return total[:, pad:pad + height, pad:pad + width]


def _conv_kernel_grad(ffi_kernel_grad, x, kernel, output_grad, stride, pad):
  """`plain_conv`'s kernel gradient: by `ffi_kernel_grad` (a `cpu_kernels` function) where the kernels apply,
  else by XLA's conv gradient."""
  if cpu_kernels.applies(x, kernel, output_grad):
    return ffi_kernel_grad(x, kernel, output_grad, stride, pad)
  _, kernel_vjp = jax.vjp(lambda kernel: plain_conv(x, kernel, stride, pad), kernel)
  return kernel_vjp(output_grad)[0]


def _single_channel_conv_backward(stride, pad, residuals, output_grad):
  x, kernel = residuals
  input_grad = single_channel_input_grad(output_grad, kernel, stride, pad, x.shape[1], x.shape[2])
  kernel_grad = _conv_kernel_grad(cpu_kernels.one_channel_kernel_grad, x, kernel, output_grad, stride, pad)
  return input_grad.astype(x.dtype), kernel_grad


single_channel_conv.defvjp(_single_channel_conv_forward, _single_channel_conv_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def small_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """`plain_conv` (N, H, W, Ci) x (k, k, Ci, Co) -> (N, Ho, Wo, Co), whose kernel gradient is the FFI kernel
  `cpu_kernels.conv_kernel_grad` on one CPU device in float32 (else XLA's). For the frame trunks' convs over
  8-32 channels: XLA:CPU transposes both operands for their kernel gradients, 3.1 and 1.7 ms against 0.9 and
  0.7 ms for the scorer's two (384 frames), at the end of the backward (paired A/Bs of the step 0.98-0.99)."""
  return plain_conv(x, kernel, stride, pad)


def _small_conv_forward(x, kernel, stride, pad):
  return plain_conv(x, kernel, stride, pad), (x, kernel)


def _small_conv_backward(stride, pad, residuals, output_grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: plain_conv(x, kernel, stride, pad), x)
  kernel_grad = _conv_kernel_grad(cpu_kernels.conv_kernel_grad, x, kernel, output_grad, stride, pad)
  return input_vjp(output_grad)[0], kernel_grad


small_conv.defvjp(_small_conv_forward, _small_conv_backward)


class SmallConv(nn.Module):
  """kxk conv with nn.Conv's parameters (`kernel` (k, k, Ci, C), `bias` (C,)), laid out and initialised the
  same, run as `small_conv`; padding `(k - 1) // 2` on each side."""
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  def check_input(self, x) -> None:
    """Raises ValueError for inputs the conv cannot take."""

  def convolve(self, x, kernel, pad):
    return small_conv(x, kernel, self.stride, pad)

  @nn.compact
  def __call__(self, x):
    self.check_input(x)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    y = self.convolve(x.astype(self.dtype), kernel.astype(self.dtype), (self.kernel_size - 1) // 2)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
    return y


class SingleChannelConv(SmallConv):
  """kxk conv from a single input channel with nn.Conv's parameters (`kernel` (k, k, 1, C), `bias` (C,)),
  laid out and initialised the same, run as `single_channel_conv`; padding `(k - 1) // 2` on each side."""

  def check_input(self, x) -> None:
    if x.shape[-1] != 1:
      raise ValueError(f"SingleChannelConv takes (N, H, W, 1) inputs, got {x.shape}.")

  def convolve(self, x, kernel, pad):
    return single_channel_conv(x, kernel, self.stride, pad)


def on_cpu() -> bool:
  """Whether the CPU formulations apply (`SingleChannelConv`, `SmallConv`, FFI depthwise convs;
  `PointwiseConv` when training)."""
  return jax.default_backend() == "cpu"


class ConvBatchNorm(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional activation; `groups == channels` makes it depthwise."""
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activation: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    pad = (self.kernel - 1) // 2
    if self.groups > 1 and self.groups == self.features == x.shape[-1]:
      x = DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="conv")(x)
    elif train and on_cpu() and self.kernel == 1 and self.stride == 1 and self.groups == 1:
      # Same parameter as the nn.Conv below (evaluation and export keep that one); only gradients differ.
      x = PointwiseConv(self.features, dtype=self.dtype, name="conv")(x)
    elif on_cpu() and self.groups == 1 and x.shape[-1] == 1:  # the stem, on grey frames
      x = SingleChannelConv(self.features, self.kernel, self.stride, use_bias=False, dtype=self.dtype,
                            name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=self.groups, use_bias=False,
                  dtype=self.dtype, name="conv")(x)
    x = batch_norm.BatchNorm(use_running_average=not train, momentum=BATCHNORM_MOMENTUM,
                             epsilon=BATCHNORM_EPSILON, dtype=self.dtype, name="bn")(x)
    if self.activation is not None:
      x = activation_fn(self.activation)(x)
    return x


class SqueezeExcitation(nn.Module):
  """Channel attention: global average -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid -> rescale."""
  squeeze_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = nn.relu(nn.Conv(self.squeeze_channels, (1, 1), dtype=self.dtype, name="fc1")(scale))
    scale = nn.hard_sigmoid(nn.Conv(channels, (1, 1), dtype=self.dtype, name="fc2")(scale))
    return x * scale


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (kxk, stride) -> SE -> project (1x1), residual when shapes allow."""
  spec: BlockSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    spec = self.spec
    inputs = x
    if spec.expanded != x.shape[-1]:
      x = ConvBatchNorm(spec.expanded, 1, activation=spec.activation, dtype=self.dtype,
                        name="expand")(x, train=train)
    x = ConvBatchNorm(spec.expanded, spec.kernel, stride=spec.stride, groups=spec.expanded,
                      activation=spec.activation, dtype=self.dtype, name="depthwise")(x, train=train)
    if spec.use_se:
      x = SqueezeExcitation(make_divisible(spec.expanded // 4), dtype=self.dtype, name="se")(x)
    x = ConvBatchNorm(spec.out, 1, dtype=self.dtype, name="project")(x, train=train)
    if spec.stride == 1 and inputs.shape[-1] == spec.out:
      x = x + inputs
    return x


class MobileNetV3Small(nn.Module):
  """Backbone without classifier: (N, H, W, C) float -> (N, 576) globally pooled features.

  `blocks` defaults to torchvision's table; tests and tiny configs may pass a shorter one.
  """
  blocks: Sequence[BlockSpec] = SMALL_BLOCKS
  last_channels: int = LAST_CHANNELS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = ConvBatchNorm(STEM_CHANNELS, 3, stride=2, activation="hardswish", dtype=self.dtype,
                      name="stem")(images.astype(self.dtype), train=train)
    for index, spec in enumerate(self.blocks):
      x = InvertedResidual(spec, dtype=self.dtype, name=f"block{index}")(x, train=train)
    x = ConvBatchNorm(self.last_channels, 1, activation="hardswish", dtype=self.dtype,
                      name="last")(x, train=train)
    return jnp.mean(x, axis=(1, 2))
