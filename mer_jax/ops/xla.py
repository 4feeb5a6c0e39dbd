"""The XLA ops form: the seam's ops written so that XLA:CPU compiles them into fast fused loops.

XLA's CPU backend runs grouped convs, convs from a single input channel and long reductions through slow generic
paths. The forms here compute the same values from shifted slices, per-row partial sums and integer hashing, which
XLA fuses. They are what CPU training runs where the C++ kernels (`cpu_ffi`) cannot: several CPU devices (XLA
partitions these over a mesh; an FFI call has no partitioning rule), bf16, or no C++ compiler. What each form
gained, measured: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.ops import reference

# XLA:CPU hands dots and reductions to YNNPACK with this option (a comma list of library fusion types); with the
# BatchNorm sums and depthwise gradients below the remaining reductions are plain ones, which YNNPACK runs faster
# than XLA's reduce-window trees. CPU only: other backends do not know the option.
CPU_TRAIN_COMPILER_OPTIONS = (
  ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"),
)

conv = reference.conv
einsum_frame_gather = reference.einsum_frame_gather
scale_and_shift = reference.scale_and_shift


# ----------------------------------------------------------------------------- depthwise convs


def shifted_slices_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """(N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C) as a sum of k*k shifted, strided slices times weights.

  The same math as a grouped conv with one group per channel. XLA's CPU backend runs grouped convs (and their
  gradients above all) through a slow generic path; this form is elementwise work it fuses into a few loops.
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
        x,
        (0, row, col, 0),
        (batch, row + stride * (out_height - 1) + 1, col + stride * (out_width - 1) + 1, channels),
        (1, stride, stride, 1),
      )
      term = window * kernel[row, col, 0]
      out = term if out is None else out + term
  return out


def depthwise_kernel_grad(x: jax.Array, output_grad: jax.Array, kernel_size: int, stride: int, pad: int) -> jax.Array:
  """d loss / d kernel (k, k, 1, C) of `shifted_slices_conv` from its input x (N, H, W, C) and output
  gradient (N, Ho, Wo, C).

  Autodiff of the shifted slices gives k*k reductions of `window * output_grad` over (N, Ho, Wo): XLA's
  CPU backend hands each to a library reduction that cannot read a strided window in place, so every
  window was first copied out (k*k copies of the activation per layer).
  Here each tap's products are taken column by column and summed over the output columns (and rows, for
  small maps) inside the loop that reads the window, the k*k partial sums are stacked next to each
  other, and one reduction finishes them. Stride-2 inputs are split once into their 4 phases so that
  every window is a unit-stride slice.
  """
  batch, out_height, out_width, channels = output_grad.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  phases = {(p, q): x[:, p::stride, q::stride, :] for p in range(stride) for q in range(stride)}
  accumulator = jnp.promote_types(output_grad.dtype, jnp.float32)  # float32 sums for bf16 compute too
  grad_columns = position_columns(output_grad)
  partial_sums = []
  for row in range(kernel_size):
    for col in range(kernel_size):
      source = phases[(row % stride, col % stride)]
      top, left = row // stride, col // stride
      window = jax.lax.slice(source, (0, top, left, 0), (batch, top + out_height, left + out_width, channels))
      # Multiplying slices, not whole arrays: a whole-array product has many readers and is written out.
      products = [
        (window_column * grad_column).astype(accumulator)
        for window_column, grad_column in zip(position_columns(window), grad_columns)
      ]
      partial = sum(products[1:], products[0])
      partial_sums.append(partial if partial.ndim == 3 else partial[:, None])  # (N, Ho or 1, C)
  stacked = jnp.stack(partial_sums, axis=2)  # (N, Ho or 1, k*k, C): the taps of one row side by side
  return jnp.sum(stacked, axis=(0, 1)).reshape(kernel_size, kernel_size, 1, channels)


