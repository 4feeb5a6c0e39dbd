"""Audio log-mel and train-time augmentation as pure JAX functions, run inside the jitted train / eval step.

The host pipeline then only ships "raw" batches (int16 PCM + its length) and the accelerator does the maths that
took most of the tf.data map's CPU time. Every function is shape-static and jit-able, works on a batch axis
(sharded or not), and computes in float32 whatever the model's compute dtype.

    batch = model_batch(raw, config.data, rng=augment_key, form=ops.feature_form)   # inside the jitted step

`form` ('cpu' or 'accelerator') picks how the spectrum and the audio jitter are computed (same values); the ops
seam chooses it once per run from the mesh's platform (`mer_jax.ops.choose`), never this module.

Values follow the host path: `log_mel` equals `features.waveform_features` (tf.signal) frame by frame, and
`augment` draws from the same distributions as `input_pipeline.augment`.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.data import features
from mer_jax.data.input_pipeline import BRIGHTNESS_DELTA, CONTRAST_RANGE, GAIN_DB_RANGE, NOISE_SNR_DB_RANGE

# The raw batch carries these instead of the contract's "audio" / "audio_mask".
RAW_KEYS = ("waveform", "audio_length")

# Up to this many shifted slices frame the signal (ceil(frame_length / frame_step): 3 for the 400 / 160
# default); more (a small hop) would unroll that many slices into the HLO, so one gather frames it instead.
MAX_SHIFTED_SLICES = 8

# Each step draws a fresh bank of this many waveforms' worth of white noise; every clip reads its noise from
# the bank at its own random offset with a random sign (as the host reads its fixed `noise_bank`).
NOISE_BANK_WAVEFORMS = 2


# ----------------------------------------------------------------------------- constants per config


def _params(data_config: Any) -> tuple:
  """Hashable feature parameters of a data config (defaults as `features`): the cache key of the constants."""
  p = features._mel_params(data_config)  # one place decides the config keys and defaults
  return tuple(sorted(p.items()))


@functools.lru_cache(maxsize=16)
def mel_matrix(
  num_mel_bins: int, num_spectrogram_bins: int, sample_rate: float, lower_hz: float, upper_hz: float
) -> np.ndarray:
  """(num_spectrogram_bins, num_mel_bins) float32 triangular filters: a numpy port of
  tf.signal.linear_to_mel_weight_matrix (HTK mel scale, peaks 1, the DC bin zero), computed in float64.

  numpy, not TF eager: on an accelerator host a GPU build of TF would take the device's memory from JAX.
  """
  if upper_hz > sample_rate / 2:
    raise ValueError(
      f"upper_hz={upper_hz} is above the Nyquist frequency of sample_rate={sample_rate}; "
      f"pass upper_hz <= {sample_rate / 2}."
    )
  hz_to_mel = lambda hz: 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)
  bin_mel = hz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins)[1:])[:, None]
  edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)
  lower, center, upper = edges[:-2][None], edges[1:-1][None], edges[2:][None]
  rising = (bin_mel - lower) / (center - lower)
  falling = (upper - bin_mel) / (upper - center)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  return np.pad(weights, [[1, 0], [0, 0]]).astype(np.float32)


@functools.lru_cache(maxsize=16)
def hann_window(frame_length: int) -> np.ndarray:
  """(frame_length,) float32 periodic Hann window, tf.signal.stft's default."""
  n = np.arange(frame_length, dtype=np.float64)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / frame_length)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def dft_matrix(frame_length: int, fft_length: int) -> np.ndarray:
  """(min(frame_length, fft_length), 2 * (fft_length // 2 + 1)) float32: [cos | -sin] of the real DFT, so that
  frames (.., L) @ it = [Re | Im] of rfft(frames, n=fft_length) (zero padding past L adds nothing; a shorter
  fft_length crops the frame, as rfft does). Angles from (n * k) mod fft_length in float64: exact to float32."""
  n = np.arange(min(frame_length, fft_length))[:, None]
  k = np.arange(fft_length // 2 + 1)[None, :]
  angle = 2.0 * np.pi * ((n * k) % fft_length) / fft_length
  return np.concatenate([np.cos(angle), -np.sin(angle)], axis=1).astype(np.float32)


FORMS = ("cpu", "accelerator")  # chosen once per run by the ops seam (mer_jax.ops.Ops.feature_form)


def spectrum_form(form: str) -> str:
  """'fft' (jnp.fft.rfft) for the CPU form, 'dft' (one float32 matmul) for the accelerator form.

  XLA's SPMD partitioner replicates an FFT whose batch axes are sharded (openxla/xla#24, jax-ml/jax#15680; seen
  here as an all-gather of the frames): on a data-parallel mesh every device would gather and transform the
  global batch. A DFT matmul partitions over the batch like any dot and runs on the matrix units (~5 GFLOP per
  32 clips of 4 s: well under a millisecond on a GPU or TPU); on the CPU, where the demo runs on one device, the
  FFT is far cheaper (log_mel 24 ms against 130 ms per 32 clips of 4 s). Both match tf.signal to 1e-4.
  """
  if form not in FORMS:
    raise ValueError(f"form={form!r}; use one of {FORMS}.")
  return "fft" if form == "cpu" else "dft"


# ----------------------------------------------------------------------------- log-mel


def num_valid_frames(audio_length: jax.Array, frame_length: int, frame_step: int, max_frames: int) -> jax.Array:
  """(B,) int32 samples -> (B,) int32 frames that lie entirely inside the clip (0 when shorter than a window)."""
  length = audio_length.astype(jnp.int32)
  # Floor division of a negative numerator would count a frame for a clip shorter than frame_length: clamp first.
  full = jnp.where(length >= frame_length, 1 + (length - frame_length) // frame_step, 0)
  return jnp.clip(full, 0, max_frames)


def windowed_frames(
  waveform: jax.Array, frame_length: int, frame_step: int, num_frames: int, width: int | None = None
) -> jax.Array:
  """(B, N) -> (B, num_frames, width) float32: frame i is waveform[:, i * step : i * step + frame_length] times
  the periodic Hann window, zero-padded to `width` (default frame_length; the FFT length, so that the FFT needs
  no second pad pass).

  The signal is cut into hop-sized chunks (a reshape); frame i is chunks i .. i + k - 1 (k = ceil(frame_length /
  step) shifted slices, 3 by default) stacked on a new axis and reshaped, and the zero-padded window crops it.
  No gather: XLA fuses slices, stack and window into one pass on every backend (TPUs gather slowly); on XLA:CPU
  it costs 5.5 ms per 32 clips of 4 s, a gather 4 ms, a concatenate 7 ms. A small hop (k > MAX_SHIFTED_SLICES)
  would unroll k slices into the HLO, so it takes one gather of contiguous windows instead.
  Samples past N read as zeros (only frames that run past the clip, which the mask drops, see them).
  """
  batch, num_samples = waveform.shape
  width = frame_length if width is None else max(width, frame_length)
  window = np.pad(hann_window(frame_length), (0, width - frame_length))  # zeros past the frame crop it
  k = -(-frame_length // frame_step)
  if k > MAX_SHIFTED_SLICES:
    needed = (num_frames - 1) * frame_step + width
    waveform = jnp.pad(waveform, [(0, 0), (0, max(0, needed - num_samples))])
    starts = jnp.asarray(np.arange(num_frames) * frame_step, jnp.int32)
    take = lambda start: jax.lax.dynamic_slice_in_dim(waveform, start, width, axis=1)  # (B, width)
    return jax.vmap(take, out_axes=1)(starts) * window
  num_pieces = max(k, -(-width // frame_step))  # pieces past the k-th are zeros (FFT padding)
  num_chunks = num_frames + k - 1
  needed = num_chunks * frame_step
  if needed > num_samples:
    waveform = jnp.pad(waveform, [(0, 0), (0, needed - num_samples)])
  chunks = waveform[:, :needed].reshape(batch, num_chunks, frame_step)
  pieces = [chunks[:, j : j + num_frames] for j in range(k)]
  pieces += [jnp.zeros_like(pieces[0])] * (num_pieces - k)
  frames = jnp.stack(pieces, axis=2).reshape(batch, num_frames, num_pieces * frame_step)
  return frames[..., :width] * window


def log_mel(waveform: jax.Array, audio_length: jax.Array, data_config: Any, form: str = "cpu") -> tuple:
  """float waveform (B, N_max), zero after each clip's audio_length (B,) int32 -> (log_mel (B, F_max, M) float32,
  mask (B, F_max) bool), as `features.waveform_features(waveform[b, :audio_length[b]])` row by row.

  Frames that run past a clip's end are zeros with mask False; a clip shorter than one window (or empty) is all
  zeros and all False. A waveform longer than N_max is cropped (as the host crops), a shorter one zero-padded.
  """
  p = dict(_params(data_config))
  max_frames, num_mel_bins = features.feature_shape(data_config)
  max_samples = features.max_audio_samples(p["max_seconds"], p["sample_rate"])
  frame_length, frame_step, fft_length = p["frame_length"], p["frame_step"], p["fft_length"]
  mel = mel_matrix(num_mel_bins, fft_length // 2 + 1, float(p["sample_rate"]), p["lower_hz"], p["upper_hz"])
  waveform = jnp.asarray(waveform, jnp.float32)
  batch, num_samples = waveform.shape
  waveform = waveform[:, :max_samples]
  if waveform.shape[1] < max_samples:
    waveform = jnp.pad(waveform, [(0, 0), (0, max_samples - waveform.shape[1])])
  if max_frames == 0:  # max_audio_seconds shorter than one window: nothing to compute
    return jnp.zeros((batch, 0, num_mel_bins), jnp.float32), jnp.zeros((batch, 0), bool)

  # Both matmuls at HIGHEST: a GPU's default float32 matmul runs in TF32 (10-bit mantissa), a TPU's in bfloat16.
  if spectrum_form(form) == "fft":
    frames = windowed_frames(waveform, frame_length, frame_step, max_frames, width=fft_length)
    magnitude = jnp.abs(jnp.fft.rfft(frames, n=fft_length, axis=-1))  # (B, F, fft_length // 2 + 1)
  else:
    frames = windowed_frames(waveform, frame_length, frame_step, max_frames)[..., : min(frame_length, fft_length)]
    dft = dft_matrix(frame_length, fft_length)
    parts = jnp.einsum("bfn,nk->bfk", frames, dft, precision=jax.lax.Precision.HIGHEST)
    real, imag = jnp.split(parts, 2, axis=-1)
    magnitude = jnp.sqrt(real * real + imag * imag)
  mel_energy = jnp.einsum("bfk,km->bfm", magnitude, mel, precision=jax.lax.Precision.HIGHEST)
  values = jnp.log(mel_energy + np.float32(features.LOG_OFFSET))
  length = jnp.minimum(jnp.asarray(audio_length, jnp.int32), num_samples)  # no frames from padding added here
  valid = num_valid_frames(length, frame_length, frame_step, max_frames)
  mask = jnp.arange(max_frames, dtype=jnp.int32)[None, :] < valid[:, None]
  return jnp.where(mask[..., None], values, 0.0), mask


# ----------------------------------------------------------------------------- augmentation


def _noise_bank(key: jax.Array, batch: int, num_samples: int) -> tuple:
  """Unit-variance white noise for `batch` clips of `num_samples`: (bank (S,) float32, offsets (B,) int32, signs (B,)
  float32); clip b's noise is signs[b] * bank[offsets[b] : offsets[b] + num_samples] (as the host reads its fixed
  `noise_bank` at a random offset with a random sign).

  One fresh bank of NOISE_BANK_WAVEFORMS * N normals per step instead of B * N normals: on the XLA:CPU demo threefry
  normals for every sample cost ~25 ms per 32 clips of 4 s, the bank and its windows ~2 ms. Clips of one batch
  share the bank at different offsets, as the host's clips share its bank.
  """
  bank_key, offset_key, sign_key = jax.random.split(key, 3)
  bank_size = max(NOISE_BANK_WAVEFORMS * num_samples, num_samples + 1)
  bank = jax.random.normal(bank_key, (bank_size,), jnp.float32)
  offsets = jax.random.randint(offset_key, (batch,), 0, bank_size - num_samples + 1)
  signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (batch,)), 1.0, -1.0).astype(jnp.float32)
  return bank, offsets, signs


def _jitter_audio(waveform, length, gain, noise_scale, bank, offsets, form: str) -> jax.Array:
  """Per clip: waveform (B, N) * gain (B,) + noise_scale (B,) * bank window at offsets (B,), clipped to [-1, 1], zero
  past length (B,). Same values on every backend; only the loop form differs."""
  num_samples = waveform.shape[1]

  def one_clip(row, n, g, scale, start):
    noisy = row * g + jax.lax.dynamic_slice(bank, (start,), (num_samples,)) * scale
    return jnp.where(jnp.arange(num_samples, dtype=jnp.int32) < n, jnp.clip(noisy, -1.0, 1.0), 0.0)

  if form == "cpu":
    # XLA:CPU fuses elementwise producers into their consumers and recomputes them per use: batched, the
    # bits -> normal conversion ran once per sample read (+7 ms) and the whole jitter again inside the log-mel's
    # framing, which reads each sample 3.2 times (+18 ms). A loop over the clips writes each clip's audio once.
    return jax.lax.map(lambda args: one_clip(*args), (waveform, length, gain, noise_scale, offsets))
  # Accelerators: batched (one gather), which partitions over a batch-sharded mesh; a loop over clips would not.
  return jax.vmap(one_clip)(waveform, length, gain, noise_scale, offsets)


def augment(
  frames: jax.Array,
  waveform: jax.Array,
  audio_length: jax.Array,
  has_video: jax.Array,
  rng: jax.Array,
  form: str = "cpu",
) -> tuple:
  """Per-clip jitter, the distributions of `input_pipeline.augment`: frames (B, T, S, S, 1) uint8, waveform
  (B, N) float32 zero after audio_length (B,) int32, has_video (B,) bool, rng a PRNG key -> (frames, waveform).

  Frames: one contrast factor (around the clip's mean grey) and brightness shift per clip, rounded and clipped
  to uint8; clips without video are left as they are (zeros). Audio: a gain, then white noise at a random SNR
  against the RMS of the clip's valid samples; clipped to [-1, 1]; samples past audio_length stay exactly zero.
  """
  batch, num_samples = waveform.shape
  keys = jax.random.split(rng, 5)
  uniform = lambda i, lo, hi: jax.random.uniform(keys[i], (batch,), jnp.float32, lo, hi)
  per_clip = lambda x, ndim: x.reshape((batch,) + (1,) * (ndim - 1))

  grey = frames.astype(jnp.float32)
  mean = jnp.mean(grey, axis=tuple(range(1, grey.ndim)))
  contrast = uniform(0, *CONTRAST_RANGE)
  # (grey - mean) * contrast + mean + brightness, folded into one multiply and one add per pixel.
  offset = mean * (1.0 - contrast) + uniform(1, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
  jittered = jnp.clip(jnp.round(grey * per_clip(contrast, grey.ndim) + per_clip(offset, grey.ndim)), 0.0, 255.0)
  frames = jnp.where(per_clip(jnp.asarray(has_video, bool), grey.ndim), jittered.astype(jnp.uint8), frames)

  waveform = jnp.asarray(waveform, jnp.float32)
  length = jnp.clip(jnp.asarray(audio_length, jnp.int32), 0, num_samples)
  valid = jnp.arange(num_samples, dtype=jnp.int32)[None, :] < length[:, None]
  gain = jnp.power(10.0, uniform(2, *GAIN_DB_RANGE) / 20.0)
  # RMS of the gained clip over its valid samples (the gain is per clip, so it comes out of the sum).
  mean_square = jnp.sum(jnp.square(jnp.where(valid, waveform, 0.0)), axis=1) / jnp.maximum(length, 1)  # empty: 0
  rms = jnp.sqrt(gain * gain * mean_square)  # no epsilon: silence stays silent (input_pipeline.augment says why)
  noise_std = rms * jnp.power(10.0, -uniform(3, *NOISE_SNR_DB_RANGE) / 20.0)
  bank, offsets, signs = _noise_bank(keys[4], batch, num_samples)
  return frames, _jitter_audio(waveform, length, gain, noise_std * signs, bank, offsets, form)


# ----------------------------------------------------------------------------- raw batch -> contract batch


def is_raw(batch: dict) -> bool:
  """True when `batch` carries raw audio ("waveform", "audio_length") for `model_batch`."""
  return "waveform" in batch


def float_waveform(waveform: jax.Array) -> jax.Array:
  """int16 PCM (or float already in [-1, 1]) (B, N) -> float32 in [-1, 1], as `features.pcm16_to_float`."""
  waveform = jnp.asarray(waveform)
  if jnp.issubdtype(waveform.dtype, jnp.integer):
    waveform = waveform.astype(jnp.float32) / 32768.0
  return waveform.astype(jnp.float32)


def model_batch(raw: dict, data_config: Any, rng: jax.Array | None = None, form: str = "cpu") -> dict:
  """Raw batch -> the batch contract (docs/ARCHITECTURE.md), inside jit.

  `raw` is the contract except "waveform" (B, N_max) int16 PCM (or float already in [-1, 1]) and "audio_length"
  (B,) int32 replace "audio" / "audio_mask". With `rng` the clips are augmented first (`augment`; the caller
  passes one only for training with config.data.augment). Every other key passes through unchanged.
  """
  waveform = float_waveform(raw["waveform"])
  audio_length = jnp.asarray(raw["audio_length"], jnp.int32)
  out = {k: v for k, v in raw.items() if k not in RAW_KEYS}
  if rng is not None:
    out["frames"], waveform = augment(raw["frames"], waveform, audio_length, raw["has_video"], rng, form)
  out["audio"], out["audio_mask"] = log_mel(waveform, audio_length, data_config, form)
  return out
