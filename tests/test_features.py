"""Log-mel features (mer_jax/data/features.py): values, shapes, masks, batched and graph mode."""

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mer_jax.data import features

SR = 16000


def _config(max_seconds=1.0, mel_bins=64):
  return ml_collections.ConfigDict(dict(sample_rate=SR, max_audio_seconds=max_seconds, num_mel_bins=mel_bins))


def _tone(freq_hz, seconds=0.5, amplitude=0.5):
  t = np.arange(int(seconds * SR)) / SR
  return (amplitude * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32)


def _mel(f):
  return 1127.0 * np.log1p(np.asarray(f) / 700.0)  # the mel scale tf.signal uses


@pytest.mark.parametrize("freq_hz", [300.0, 1000.0, 3000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq_hz):
  log_mel = features.log_mel_spectrogram(_tone(freq_hz), sample_rate=SR).numpy()
  edges = np.linspace(_mel(features.LOWER_HZ), _mel(features.UPPER_HZ), 64 + 2)
  expected_bin = int(np.argmin(np.abs(edges[1:-1] - _mel(freq_hz))))
  peak_bins = np.argmax(log_mel, axis=-1)
  assert log_mel.shape == (1 + (len(_tone(freq_hz)) - 400) // 160, 64)
  assert np.all(peak_bins == expected_bin), (freq_hz, expected_bin, np.unique(peak_bins))
  # Energy is concentrated: the peak bin is far above the median bin (log scale).
  assert np.all(log_mel.max(-1) - np.median(log_mel, -1) > 5.0)


def test_silence_is_log_offset():
  log_mel = features.log_mel_spectrogram(np.zeros(1600, np.float32)).numpy()
  np.testing.assert_allclose(log_mel, np.log(features.LOG_OFFSET), rtol=1e-5)


def test_num_audio_frames():
  assert features.num_audio_frames(4.0, SR, 400, 160) == 398
  assert features.num_audio_frames(0.01, SR, 400, 160) == 0
  assert features.feature_shape(_config(1.0)) == (1 + (SR - 400) // 160, 64)


def test_pcm16_to_float_range():
  pcm = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
  out = features.pcm16_to_float(pcm).numpy()
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[:4], [-1.0, -0.5, 0.0, 0.5])
  assert out[-1] < 1.0 and out[-1] > 0.9999


@pytest.mark.parametrize(
  "num_samples, num_valid",
  [
    (0, 0),  # empty: no audio
    (300, 0),  # shorter than one 25 ms window
    (1000, 4),  # short: 1 + (1000 - 400) // 160
    (SR, 98),  # exactly max_seconds
    (3 * SR, 98),  # long: cropped to max_seconds
  ],
)
def test_audio_features_shapes_and_mask(num_samples, num_valid):
  config = _config(1.0)
  rng = np.random.default_rng(0)
  pcm = rng.integers(-8000, 8000, size=num_samples).astype(np.int16)
  log_mel, mask = features.audio_features(pcm, config)
  assert log_mel.shape == (98, 64) and log_mel.dtype == tf.float32
  assert mask.shape == (98,) and mask.dtype == tf.bool
  mask = mask.numpy()
  assert mask.sum() == num_valid and np.all(mask[:num_valid])
  log_mel = log_mel.numpy()
  assert np.all(log_mel[num_valid:] == 0.0)  # zero padding
  assert np.all(np.isfinite(log_mel))
  if num_valid:
    assert np.all(np.abs(log_mel[:num_valid]).sum(-1) > 0)


def test_long_audio_is_cropped_not_resampled():
  config = _config(0.5)
  pcm = np.random.default_rng(1).integers(-8000, 8000, size=2 * SR).astype(np.int16)
  long_features, _ = features.audio_features(pcm, config)
  head_features, _ = features.audio_features(pcm[: SR // 2], config)
  np.testing.assert_array_equal(long_features.numpy(), head_features.numpy())


def test_batched_equals_per_example():
  rng = np.random.default_rng(2)
  pcm = rng.integers(-12000, 12000, size=(3, 5000)).astype(np.int16)
  config = _config(0.5)
  batch_mel, batch_mask = features.audio_features(pcm, config)
  assert batch_mel.shape == (3, 48, 64) and batch_mask.shape == (3, 48)
  for row in range(3):
    mel, mask = features.audio_features(pcm[row], config)
    np.testing.assert_allclose(batch_mel[row].numpy(), mel.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch_mask[row].numpy(), mask.numpy())
  spec = features.log_mel_spectrogram(features.pcm16_to_float(pcm)).numpy()
  np.testing.assert_allclose(
    spec[1], features.log_mel_spectrogram(features.pcm16_to_float(pcm[1])).numpy(), rtol=1e-5, atol=1e-5
  )


def test_graph_mode_matches_eager_for_unknown_length():
  config = _config(0.5)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int16)])
  def graph_features(pcm):
    return features.audio_features(pcm, config)

  for n in (0, 2500, 20000):
    pcm = np.random.default_rng(n).integers(-9000, 9000, size=n).astype(np.int16)
    g_mel, g_mask = graph_features(pcm)
    e_mel, e_mask = features.audio_features(pcm, config)
    assert g_mel.shape == (48, 64)
    np.testing.assert_allclose(g_mel.numpy(), e_mel.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g_mask.numpy(), e_mask.numpy())


def test_upper_hz_above_nyquist_is_a_clear_error():
  with pytest.raises(ValueError, match="Nyquist"):
    features.log_mel_spectrogram(np.zeros(800, np.float32), sample_rate=8000)
