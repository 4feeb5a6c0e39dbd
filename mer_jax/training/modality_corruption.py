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
`reliability_loss` gives them an explicit target: 0 on a corrupted row; on the rows left alone, 1 weighted by the
modality's own confidence in the label, or that confidence itself (see `reliability_loss`). Without it r_v learnt
from the task loss alone and barely moved on broken video (demo: 0.99 -> 0.94).

The corruptions are content-free signals a camera or a microphone produces: a constant grey level (black half
the time), smooth noise of a random grain or sharp block noise of a random size for video; silence or white noise
at a random level for audio.
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
# Block sizes (pixels, a float range) of the sharp block noise. Smooth grains alone left the demo's blocky,
# x264-encoded noise trusted (r_v 0.98-1.00 on three seeds, against 0.13-0.18 on black video).
BLOCK_NOISE_SIZES = (1.0, 4.5)
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


def _block_noise(field: jax.Array, grain: jax.Array, phase: jax.Array) -> jax.Array:
  """field (B, T, H, W) float noise, grain and phase (B, 2) float (rows, columns) -> blocks of a non-integer size
  (pixel i takes field[floor((i + phase) / grain)]): sharp-edged noise as a camera's block artefacts or a
  nearest-neighbour upscale of a small noisy picture give it, of any block size."""
  height, width = field.shape[-2:]
  rows = jnp.floor((jnp.arange(height)[None, :] + phase[:, :1]) / grain[:, :1]).astype(jnp.int32)
  cols = jnp.floor((jnp.arange(width)[None, :] + phase[:, 1:]) / grain[:, 1:]).astype(jnp.int32)
  rows, cols = jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)
  picked = jnp.take_along_axis(field, rows[:, None, :, None], axis=2)
  return jnp.take_along_axis(picked, cols[:, None, None, :], axis=3)


def corrupt_frames(frames: jax.Array, corrupted: jax.Array, rng: jax.Array) -> jax.Array:
  """frames (B, T, H, W, C) uint8, corrupted (B,) bool -> frames with the corrupted clips replaced, new every frame,
  by one of: a constant grey level (black with probability 1/2, else uniform in 0..255), with probability 1/2;
  smooth noise (uniform noise of a grain from NOISE_GRAINS, bilinearly enlarged), 1/4; sharp block noise of a
  size uniform in BLOCK_NOISE_SIZES, half of it softened across block edges by a 2-pixel mean (as resampling a
  blocky picture does), 1/4."""
  batch, num_frames, height, width, channels = frames.shape
  keys = jax.random.split(rng, 9)
  level = jax.random.randint(keys[0], (batch,), 0, 256)
  level = jnp.where(jax.random.bernoulli(keys[1], 0.5, (batch,)), 0, level).astype(jnp.uint8)
  constant = jnp.broadcast_to(level[:, None, None, None, None], frames.shape)
  field = jax.random.randint(keys[2], frames.shape, 0, 256).astype(jnp.float32)
  grains = []
  for grain in NOISE_GRAINS:
    coarse = field[:, :, : -(-height // grain), : -(-width // grain)]
    grains.append(jax.image.resize(coarse, frames.shape, "linear") if grain > 1 else coarse)
  choice = jax.random.randint(keys[3], (batch,), 0, len(NOISE_GRAINS))
  smooth = jnp.take_along_axis(jnp.stack(grains, axis=1), choice[:, None, None, None, None, None], axis=1)[:, 0]
  block_size = jax.random.uniform(keys[4], (batch, 1), jnp.float32, *BLOCK_NOISE_SIZES)
  aspect = jax.random.uniform(keys[5], (batch, 2), jnp.float32, 0.8, 1.25)
  grain = block_size * aspect / jnp.sqrt(aspect[:, :1] * aspect[:, 1:])
  phase = jax.random.uniform(keys[6], (batch, 2), jnp.float32) * grain
  blocks = _block_noise(field[..., 0], grain, phase)[..., None]
  softened = (blocks + jnp.roll(blocks, 1, axis=3)) / 2
  softened = (softened + jnp.roll(softened, 1, axis=2)) / 2
  soften = jax.random.bernoulli(keys[7], 0.5, (batch,))
  blocks = jnp.where(soften[:, None, None, None, None], softened, blocks)
  kind = jax.random.randint(keys[8], (batch,), 0, 4)  # 0, 1: constant; 2: smooth noise; 3: block noise
  noise = jnp.where((kind == 2)[:, None, None, None, None], smooth, blocks)
  noise = jnp.clip(jnp.round(noise), 0, 255).astype(jnp.uint8)
  replacement = jnp.where((kind < 2)[:, None, None, None, None], constant, noise)
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
  """How sure a modality's own head is of the label: logits (B, C), or (B, K, C) per chosen frame (their mean
  probability counts), labels (B,) int (-1 = none) -> (B,) float32 p(label) in [0, 1], 1 where there is no label;
  no gradient."""
  probabilities = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  if probabilities.ndim == 3:
    probabilities = jnp.mean(probabilities, axis=1)
  safe = jnp.clip(labels, 0, probabilities.shape[-1] - 1)
  confidence = jnp.take_along_axis(probabilities, safe[:, None], axis=-1)[:, 0]
  return jnp.where(labels >= 0, confidence, 1.0)


def reliability_loss(
  reliability: jax.Array,
  present: jax.Array,
  corrupted: jax.Array,
  example_mask: jax.Array,
  clean_confidence: jax.Array | None = None,
  *,
  confidence_target: bool = False,
):
  """Binary cross-entropy of a reliability head: reliability (B,) in [0, 1], target 0 on corrupted rows, over rows
  where the modality is present (and example_mask); the weighted mean, 0 when none counts.

  A corrupted row is known to be broken (target 0, weight 1). A row the step left alone is only presumed clean:
  real data holds broken clips nobody marked (the demo's train split: 5% with black or noisy video, 5% with
  silent or noisy audio), and at full weight those taught the heads to trust what the corruption taught them to
  distrust (demo: r_v 0.61 on black video, 0.96 on noise). `clean_confidence` (B,) is the modality's own
  confidence in the label (`label_confidence`): a clip whose video or audio alone knows its label is clean; one
  whose modality knows nothing (black frames, silence) is not. Such a row gets
  - target 1 weighted by the confidence (default): a broken clip barely counts; but where broken clips look
    unlike the step's corruption (the demo's x264-encoded noise), the head still learns, slowly, to trust them;
  - target = the confidence, weight 1 (`confidence_target`): the head learns how much the modality knows, so
    an unmarked broken clip teaches distrust. Right where a clean modality is always informative.
  None: target 1, weight 1.
  """
  rows = present.astype(bool) & example_mask.astype(bool)
  probability = jnp.clip(reliability.astype(jnp.float32), 1e-6, 1.0 - 1e-6)
  logit = jnp.log(probability) - jnp.log1p(-probability)
  confidence = jnp.ones_like(probability) if clean_confidence is None else clean_confidence.astype(jnp.float32)
  if confidence_target:
    target, clean_weight = confidence, jnp.ones_like(confidence)
  else:
    target, clean_weight = jnp.ones_like(confidence), confidence
  per_row = optax.sigmoid_binary_cross_entropy(logit, jnp.where(corrupted, 0.0, target))
  weights = rows.astype(jnp.float32) * jnp.where(corrupted, 1.0, clean_weight)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
