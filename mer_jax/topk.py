"""Text-guided hard Top-K frame selection with a straight-through gradient.

The scorer looks at all T frames cheaply (a 4x-downscaled frame through three small strided convs) and asks
the text where to look: the text vector becomes a query that is matched against every spatial cell of every
frame, and a frame's score is its best-matching cell. This lets a transcript that names a visual cue ("look at
the triangle") find the frames that show it. The scorer costs a small fraction of one backbone frame.

Selection builds a one-hot matrix P (B, K, T) whose forward value is an exact hard choice of the K best frames
(in time order) and whose backward pass is the gradient of a soft surrogate, softmax(scores / tau) per slot.
Frames are gathered as P @ frames in pixel space, so only K frames reach the backbone and compute scales with K.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def hard_topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """(B, T) scores -> (B, K) int32 indices of the K highest scores, sorted by time (ascending index)."""
  _, indices = jax.lax.top_k(scores, k)
  return jnp.sort(indices, axis=-1).astype(jnp.int32)


def soft_selection_surrogate(scores: jax.Array, k: int, temperature: float) -> jax.Array:
  """The differentiable stand-in for the hard selection: every slot gets softmax(scores / tau); (B, K, T)."""
  soft = jax.nn.softmax(scores / temperature, axis=-1)
  return jnp.broadcast_to(soft[:, None, :], (scores.shape[0], k, scores.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def straight_through_topk(scores: jax.Array, k: int, temperature: float) -> jax.Array:
  """(B, T) scores -> (B, K, T) exact K-hot selection; gradient of `soft_selection_surrogate` backward."""
  indices = hard_topk_indices(scores, k)
  return jax.nn.one_hot(indices, scores.shape[-1], dtype=scores.dtype)


def _straight_through_forward(scores, k, temperature):
  return straight_through_topk(scores, k, temperature), scores


def _straight_through_backward(k, temperature, scores, cotangent):
  _, surrogate_vjp = jax.vjp(lambda s: soft_selection_surrogate(s, k, temperature), scores)
  return surrogate_vjp(cotangent)


straight_through_topk.defvjp(_straight_through_forward, _straight_through_backward)


def gather_frames(selection: jax.Array, frames: jax.Array) -> jax.Array:
  """P @ frames: (B, K, T) selection, (B, T, H, W, C) frames -> (B, K, H, W, C) in the selection's dtype.

  With an exactly one-hot P each output is a copy of one frame; frames not chosen are multiplied by 0 and
  cannot change the result. Gradients reach P through the frames' pixels (the straight-through path).
  """
  return jnp.einsum("bkt,bthwc->bkhwc", selection, frames.astype(selection.dtype))


class TextQueryPool(nn.Module):
  """Text token states (B, L, D) + mask (B, L) bool -> the scorer's text vector (B, D).

  Attention pooling with a learnt query over the tokens: the words that say what to look at (a named cue,
  an object) can carry the vector whatever the rest of the utterance is, where a mean over all tokens
  dilutes them with every other word.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, states, mask):
    logits = nn.Dense(1, dtype=self.dtype, name="token_logits")(states)[..., 0].astype(jnp.float32)
    logits = jnp.where(mask, logits, -1e9)
    weights = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    return jnp.einsum("bl,bld->bd", weights.astype(states.dtype), states)


class FrameScorer(nn.Module):
  """Scores T frames against a text vector: (B, T, H, W, 1) uint8, (B, Dt) -> (B, T) scores.

  Frames are average-pooled by `downscale` before three 3x3 stride-2 convs, so for 112x112 inputs the scorer
  costs ~1 MFLOP per frame against ~30 MFLOPs for the backbone.
  """
  channels: tuple[int, ...] = (8, 16, 32)
  query_dim: int = 32
  downscale: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames, text_vector):
    batch, num_frames, height, width, channels = frames.shape
    x = (frames.reshape(batch * num_frames, height, width, channels).astype(self.dtype) - 127.5) / 64.0
    if self.downscale > 1:
      x = nn.avg_pool(x, (self.downscale, self.downscale), strides=(self.downscale, self.downscale))
    for index, features in enumerate(self.channels):
      x = nn.Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  name=f"conv{index}")(x)
      x = nn.hard_swish(x)
    keys = nn.Dense(self.query_dim, dtype=self.dtype, name="keys")(x)  # (B*T, h, w, Q)
    keys = keys.reshape(batch, num_frames, -1, self.query_dim)
    query = nn.Dense(self.query_dim, dtype=self.dtype, name="query")(text_vector.astype(self.dtype))
    cell_scores = jnp.einsum("btnq,bq->btn", keys, query) / jnp.sqrt(self.query_dim).astype(self.dtype)
    # Soft maximum over cells: a cue anywhere in the frame counts, and every cell still gets a gradient.
    return jax.nn.logsumexp(cell_scores.astype(jnp.float32), axis=-1)


class TopKFrameSelector(nn.Module):
  """Scores, selects K of T frames and gathers them.

  Returns (selected (B, K, H, W, 1) float, scores (B, T) float32, indices (B, K) int32). Frames of a sample
  without video get equal scores; its selection is then the first K frames, all zeros anyway.
  """
  k: int
  temperature: float = 1.0
  scorer_channels: tuple[int, ...] = (8, 16, 32)
  scorer_query_dim: int = 32
  scorer_downscale: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames, text_vector, has_video):
    num_frames = frames.shape[1]
    if not 1 <= self.k <= num_frames:
      raise ValueError(f"top_k={self.k} must be between 1 and the number of frames ({num_frames}).")
    scores = FrameScorer(self.scorer_channels, self.scorer_query_dim, self.scorer_downscale,
                         dtype=self.dtype, name="scorer")(frames, text_vector)
    scores = jnp.where(has_video[:, None], scores, 0.0)
    selection = straight_through_topk(scores, self.k, self.temperature)
    indices = jnp.argmax(selection, axis=-1).astype(jnp.int32)
    return gather_frames(selection.astype(self.dtype), frames), scores, indices
