"""Conv, BatchNorm and Dropout modules with flax's parameters and semantics, computed through the ops seam.

Each has exactly the variables of its flax counterpart (nn.Conv, nn.BatchNorm, nn.Dropout), so checkpoints,
export and the PyTorch port do not depend on the ops form; `ops` (a `mer_jax.ops.Ops`, chosen once per run) only
decides how the math is computed.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax import ops as ops_lib


class Conv(nn.Module):
  """kxk conv with nn.Conv's parameters (`kernel` (k, k, Ci / groups, Co), optional `bias` (Co,)) and symmetric
  padding (k - 1) // 2 as torchvision pads. (N, H, W, Ci) -> (N, Ho, Wo, Co).

  The op follows the shape: depthwise (groups == Ci == Co), 1x1 (pointwise), from one grey channel, or general.
  """

  features: int
  kernel_size: int
  stride: int = 1
  groups: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels, size, stride = x.shape[-1], self.kernel_size, self.stride
    if in_channels % self.groups:
      raise ValueError(f"Conv with groups={self.groups} got {in_channels} input channels.")
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (size, size, in_channels // self.groups, self.features)
    )
    x, kernel, pad = x.astype(self.dtype), kernel.astype(self.dtype), (size - 1) // 2
    if self.groups > 1:
      if not self.groups == in_channels == self.features:
        raise ValueError("Conv supports groups == 1 or depthwise (groups == input == output channels).")
      y = self.ops.depthwise_conv(x, kernel, stride, pad)
    elif size == 1 and stride == 1:
      y = self.ops.pointwise_conv(x, kernel[0, 0])
    elif in_channels == 1:
      y = self.ops.grey_conv(x, kernel, stride, pad)
    else:
      y = self.ops.conv(x, kernel, stride, pad)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """nn.BatchNorm over the last axis of (N, H, W, C): same variables, same update rule, same outputs.

  `momentum` follows flax (torch's 0.01 is 0.99 here); statistics are float32 whatever `dtype` is.
  """

  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

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
      total, square_total = self.ops.channel_moments(x.astype(jnp.float32))
      mean = total / count
      # E[x^2] - E[x]^2 as in flax's default (use_fast_variance); clipped, rounding can make it negative.
      var = jnp.maximum(0.0, square_total / count - mean * mean)
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * var
    multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
    # One multiply-add per element in the promoted dtype (float32 for bf16 inputs) as flax does, then cast.
    return self.ops.scale_and_shift(
      x.astype(jnp.promote_types(x.dtype, jnp.float32)), multiplier, bias - mean * multiplier
    ).astype(self.dtype)


class Dropout(nn.Module):
  """nn.Dropout (`rate`, `deterministic`, kept values scaled by 1 / (1 - rate), rate 1 drops everything) whose
  keep mask comes from `ops.dropout_keep_mask` and the module's 'dropout' rng."""

  rate: float
  deterministic: Optional[bool] = None
  rng_collection: str = "dropout"
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: Optional[bool] = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = self.ops.dropout_keep_mask(self.make_rng(self.rng_collection), self.rate, inputs.shape)
    return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros((), inputs.dtype))
