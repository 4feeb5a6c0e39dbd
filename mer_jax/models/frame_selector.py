"""Text-guided hard Top-K frame selection with a straight-through gradient.

The scorer looks at all T frames cheaply (a 4x-downscaled frame through three small strided convs) and asks
the text where to look: the transcript's words (a bag of words, `WordQuery`) become a query that is matched
against every spatial cell of every frame, and a frame's score is its best-matching cell. This lets a
transcript that names a visual cue ("look at the triangle") find the frames that show it.
The scorer costs a small fraction of one backbone frame.

Selection builds a one-hot matrix P (B, K, T) whose forward value is an exact hard choice of the K best frames
(in time order) and whose backward pass is the gradient of a soft surrogate, softmax(scores / tau) per slot.
Frames are gathered as P @ frames in pixel space, so only K frames reach the backbone and compute scales with K.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax import ops as ops_lib
from mer_jax.models import layers


class WordQuery(nn.Module):
  """Token ids (B, L) int32 + mask (B, L) bool -> the scorer's text vector (B, Q): a sum of word vectors.

  The scorer needs to know which visual thing the transcript names; a word's identity says that directly,
  while a contextual encoder first has to learn to carry it through. The table is trained with plain SGD
  (steps.make_optimizer), whose updates grow with how often a word occurs: words that recur with one visual
  meaning (an object's name) take over the query, while the rare words of single transcripts stay near zero
  and cannot memorise their clips. Adam's per-weight scaling would move a word seen once as far as a word
  seen every step (measured on the demo corpus: dev precision@K 0.45 with Adam, 1.0 with SGD).
  """

  vocab_size: int
  features: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids, mask):
    vectors = nn.Embed(
      self.vocab_size, self.features, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype, name="embedding"
    )(token_ids)
    return jnp.sum(vectors * mask[..., None].astype(vectors.dtype), axis=1)


class FrameEvidence(nn.Module):
  """What each of the T frames says on its own: (B, T, H, W, 1) uint8 -> (B, T, C) logits of the primary task.

  A trunk as small as the scorer's, over every frame. Training (losses.frame_selection_loss) asks every frame
  for the clip's label; frames whose own evidence agrees with the label become the scorer's targets. It
  stays separate from the scorer's trunk: sharing it slowed the scorer's learning 2x on the demo corpus.
  """

  num_classes: int
  channels: tuple[int, ...] = (8, 16, 32)
  downscale: int = 2
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, frames):
    batch, num_frames = frames.shape[:2]
    x = _scorer_trunk(frames, self.channels, self.downscale, self.dtype, self.ops)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(jnp.mean(x, axis=(1, 2)))
    return logits.reshape(batch, num_frames, self.num_classes).astype(jnp.float32)


def downscaled_pixels(frames: jax.Array, downscale: int, dtype: Any) -> jax.Array:
  """(B, T, H, W, D) uint8 -> (B*T, H // downscale, W // downscale, D) centred pixels, average-pooled.

  The same values as `nn.avg_pool` over `(frames - 127.5) / 64` with a VALID window (a remainder row or
  column is dropped), written as downscale**2 strided slices of the uint8 frames added up: elementwise
  work that XLA fuses into one pass reading the uint8 frames. `nn.avg_pool` became a library reduction
  on CPU that first needs the whole float image written out (docs/PERFORMANCE.md).
  """
  batch, num_frames, height, width, depth = frames.shape
  x = frames.reshape(batch * num_frames, height, width, depth)
  if downscale == 1:
    return (x.astype(dtype) - 127.5) / 64.0
  rows, cols = height // downscale * downscale, width // downscale * downscale
  total = sum(
    x[:, i:rows:downscale, j:cols:downscale].astype(dtype) for i in range(downscale) for j in range(downscale)
  )
  return (total / downscale**2 - 127.5) / 64.0


def _scorer_trunk(frames, channels, downscale, dtype, ops):
  """(B, T, H, W, 1) uint8 -> (B*T, h, w, channels[-1]): centred, average-pooled pixels; 3x3 stride-2 convs."""
  x = downscaled_pixels(frames, downscale, dtype)
  for index, features in enumerate(channels):
    x = nn.hard_swish(layers.Conv(features, 3, 2, dtype=dtype, ops=ops, name=f"conv{index}")(x))
  return x


class FrameScorer(nn.Module):
  """Scores T frames against a text vector: (B, T, H, W, 1) uint8, (B, Dt) -> (B, T) scores.

  Frames are average-pooled by `downscale` before three 3x3 stride-2 convs, so for 112x112 inputs the scorer
  costs ~1 MFLOP per frame against ~30 MFLOPs for the backbone.
  """

  channels: tuple[int, ...] = (8, 16, 32)
  query_dim: int = 32
  downscale: int = 2
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, frames, text_vector):
    batch, num_frames = frames.shape[:2]
    x = _scorer_trunk(frames, self.channels, self.downscale, self.dtype, self.ops)
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
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, frames, text_vector, has_video):
    num_frames = frames.shape[1]
    if not 1 <= self.k <= num_frames:
      raise ValueError(f"top_k={self.k} must be between 1 and the number of frames ({num_frames}).")
    scores = FrameScorer(
      self.scorer_channels, self.scorer_query_dim, self.scorer_downscale, dtype=self.dtype, ops=self.ops, name="scorer"
    )(frames, text_vector)
    scores = jnp.where(has_video[:, None], scores, 0.0)
    selection = self.ops.straight_through_topk(scores, self.k, self.temperature)
    indices = jnp.argmax(selection, axis=-1).astype(jnp.int32)
    return self.ops.frame_gather(selection.astype(self.dtype), frames), scores, indices
