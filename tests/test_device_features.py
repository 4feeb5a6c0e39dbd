"""On-device log-mel and augmentation (mer_jax/data/device_features.py) against the host path (tf.signal, tf.data)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import demo, tiny
from mer_jax.data import device_features as df
from mer_jax.data import features
from mer_jax.data import input_pipeline as ip

# A non-default layout: 40 mel bins, 25 ms hop (k = 10 slices: the gather form), 400-point FFT, other band edges.
OTHER = ml_collections.ConfigDict(
  dict(
    sample_rate=16000,
    max_audio_seconds=0.5,
    num_mel_bins=40,
    mel_frame_step=40,
    fft_length=400,
    mel_lower_hz=125.0,
    mel_upper_hz=3800.0,
  )
)
# 256-sample frames every 100 (k = 3 slices, the FFT length equals the frame): the shifted-slice form, cropped.
SHORT_FRAMES = ml_collections.ConfigDict(
  dict(
    sample_rate=8000,
    max_audio_seconds=0.3,
    num_mel_bins=24,
    mel_frame_length=256,
    mel_frame_step=100,
    fft_length=256,
    mel_upper_hz=3800.0,
  )
)


def _waveforms(lengths, num_samples, seed=0):
  """(B, num_samples) float32 speech-like test signals (a tone in noise, varied levels), zero past each length."""
  rng = np.random.default_rng(seed)
  t = np.arange(num_samples) / 16000.0
  rows = []
  for i, length in enumerate(lengths):
    level = 10.0 ** rng.uniform(-2.5, -0.5)
    row = level * (np.sin(2 * np.pi * (150 + 400 * i) * t) + rng.standard_normal(num_samples))
    row[length:] = 0.0
    rows.append(np.clip(row, -1, 1))
  return np.asarray(rows, np.float32), np.asarray(lengths, np.int32)


@pytest.mark.parametrize(
  "mel_bins, spectrogram_bins, sample_rate, lower, upper",
  [(64, 257, 16000, 80.0, 7600.0), (40, 201, 16000, 125.0, 3800.0), (24, 129, 8000, 0.0, 4000.0)],
)
def test_mel_window_and_dft_constants_match(mel_bins, spectrogram_bins, sample_rate, lower, upper):
  ours = df.mel_matrix(mel_bins, spectrogram_bins, float(sample_rate), lower, upper)
  theirs = tf.signal.linear_to_mel_weight_matrix(mel_bins, spectrogram_bins, sample_rate, lower, upper).numpy()
  assert ours.dtype == np.float32 and ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=2e-5)  # tf computes in float32, the port in float64
  np.testing.assert_allclose(df.hann_window(400), tf.signal.hann_window(400, periodic=True).numpy(), atol=1e-6)
  frames = np.random.default_rng(0).standard_normal((3, 400)).astype(np.float32)
  parts = frames.astype(np.float64) @ df.dft_matrix(400, 512)
  np.testing.assert_allclose(parts[:, :257] + 1j * parts[:, 257:], np.fft.rfft(frames, n=512), atol=1e-4)


@pytest.mark.parametrize("form", ["cpu", "accelerator"])
@pytest.mark.parametrize("name", ["demo", "other", "short_frames"])
def test_log_mel_equals_tf_signal_row_by_row(name, form):
  """Both spectrum forms (the CPU's FFT, the accelerators' DFT matmul) against tf.signal, row by row."""
  data = {"demo": demo.get_config().data, "other": OTHER, "short_frames": SHORT_FRAMES}[name]
  p = features._mel_params(data)
  num_samples = features.max_audio_samples(p["max_seconds"], p["sample_rate"])
  frame = p["frame_length"]
  lengths = [num_samples, num_samples // 2 + 37, frame - 1, 0, frame, frame + p["frame_step"] + 1]
  waveform, audio_length = _waveforms(lengths, num_samples)
  log_mel, mask = jax.jit(lambda w, n: df.log_mel(w, n, data, form))(waveform, audio_length)
  assert log_mel.shape == (len(lengths), *features.feature_shape(data)) and log_mel.dtype == jnp.float32
  assert mask.shape == log_mel.shape[:2] and mask.dtype == jnp.bool_
  for row, length in enumerate(lengths):
    want, want_mask = features.waveform_features(waveform[row, :length], data)
    np.testing.assert_array_equal(np.asarray(mask[row]), want_mask.numpy(), err_msg=f"row {row}")
    np.testing.assert_allclose(np.asarray(log_mel[row]), want.numpy(), atol=1e-4, rtol=0, err_msg=f"row {row}")
  assert not np.asarray(mask[2:4]).any() and not np.asarray(log_mel[2:4]).any()  # shorter than a window, empty
  assert np.asarray(mask[0]).all()


def _clips(batch=6, num_samples=8000, frames_shape=(4, 16, 16, 1), seed=1):
  """A batch for augment: tones at several levels, every other clip without video (zero frames)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([num_samples, num_samples // 2, 3000, 0, 7000, 1234][:batch], np.int32)
  t = np.arange(num_samples)
  amplitude = np.array([0.5, 0.1, 0.02, 0.3, 0.2, 0.05][:batch])[:, None]
  waveform = np.where(t[None] < lengths[:, None], amplitude * np.sin(t[None] / (5.0 + np.arange(batch)[:, None])), 0)
  has_video = np.arange(batch) % 2 == 0
  frames = rng.integers(30, 220, (batch, *frames_shape)).astype(np.uint8) * has_video[:, None, None, None, None]
  return frames.astype(np.uint8), waveform.astype(np.float32), lengths, has_video


def test_augment_deterministic_padding_and_video():
  frames, waveform, lengths, has_video = _clips()
  run = jax.jit(df.augment)
  out_frames, out_wave = run(frames, waveform, lengths, has_video, jax.random.key(0))
  again_frames, again_wave = run(frames, waveform, lengths, has_video, jax.random.key(0))
  other_frames, other_wave = run(frames, waveform, lengths, has_video, jax.random.key(1))
  np.testing.assert_array_equal(out_wave, again_wave)
  np.testing.assert_array_equal(out_frames, again_frames)
  assert not np.array_equal(out_wave, other_wave) and not np.array_equal(out_frames, other_frames)

  out_frames, out_wave = np.asarray(out_frames), np.asarray(out_wave)
  assert out_frames.dtype == np.uint8 and out_wave.dtype == np.float32
  assert np.abs(out_wave).max() <= 1.0
  padding = np.arange(waveform.shape[1])[None] >= lengths[:, None]
  assert not out_wave[padding].any()  # exactly zero past audio_length
  assert not out_wave[3].any()  # the empty clip
  for clip in range(len(frames)):
    if has_video[clip]:
      shift = out_frames[clip].astype(float) - frames[clip]
      assert np.abs(shift).max() > 0 and np.abs(shift).mean() < 40  # mild, as the host's
    else:
      assert not out_frames[clip].any()


def test_augment_gain_and_snr_in_range():
  """Per clip: the gain and the SNR (against the RMS of the valid samples only) fall in the host's ranges."""
  frames, waveform, lengths, has_video = _clips(num_samples=16000)
  snrs = []
  run = jax.jit(df.augment)
  for seed in range(4):
    _, out = run(frames, waveform, lengths, has_video, jax.random.key(seed))
    out = np.asarray(out)
    for clip, length in enumerate(lengths):
      if length == 0:
        continue
      clean, noisy = waveform[clip, :length], out[clip, :length]
      gain = float(noisy @ clean / (clean @ clean))  # least squares: the noise is uncorrelated with the tone
      residual = noisy - gain * clean
      snrs.append(10 * np.log10(np.mean((gain * clean) ** 2) / np.mean(residual**2)))
      assert 10 ** (ip.GAIN_DB_RANGE[0] / 20) - 0.01 < gain < 10 ** (ip.GAIN_DB_RANGE[1] / 20) + 0.01
  assert all(ip.NOISE_SNR_DB_RANGE[0] - 1 < snr < ip.NOISE_SNR_DB_RANGE[1] + 1 for snr in snrs), snrs
  # Spread over the range, not one value: uniform on 25-45 dB has a standard deviation of ~5.8 dB.
  assert np.std(snrs) > 3.0 and len(snrs) == 20


def test_cpu_and_accelerator_forms_agree():
  """The CPU's loop over clips and the accelerators' batched form give the same audio; the noise is white."""
  frames, waveform, lengths, has_video = _clips()
  key = jax.random.key(3)
  on_cpu = jax.jit(df.augment)(frames, waveform, lengths, has_video, key)
  bank, offsets, signs = df._noise_bank(key, 8, 4000)
  noise = np.stack([np.asarray(bank)[o : o + 4000] * s for o, s in zip(np.asarray(offsets), np.asarray(signs))])
  assert abs(noise.std() - 1.0) < 0.05 and abs(noise.mean()) < 0.05
  assert abs(np.mean(noise[:, 1:] * noise[:, :-1])) < 0.05  # white
  batched = jax.jit(lambda *args: df.augment(*args, form="accelerator"))(frames, waveform, lengths, has_video, key)
  np.testing.assert_array_equal(on_cpu[0], batched[0])
  np.testing.assert_allclose(on_cpu[1], batched[1], atol=1e-6, rtol=0)


def _tiny_example(num_samples, has_video=True):
  data = tiny.get_config().data
  rng = np.random.default_rng(num_samples)
  shape = (data.num_frames, data.frame_size, data.frame_size, 1)
  return {
    "id": f"train/dia0_utt{num_samples}",
    "frames": (rng.integers(0, 256, shape) * has_video).astype(np.uint8),
    "audio": rng.integers(-8000, 8000, num_samples).astype(np.int16),
    "has_video": has_video,
    "has_audio": num_samples > 0,
    "labels": {task: np.int32(1) for task in data.tasks},
  }


def test_model_batch_matches_host_contract():
  """model_batch on a raw batch gives the host pipeline's keys, shapes, dtypes and (without rng) its log-mel."""
  config = tiny.get_config()
  data = config.data
  max_samples = features.max_audio_samples(data.max_audio_seconds, data.sample_rate)
  examples = [
    _tiny_example(n, video) for n, video in [(max_samples + 500, True), (5000, False), (300, True), (0, True)]
  ]
  text_length = int(data.max_text_length)
  table = ip.TokenTable(
    [ex["id"] for ex in examples], np.ones((4, text_length), np.int32), np.ones((4, text_length), bool)
  )
  example_fn = ip.make_example_fn(config, table, train=False)
  host = [
    {k: v.numpy() for k, v in example_fn(tf.constant(i, tf.int64), tf.nest.map_structure(tf.constant, ex)).items()}
    for i, ex in enumerate(examples)
  ]
  want = {k: np.stack([h[k] for h in host]) for k in host[0] if k != "id"}

  lengths = np.array([min(len(ex["audio"]), max_samples) for ex in examples], np.int32)
  pcm = np.zeros((4, max_samples), np.int16)
  for row, ex in enumerate(examples):
    pcm[row, : lengths[row]] = ex["audio"][: lengths[row]]
  raw = {k: v for k, v in want.items() if k not in ("audio", "audio_mask")}
  raw.update(waveform=pcm, audio_length=lengths)
  assert df.is_raw(raw) and not df.is_raw(want)

  plain = jax.jit(lambda r: df.model_batch(r, data))(raw)
  augmented = jax.jit(lambda r, key: df.model_batch(r, data, key))(raw, jax.random.key(0))
  for out in (plain, augmented):
    assert sorted(out) == sorted(want)
    for k in want:
      assert out[k].shape == want[k].shape and out[k].dtype == want[k].dtype, k
  np.testing.assert_array_equal(plain["audio_mask"], want["audio_mask"])
  np.testing.assert_allclose(plain["audio"], want["audio"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(plain["frames"], want["frames"])
  np.testing.assert_array_equal(augmented["audio_mask"], want["audio_mask"])
  assert not np.array_equal(augmented["frames"], want["frames"])
  assert not np.asarray(augmented["frames"][1]).any()  # no video: zeros
  assert not np.allclose(augmented["audio"][0], want["audio"][0], atol=1e-3)
  for k in ("text_ids", "has_video", "labels/emotion", "example_mask"):
    np.testing.assert_array_equal(augmented[k], want[k])
