"""Light audio encoder: a 1D-conv stack over log-mel frames with the audio mask honoured.

Each conv block is conv(k) -> LayerNorm -> GELU with stride 2, so four blocks see ~0.3 s of context per output
step at 10 ms hops. Padded frames are zeroed before every conv and excluded from every pooling, so an
utterance gives the same encoding whatever padding follows it (up to the conv's edge effects at the end of the
valid part, which are the same in both cases).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def downsample_mask(mask: jax.Array, stride: int) -> jax.Array:
  """(B, F) bool -> (B, ceil(F / stride)) bool: an output step is valid if its first input frame is."""
  return mask[:, ::stride]


def masked_mean(values: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Mean of `values` over `axis` where `mask` (broadcastable, bool) is True; 0 where nothing is valid."""
  weights = mask.astype(values.dtype)
  total = jnp.sum(values * weights, axis=axis)
  count = jnp.sum(weights, axis=axis)
  return total / jnp.maximum(count, 1.0)


def segment_pool(values: jax.Array, mask: jax.Array, num_segments: int):
  """Split the valid part of each sequence into `num_segments` equal time spans and average each.

  values (B, N, D), mask (B, N) bool -> tokens (B, S, D), token_mask (B, S) bool. Segments follow each example's
  own valid length, so a short utterance still gives S tokens that each cover part of it.
  """
  length = jnp.sum(mask, axis=1, keepdims=True, dtype=jnp.int32)  # (B, 1)
  positions = jnp.arange(values.shape[1], dtype=jnp.int32)[None, :]  # (1, N)
  # Integer floor division: exact in every runtime. In float32, XLA computes p * S / n as p * S * (1 / n),
  # which lands below whole numbers at segment boundaries where ONNX Runtime and TFLite do not, and the
  # exported model then put boundary frames in another segment than JAX.
  segment_of_step = (positions * num_segments) // jnp.maximum(length, 1)
  membership = (segment_of_step[:, :, None] == jnp.arange(num_segments)[None, None, :]) & mask[:, :, None]
  membership = membership.astype(values.dtype)  # (B, N, S)
  counts = jnp.sum(membership, axis=1)  # (B, S)
  tokens = jnp.einsum("bns,bnd->bsd", membership, values) / jnp.maximum(counts, 1.0)[..., None]
  return tokens, counts > 0


class AudioEncoder(nn.Module):
  """(B, F, M) log-mel + (B, F) mask -> vector (B, D), segment tokens (B, S, D), token mask (B, S)."""

  features: int = 128
  channels: tuple[int, ...] = (64, 96, 128, 128)
  kernel: int = 5
  num_segments: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, log_mel, mask):
    # Per-utterance normalisation of each mel bin makes the encoder see the contour, not the recording level.
    # Each bin is shifted by its first frame before the mean is taken (same function, other rounding): a
    # constant bin (silent or all-zero audio) is then exactly 0 in every runtime. Centred on a rounded mean,
    # it kept +-1 ulp(13.8) residues that the bias-only conv outputs' LayerNorm (channel std ~0.01) amplified
    # 100x, and exports differed from JAX by up to 3.5e-3 on such clips.
    mask_f = mask[..., None].astype(jnp.float32)
    shifted = (log_mel - log_mel[:, :1, :]) * mask_f
    mean = masked_mean(shifted, mask[..., None], axis=1)[:, None, :]
    centred = (shifted - mean) * mask_f
    variance = masked_mean(jnp.square(centred), mask[..., None], axis=1)[:, None, :]
    x = (centred / jnp.sqrt(variance + 1e-3)).astype(self.dtype)
    for index, channels in enumerate(self.channels):
      x = x * mask[..., None].astype(x.dtype)
      x = nn.Conv(
        channels,
        (self.kernel,),
        strides=(2,),
        padding=((self.kernel // 2, self.kernel // 2),),
        dtype=self.dtype,
        name=f"conv{index}",
      )(x)
      x = nn.gelu(nn.LayerNorm(dtype=self.dtype, name=f"norm{index}")(x))
      mask = downsample_mask(mask, 2)
    x = nn.Dense(self.features, dtype=self.dtype, name="project")(x)
    vector = masked_mean(x, mask[..., None], axis=1)
    tokens, token_mask = segment_pool(x, mask, self.num_segments)
    return vector, tokens, token_mask
