"""BatchNorm over (N, H, W, C) with nn.BatchNorm's variables and math, and statistics XLA:CPU computes fast.

flax's nn.BatchNorm takes the batch mean and mean square with `jnp.mean` over N*H*W positions. XLA:CPU
rewrites every reduction of more than 32 elements into a tree of `reduce-window`s that cannot fuse the
work producing their input, so x*x was written out in full and both sums read it back (~20% of the
backbone's train step). Here each image row's positions are summed inside the loop that reads them
(`position_columns`), squares taken per column, and only the small (N, H, C) partial sums are reduced.

Variables are exactly nn.BatchNorm's (params `scale`, `bias`; batch_stats `mean`, `var`, the biased batch
variance), so checkpoints, export and the torch port are unaffected.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax.ops.cpu import kernels as cpu_kernels

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
  """(N, H, W, C) float32 -> (sum of x, sum of x^2) over N, H, W, each (C,), in XLA ops."""
  columns = position_columns(x)
  return sum_columns(columns), sum_columns([column * column for column in columns])


column_channel_moments.defvjp(lambda x: (column_channel_moments(x), x), _moments_backward)


@jax.custom_vjp
def kernel_channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`column_channel_moments` as one read of x by the FFI kernel `cpu_kernels.channel_sums`."""
  return cpu_kernels.channel_sums(x, x)


kernel_channel_moments.defvjp(lambda x: (kernel_channel_moments(x), x), _moments_backward)


def channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(N, H, W, C) float32 -> (sum of x, sum of x^2) over N, H, W, each (C,): the FFI kernel on one CPU
  device, else the per-column XLA-op form (both give the same values, test_batch_norm)."""
  if cpu_kernels.applies(x):
    return kernel_channel_moments(x)
  return column_channel_moments(x)


@jax.custom_vjp
def kernel_scale_and_shift(x: jax.Array, multiplier: jax.Array, shift: jax.Array) -> jax.Array:
  """x * multiplier + shift per channel, its parameter gradients (sum g*x, sum g) from one FFI pass."""
  return x * multiplier + shift


def _scale_and_shift_backward(x_and_multiplier, output_grad):
  x, multiplier = x_and_multiplier
  shift_grad, multiplier_grad = cpu_kernels.channel_sums(output_grad, x)
  return output_grad * multiplier, multiplier_grad, shift_grad


kernel_scale_and_shift.defvjp(lambda x, m, s: (kernel_scale_and_shift(x, m, s), (x, m)), _scale_and_shift_backward)


def scale_and_shift(x: jax.Array, multiplier: jax.Array, shift: jax.Array) -> jax.Array:
  """(..., C) * (C,) + (C,): one multiply-add per element (XLA:CPU fuses this better than flax's
  (x - mean) * multiplier + bias); on one CPU device in float32 with the kernel's gradient sums."""
  if cpu_kernels.applies(x, multiplier, shift):
    return kernel_scale_and_shift(x, multiplier, shift)
  return x * multiplier + shift


class BatchNorm(nn.Module):
  """nn.BatchNorm over the last axis of (N, H, W, C): same variables, same update rule, same outputs.

  `momentum` follows flax (torch's 0.01 is 0.99 here); statistics are float32 whatever `dtype` is.
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      count = x.size // channels
      total, square_total = channel_moments(x.astype(jnp.float32))
      mean = total / count
      # E[x^2] - E[x]^2 as in flax's default (use_fast_variance); clipped, rounding can make it negative.
      var = jnp.maximum(0.0, square_total / count - mean * mean)
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * var
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
    # In the promoted dtype (float32 for bf16 inputs) as flax does, then cast.
    return scale_and_shift(x.astype(jnp.promote_types(x.dtype, jnp.float32)), multiplier,
                           bias - mean * multiplier).astype(self.dtype)
