"""The reference ops form: plain lax / flax math for every op of the seam.

This is the spec the other forms are tested against, the form export traces (edge runtimes have fast kernels for
exactly these: one grouped conv per depthwise layer, one Conv node per conv, no custom calls), and the form GPUs
and TPUs run where nothing else was measured faster there (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, groups: int = 1) -> jax.Array:
  """(N, H, W, Ci) x (k, k, Ci / groups, Co) -> (N, Ho, Wo, Co): XLA's conv, `pad` zeros on each side (nn.Conv's
  math with symmetric padding, as torchvision pads)."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    ((pad, pad), (pad, pad)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C) as one grouped conv."""
  return conv(x, kernel, stride, pad, groups=x.shape[-1])


def grey_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Conv from one grey channel, (N, H, W, 1) x (k, k, 1, Co) -> (N, Ho, Wo, Co)."""
  return conv(x, kernel, stride, pad)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """1x1 conv (N, H, W, Ci) x (Ci, Co) -> (N, H, W, Co)."""
  return conv(x, kernel[None, None], 1, 0)


def channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., C) float32 -> (sum of x, sum of x^2) over all positions, each (C,): nn.BatchNorm's statistics."""
  axes = tuple(range(x.ndim - 1))
  return jnp.sum(x, axis=axes), jnp.sum(x * x, axis=axes)


def scale_and_shift(x: jax.Array, multiplier: jax.Array, shift: jax.Array) -> jax.Array:
  """(..., C) * (C,) + (C,): BatchNorm's normalisation as one multiply-add per element."""
  return x * multiplier + shift


def dropout_keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """(shape) bool, each True with probability 1 - rate: nn.Dropout's draw (threefry bits)."""
  return jax.random.bernoulli(key, 1.0 - rate, shape)


def einsum_frame_gather(selection: jax.Array, frames: jax.Array) -> jax.Array:
  """P @ frames: (B, K, T) selection, (B, T, H, W, C) frames -> (B, K, H, W, C) in the selection's dtype.

  With an exactly one-hot P each output is a copy of one frame; frames not chosen are multiplied by 0 and cannot
  change the result. Gradients reach P through the frames' pixels (the straight-through path).
  """
  return jnp.einsum("bkt,bthwc->bkhwc", selection, frames.astype(selection.dtype))


def sort_free_topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """(B, T) scores -> (B, K) int32 indices of the K highest scores in time order, without sort or top_k.

  Frame t is chosen when fewer than K frames beat it (a higher score, or an equal score at a lower index: lax.top_k's
  tie rule; unlike top_k it counts -0.0 and +0.0 as equal); chosen frames are numbered in time order by a cumulative
  sum. TF's StableHLO reader knows neither the composite jax lowers top_k to (SavedModel) nor HLO sort (TFLite); T
  is ~12, so the T x T comparison costs nothing.
  """
  num_frames = scores.shape[-1]
  positions = jnp.arange(num_frames)
  beats = (scores[:, None, :] > scores[:, :, None]) | (
    (scores[:, None, :] == scores[:, :, None]) & (positions[None, None, :] < positions[None, :, None])
  )
  chosen = jnp.sum(beats, axis=-1) < k  # (B, T)
  slot = jnp.cumsum(chosen.astype(jnp.int32), axis=-1) - 1
  one_hot = chosen[:, None, :] & (slot[:, None, :] == jnp.arange(k)[None, :, None])  # (B, K, T)
  return jnp.sum(one_hot * positions, axis=-1).astype(jnp.int32)


def soft_selection_surrogate(scores: jax.Array, k: int, temperature: float) -> jax.Array:
  """The differentiable stand-in for the hard selection: every slot gets softmax(scores / tau); (B, K, T)."""
  soft = jax.nn.softmax(scores / temperature, axis=-1)
  return jnp.broadcast_to(soft[:, None, :], (scores.shape[0], k, scores.shape[1]))


def straight_through(indices_fn: Callable[[jax.Array, int], jax.Array]):
  """A straight-through top-K from a hard choice `indices_fn(scores, k) -> (B, K)`: (B, T) scores, k, tau ->
  (B, K, T) exact K-hot selection forward; the gradient of `soft_selection_surrogate` backward."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
  def select(scores: jax.Array, k: int, temperature: float) -> jax.Array:
    del temperature  # only the backward pass uses it
    return jax.nn.one_hot(indices_fn(scores, k), scores.shape[-1], dtype=scores.dtype)

  def forward(scores, k, temperature):
    return select(scores, k, temperature), scores

  def backward(k, temperature, scores, cotangent):
    _, surrogate_vjp = jax.vjp(lambda s: soft_selection_surrogate(s, k, temperature), scores)
    return surrogate_vjp(cotangent)

  select.defvjp(forward, backward)
  return select


straight_through_topk = straight_through(sort_free_topk_indices)
