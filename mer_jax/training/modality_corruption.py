"""Modality dropout and synthetic corruption: what the train step does to a batch's video and audio so that the
model learns to answer without one of them, and the reliability heads r_v, r_a learn to notice a broken one.

One uniform draw u per example picks at most one event, so every example keeps at least one clean modality:

    [0, d)              video marked missing   (has_video False: the model zeroes it and forces r_v = 0)
    [d, 2d)             audio marked missing
    [2d, 2d + c)        video corrupted        (frames replaced, has_video stays True)
    [2d + c, 2d + 2c)   audio corrupted        (waveform replaced, has_audio stays True)

with d = config.modality_dropout and c = config.modality_corruption. Each event needs both modalities present.
Marking a modality missing teaches the rest of the model to do without it; corrupting it while it still looks
present is the only thing that shows the reliability heads what an unusable modality looks like, so
`reliability_loss` gives them an explicit target: 0 on a corrupted row, 1 on every other row with the modality.
Without it r_v learnt from the task loss alone and barely moved on broken video (demo: 0.99 -> 0.94).

The corruptions are content-free signals a camera or a microphone produces: a constant grey level (black half
the time) or coarse pixel noise for video; silence or white noise at a random level for audio.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mer_jax.data import device_features
from mer_jax.data import features

# Grains of the video noise, one drawn per clip: uniform noise on a grid this many times coarser than the frame,
# bilinearly enlarged. Camera noise, compression and resizing give noise of any grain and sharpness, and a head shown
# one kind learnt to pass the others as clean (demo: r_v 0.96 on its x264-encoded noise after sharp 4-pixel blocks).
NOISE_GRAINS = (1, 2, 3, 4)
# White-noise standard deviation range of a corrupted waveform (full scale is 1).
AUDIO_NOISE_STD_RANGE = (0.02, 0.3)


@dataclasses.dataclass(frozen=True)
class Events:
  """Per example (B,) bool: what the step does to each modality (at most one of the four is True)."""

  drop_video: jax.Array
  drop_audio: jax.Array
  corrupt_video: jax.Array
  corrupt_audio: jax.Array


def draw_events(
  rng: jax.Array, has_video: jax.Array, has_audio: jax.Array, dropout: float, corruption: float
) -> Events:
  """Per-example events from one uniform draw (intervals in the module docstring); has_* (B,) bool."""
  if 2 * dropout + 2 * corruption > 1:
    raise ValueError(
      f"modality_dropout={dropout} and modality_corruption={corruption}: 2 * (dropout + corruption) must be <= 1."
    )
  u = jax.random.uniform(rng, has_video.shape)
  both = has_video.astype(bool) & has_audio.astype(bool)
  between = lambda lo, hi: both & (u >= lo) & (u < hi)
  d, c = dropout, corruption
  return Events(
    drop_video=between(0.0, d),
    drop_audio=between(d, 2 * d),
    corrupt_video=between(2 * d, 2 * d + c),
    corrupt_audio=between(2 * d + c, 2 * d + 2 * c),
  )


def corrupt_frames(frames: jax.Array, corrupted: jax.Array, rng: jax.Array) -> jax.Array:
  """frames (B, T, H, W, C) uint8, corrupted (B,) bool -> frames with the corrupted clips replaced by a constant
  grey level (black with probability 1/2, else uniform in 0..255) or by uniform noise of a grain drawn from
  NOISE_GRAINS, new every frame."""
  batch, num_frames, height, width, channels = frames.shape
  level_key, black_key, noise_key, grain_key, kind_key = jax.random.split(rng, 5)
  level = jax.random.randint(level_key, (batch,), 0, 256)
  level = jnp.where(jax.random.bernoulli(black_key, 0.5, (batch,)), 0, level).astype(jnp.uint8)
  constant = jnp.broadcast_to(level[:, None, None, None, None], frames.shape)
  field = jax.random.randint(noise_key, frames.shape, 0, 256).astype(jnp.float32)
  grains = []
  for grain in NOISE_GRAINS:
    coarse = field[:, :, : -(-height // grain), : -(-width // grain)]
    grains.append(jax.image.resize(coarse, frames.shape, "linear") if grain > 1 else coarse)
  choice = jax.random.randint(grain_key, (batch,), 0, len(NOISE_GRAINS))
  noise = jnp.take_along_axis(jnp.stack(grains, axis=1), choice[:, None, None, None, None, None], axis=1)[:, 0]
  noise = jnp.clip(jnp.round(noise), 0, 255).astype(jnp.uint8)
  use_constant = jax.random.bernoulli(kind_key, 0.5, (batch,))
  replacement = jnp.where(use_constant[:, None, None, None, None], constant, noise)
  return jnp.where(corrupted[:, None, None, None, None], replacement, frames)


def corrupt_waveform(waveform: jax.Array, audio_length: jax.Array, corrupted: jax.Array, rng: jax.Array) -> jax.Array:
  """float waveform (B, N) in [-1, 1], audio_length (B,) int32, corrupted (B,) bool -> waveform with the corrupted
  clips replaced by silence or white noise (std uniform in AUDIO_NOISE_STD_RANGE); zero past audio_length."""
  batch, num_samples = waveform.shape
  noise_key, std_key, sign_key, kind_key = jax.random.split(rng, 4)
  # One noise vector per step, scaled and signed per clip: white noise at a level is what the heads must
  # recognise, not a particular draw, and B * N normals per step cost ~25 ms on the demo's CPU.
  noise = jax.random.normal(noise_key, (num_samples,), jnp.float32)
  std = jax.random.uniform(std_key, (batch,), jnp.float32, *AUDIO_NOISE_STD_RANGE)
  std = std * jnp.where(jax.random.bernoulli(sign_key, 0.5, (batch,)), 1.0, -1.0)
  silent = jax.random.bernoulli(kind_key, 0.5, (batch,))
  replacement = jnp.clip(noise[None, :] * std[:, None], -1.0, 1.0) * (~silent)[:, None]
  valid = jnp.arange(num_samples, dtype=jnp.int32)[None, :] < audio_length[:, None]
  return jnp.where(corrupted[:, None], jnp.where(valid, replacement, 0.0), waveform)


def silent_log_mel(audio: jax.Array, audio_mask: jax.Array, corrupted: jax.Array) -> jax.Array:
  """Host-feature batches (audio (B, F, M) log-mel, audio_mask (B, F)): the corrupted clips' log-mel becomes that of
  silence (log of the offset on valid frames), the one corruption that needs no waveform."""
  silence = jnp.where(audio_mask[..., None], np.float32(np.log(features.LOG_OFFSET)), 0.0)
  return jnp.where(corrupted[:, None, None], silence.astype(audio.dtype), audio)


def corrupt(batch: dict, events: Events, rng: jax.Array) -> dict:
  """Applies events.corrupt_video / corrupt_audio to a raw batch (device_features.is_raw: frames and waveform) or
  to a host-feature batch (frames and log-mel; its audio corruption is silence)."""
  video_key, audio_key = jax.random.split(rng)
  out = dict(batch)
  out["frames"] = corrupt_frames(jnp.asarray(batch["frames"]), events.corrupt_video, video_key)
  if device_features.is_raw(batch):
    waveform = device_features.float_waveform(batch["waveform"])
    length = jnp.asarray(batch["audio_length"], jnp.int32)
    out["waveform"] = corrupt_waveform(waveform, length, events.corrupt_audio, audio_key)
  else:
    out["audio"] = silent_log_mel(jnp.asarray(batch["audio"]), jnp.asarray(batch["audio_mask"]), events.corrupt_audio)
  return out


def mark_missing(batch: dict, events: Events) -> dict:
  """The dropout half: has_video / has_audio False where the events drop them."""
  return {
    **batch,
    "has_video": batch["has_video"].astype(bool) & ~events.drop_video,
    "has_audio": batch["has_audio"].astype(bool) & ~events.drop_audio,
  }


def label_confidence(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """How sure a modality's own head is of the label: logits (B, C) or per frame (B, T, C) (the best frame counts),
  labels (B,) int (-1 = none) -> (B,) float32 p(label) in [0, 1], 1 where there is no label; no gradient."""
  probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  if probabilities.ndim == 3:
    probabilities = jnp.max(probabilities, axis=1)
  safe = jnp.clip(labels, 0, probabilities.shape[-1] - 1)
  confidence = jnp.take_along_axis(probabilities, safe[:, None], axis=-1)[:, 0]
  return jnp.where(labels >= 0, confidence, 1.0)


def reliability_loss(
  reliability: jax.Array,
  present: jax.Array,
  corrupted: jax.Array,
  example_mask: jax.Array,
  clean_confidence: jax.Array | None = None,
):
  """Binary cross-entropy of a reliability head: reliability (B,) in [0, 1], target 0 on corrupted rows and 1 on
  the others, over rows where the modality is present (and example_mask); the weighted mean, 0 when none counts.

  A corrupted row is known to be broken (weight 1). A row the step left alone is only presumed clean: real data
  holds broken clips nobody marked (the demo's train split: 5% with black or noisy video, 5% with silent or noisy
  audio), and at full weight those taught the heads to trust what the corruption taught them to distrust (demo: r_v
  0.61 on black video, 0.96 on noise). So a presumed-clean row weighs `clean_confidence` (B,), the modality's own
  confidence in the label (`label_confidence`): a clip whose video or audio alone knows its label is clean; one
  whose modality knows nothing (black frames, silence) barely counts. None: weight 1.
  """
  rows = present.astype(bool) & example_mask.astype(bool)
  probability = jnp.clip(reliability.astype(jnp.float32), 1e-6, 1.0 - 1e-6)
  logit = jnp.log(probability) - jnp.log1p(-probability)
  per_row = optax.sigmoid_binary_cross_entropy(logit, (~corrupted).astype(jnp.float32))
  clean_weight = 1.0 if clean_confidence is None else clean_confidence.astype(jnp.float32)
  weights = rows.astype(jnp.float32) * jnp.where(corrupted, 1.0, clean_weight)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