def depthwise_input_grad(
  output_grad: jax.Array, kernel: jax.Array, stride: int, pad: int, height: int, width: int
) -> jax.Array:
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
  grad = jnp.pad(
    output_grad,
    ((0, 0), (most_taps - 1, max(0, last_row - out_height)), (most_taps - 1, max(0, last_col - out_width)), (0, 0)),
  )
  phase_rows = []
  for row_phase in range(stride):
    phase_cols = []
    for col_phase in range(stride):
      taps = kernel[row_phase::stride, col_phase::stride, 0]  # (Tp, Tq, C)
      out = None
      for t in range(taps.shape[0]):
        for u in range(taps.shape[1]):
          top, left = first_row - t + most_taps - 1, first_col - u + most_taps - 1
          window = jax.lax.slice(
            grad, (0, top, left, 0), (batch, top + last_row - first_row, left + last_col - first_col, channels)
          )
          term = window * taps[t, u]
          out = term if out is None else out + term
      phase_cols.append(out)
    phase_rows.append(jnp.stack(phase_cols, axis=3))  # (N, rows, cols, s, C)
  interleaved = jnp.stack(phase_rows, axis=2).reshape(
    batch, (last_row - first_row) * stride, (last_col - first_col) * stride, channels
  )
  top, left = pad - first_row * stride, pad - first_col * stride
  return interleaved[:, top : top + height, left : left + width]


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


depthwise_conv = shifted_slices_depthwise_conv


# ----------------------------------------------------------------------------- 1x1 convs


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 conv (N, H, W, Ci) x (Ci, Co) -> (N, H, W, Co), with its weight gradient taken channel-major.

  The weight gradient sums x (M, Ci) times the output gradient (M, Co) over all M = N*H*W positions. With both
  position-major, XLA:CPU copies x into (Ci, M) in the backward before its matrix product (a separate pass over
  the activation); here the forward keeps x already transposed as the residual, written alongside x's producer.
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


# ----------------------------------------------------------------------------- convs from one grey channel


def grey_conv_tap_grads(output_grad: jax.Array, kernel: jax.Array) -> jax.Array:
  """Each tap's share of every output position's gradient: (N, Ho, Wo, C) x (k, k, 1, C) -> (N, Ho, Wo, k*k)."""
  kernel_size, channels = kernel.shape[0], kernel.shape[-1]
  return jnp.einsum("nijc,tc->nijt", output_grad, kernel.reshape(kernel_size * kernel_size, channels))


def place_tap_grads(tap_grads: jax.Array, stride: int, pad: int, height: int, width: int) -> jax.Array:
  """Input gradient (N, H, W, 1) of a grey-input conv from its taps' shares (N, Ho, Wo, k*k): each tap's plane is
  placed where that tap reads the input (a pad with stride - 1 zeros between positions) and the k*k planes are
  added, one fused loop over the input. Autodiff of the slices pads k*k copies of the whole output gradient."""
  _, out_height, out_width, taps = tap_grads.shape
  kernel_size = int(round(taps**0.5))
  padded_height, padded_width = height + 2 * pad, width + 2 * pad
  total = None
  for tap in range(taps):
    row, col = divmod(tap, kernel_size)
    placed = jax.lax.pad(
      tap_grads[..., tap : tap + 1],
      jnp.zeros((), tap_grads.dtype),
      (
        (0, 0, 0),
        (row, padded_height - row - (stride * (out_height - 1) + 1), stride - 1),
        (col, padded_width - col - (stride * (out_width - 1) + 1), stride - 1),
        (0, 0, 0),
      ),
    )
    total = placed if total is None else total + placed
  return total[:, pad : pad + height, pad : pad + width]


def conv_kernel_grad(x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int, pad: int) -> jax.Array:
  """`reference.conv`'s kernel gradient (k, k, Ci, Co), by XLA's conv gradient."""
  _, kernel_vjp = jax.vjp(lambda kernel: reference.conv(x, kernel, stride, pad), kernel)
  return kernel_vjp(output_grad)[0]


