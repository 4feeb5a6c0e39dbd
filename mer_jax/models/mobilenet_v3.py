"""MobileNetV3-Small backbone (Howard et al. 2019) in flax.linen, following torchvision's block table.

The stem takes one grey channel, so the backbone without its classifier has exactly 926,720 parameters
(BatchNorm scale and bias counted, running statistics apart). Padding is symmetric `(k - 1) // 2` as in
torchvision (flax's 'SAME' pads stride-2 convs asymmetrically), so a port of torchvision weights gives the
same numbers. BatchNorm: torch momentum 0.01 is flax momentum 0.99; eps 1e-3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mer_jax import ops as ops_lib
from mer_jax.models import layers


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


class ConvBatchNorm(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional activation; `groups == features` makes it depthwise."""

  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  activation: str | None = None
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = layers.Conv(
      self.features, self.kernel, self.stride, self.groups, use_bias=False, dtype=self.dtype, ops=self.ops, name="conv"
    )(x)
    x = layers.BatchNorm(
      use_running_average=not train,
      momentum=BATCHNORM_MOMENTUM,
      epsilon=BATCHNORM_EPSILON,
      dtype=self.dtype,
      ops=self.ops,
      name="bn",
    )(x)
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
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x, *, train: bool):
    spec = self.spec
    inputs = x
    if spec.expanded != x.shape[-1]:
      x = ConvBatchNorm(spec.expanded, 1, activation=spec.activation, dtype=self.dtype, ops=self.ops, name="expand")(
        x, train=train
      )
    x = ConvBatchNorm(
      spec.expanded,
      spec.kernel,
      stride=spec.stride,
      groups=spec.expanded,
      activation=spec.activation,
      dtype=self.dtype,
      ops=self.ops,
      name="depthwise",
    )(x, train=train)
    if spec.use_se:
      x = SqueezeExcitation(make_divisible(spec.expanded // 4), dtype=self.dtype, name="se")(x)
    x = ConvBatchNorm(spec.out, 1, dtype=self.dtype, ops=self.ops, name="project")(x, train=train)
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
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = ConvBatchNorm(STEM_CHANNELS, 3, stride=2, activation="hardswish", dtype=self.dtype, ops=self.ops, name="stem")(
      images.astype(self.dtype), train=train
    )
    for index, spec in enumerate(self.blocks):
      x = InvertedResidual(spec, dtype=self.dtype, ops=self.ops, name=f"block{index}")(x, train=train)
    x = ConvBatchNorm(self.last_channels, 1, activation="hardswish", dtype=self.dtype, ops=self.ops, name="last")(
      x, train=train
    )
    return jnp.mean(x, axis=(1, 2))