def make_grey_conv(place_tap_grads: Callable, kernel_grad: Callable):
  """A conv from one input channel, (N, H, W, 1) x (k, k, 1, C) -> (N, Ho, Wo, C), stride, pad: forward as k*k
  shifted slices times each tap's C weights (one fused loop; XLA:CPU's own conv of a single channel is slow);
  input gradient from each tap's share (`grey_conv_tap_grads`) placed by `place_tap_grads(tap_grads, stride, pad,
  height, width)`; kernel gradient by `kernel_grad(x, kernel, output_grad, stride, pad)`. The slices' own autodiff
  kernel gradient would be k*k strided reductions that XLA copies out first."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def grey_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    return shifted_slices_conv(x, kernel, stride, pad)

  def forward(x, kernel, stride, pad):
    return shifted_slices_conv(x, kernel, stride, pad), (x, kernel)

  def backward(stride, pad, residuals, output_grad):
    x, kernel = residuals
    input_grad = place_tap_grads(grey_conv_tap_grads(output_grad, kernel), stride, pad, x.shape[1], x.shape[2])
    return input_grad.astype(x.dtype), kernel_grad(x, kernel, output_grad, stride, pad)

  grey_conv.defvjp(forward, backward)
  return grey_conv


grey_conv = make_grey_conv(place_tap_grads, conv_kernel_grad)


# ----------------------------------------------------------------------------- BatchNorm statistics


# Maps with at most this many positions per image are summed over rows and columns in one loop; larger
# ones over columns only (a longer unrolled sum costs more compile time than it saves).
FULLY_UNROLLED_POSITIONS = 16


def position_columns(x: jax.Array) -> list[jax.Array]:
  """(N, H, W, C) -> the slices whose sum is x summed over W (over H and W when H*W <= 16):
  W slices (N, H, C), or H*W slices (N, C).

  Elementwise work on the slices (products, squares) fuses into the loop that sums them; the same work
  on x before slicing is written out in full first, because XLA sees one producer with many readers.
  """
  _, height, width, _ = x.shape
  if height * width <= FULLY_UNROLLED_POSITIONS:
    return [x[:, row, column] for row in range(height) for column in range(width)]
  return [x[:, :, column] for column in range(width)]


def sum_columns(columns: list[jax.Array]) -> jax.Array:
  """The slices of `position_columns` (or products of them) -> their sum over all positions, (C,)."""
  total = sum(columns[1:], columns[0])
  return jnp.sum(total.reshape(-1, total.shape[-1]), axis=0)


def _moments_backward(x, output_grads):
  sum_grad, square_sum_grad = output_grads
  return (sum_grad + 2.0 * x * square_sum_grad,)


@jax.custom_vjp
def column_channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(N, H, W, C) float32 -> (sum of x, sum of x^2) over N, H, W, each (C,): each image row's positions summed
  inside the loop that reads them, squares taken per column, so XLA never writes x*x out."""
  columns = position_columns(x)
  return sum_columns(columns), sum_columns([column * column for column in columns])


column_channel_moments.defvjp(lambda x: (column_channel_moments(x), x), _moments_backward)


channel_moments = column_channel_moments


# ----------------------------------------------------------------------------- dropout


_GOLDEN = np.uint32(0x9E3779B9)


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(shape) uint32 draws from a PRNG key: hash of (flat index, the key's two words)."""
  words = jax.random.key_data(key).reshape(-1)[:2].astype(jnp.uint32)
  index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape) if shape else jnp.uint32(0)
  return _mix(_mix(index * _GOLDEN ^ words[0]) ^ words[1])


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """(shape) bool, each True with probability 1 - rate (to 2**-32)."""
  threshold = np.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  return hashed_bits(key, shape) >= threshold


# ----------------------------------------------------------------------------- top-k


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """(B, T) scores -> (B, K) int32 indices of the K highest scores, sorted by time (ascending index)."""
  _, indices = jax.lax.top_k(scores, k)
  return jnp.sort(indices, axis=-1).astype(jnp.int32)


straight_through_topk = reference.straight_through(topk_indices)
