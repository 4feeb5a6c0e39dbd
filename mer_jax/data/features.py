"""Audio features: 16-bit PCM -> fixed-size log-mel spectrogram, with tf.signal.

One code path for the tf.data input pipeline (inside a `map`, graph mode) and for prediction on a raw
clip (eager), so a model never sees features computed two different ways.
"""

from typing import Any

import tensorflow as tf

# Defaults: 25 ms windows every 10 ms at 16 kHz, 64 mel bins over the speech band.
FRAME_LENGTH = 400
FRAME_STEP = 160
FFT_LENGTH = 512
LOWER_HZ = 80.0
UPPER_HZ = 7600.0
# Added before the log so silence (and zero padding inside a clip) stays finite: log(1e-6) ~ -13.8.
LOG_OFFSET = 1e-6


def pcm16_to_float(audio) -> tf.Tensor:
  """int16 PCM (..., N) -> float32 (..., N) in [-1, 1)."""
  return tf.cast(audio, tf.float32) / 32768.0


def num_audio_frames(
  max_seconds: float, sample_rate: int = 16000, frame_length: int = FRAME_LENGTH, frame_step: int = FRAME_STEP
) -> int:
  """Number of STFT frames F of a clip of `max_seconds` (no end padding, as in `log_mel_spectrogram`)."""
  num_samples = max_audio_samples(max_seconds, sample_rate)
  if num_samples < frame_length:
    return 0
  return 1 + (num_samples - frame_length) // frame_step


def max_audio_samples(max_seconds: float, sample_rate: int = 16000) -> int:
  """Number of PCM samples kept from a clip of at most `max_seconds`."""
  return int(round(max_seconds * sample_rate))


def log_mel_spectrogram(
  waveform,
  sample_rate: int = 16000,
  frame_length: int = FRAME_LENGTH,
  frame_step: int = FRAME_STEP,
  fft_length: int = FFT_LENGTH,
  num_mel_bins: int = 64,
  lower_hz: float = LOWER_HZ,
  upper_hz: float = UPPER_HZ,
) -> tf.Tensor:
  """float waveform (N,) or (B, N) -> log-mel (F, M) or (B, F, M) float32.

  F = 1 + (N - frame_length) // frame_step (0 when N < frame_length): windows never run past the end,
  so a clip's features do not depend on how much padding follows it.
  """
  if upper_hz > sample_rate / 2:
    raise ValueError(
      f"upper_hz={upper_hz} is above the Nyquist frequency of sample_rate={sample_rate}; "
      f"pass upper_hz <= {sample_rate / 2}."
    )
  waveform = tf.convert_to_tensor(waveform, dtype=tf.float32)
  num_samples = tf.shape(waveform)[-1]
  num_frames = tf.maximum(0, 1 + (num_samples - frame_length) // frame_step)
  # tf's RFFT fails on zero frames (empty or < frame_length audio): pad to one window, slice it off after.
  short_by = tf.maximum(0, frame_length - num_samples)
  rank = len(waveform.shape)
  waveform = tf.pad(waveform, [[0, 0]] * (rank - 1) + [[0, short_by]])
  stft = tf.signal.stft(
    waveform, frame_length=frame_length, frame_step=frame_step, fft_length=fft_length, pad_end=False
  )
  magnitude = tf.abs(stft)[..., :num_frames, :]  # (..., F, fft_length // 2 + 1)
  mel_matrix = tf.signal.linear_to_mel_weight_matrix(
    num_mel_bins=num_mel_bins,
    num_spectrogram_bins=fft_length // 2 + 1,
    sample_rate=sample_rate,
    lower_edge_hertz=lower_hz,
    upper_edge_hertz=upper_hz,
  )
  # tensordot over the frequency axis works for any number of leading (batch, frame) axes.
  mel = tf.tensordot(magnitude, mel_matrix, axes=1)
  mel.set_shape(magnitude.shape[:-1].concatenate([num_mel_bins]))
  return tf.math.log(mel + LOG_OFFSET)


def _mel_params(config: Any) -> dict:
  """Feature parameters from a data config (`config.data` or the full config); defaults above."""
  data = config.data if hasattr(config, "data") else config
  get = data.get if hasattr(data, "get") else (lambda key, default=None: getattr(data, key, default))
  return dict(
    sample_rate=int(get("sample_rate", 16000)),
    max_seconds=float(get("max_audio_seconds", 4.0)),
    num_mel_bins=int(get("num_mel_bins", 64)),
    frame_length=int(get("mel_frame_length", FRAME_LENGTH)),
    frame_step=int(get("mel_frame_step", FRAME_STEP)),
    fft_length=int(get("fft_length", FFT_LENGTH)),
    lower_hz=float(get("mel_lower_hz", LOWER_HZ)),
    upper_hz=float(get("mel_upper_hz", UPPER_HZ)),
  )


def feature_shape(config: Any) -> tuple[int, int]:
  """(F_max, M) of `audio_features` under `config`."""
  p = _mel_params(config)
  return (num_audio_frames(p["max_seconds"], p["sample_rate"], p["frame_length"], p["frame_step"]), p["num_mel_bins"])


def waveform_features(waveform, config: Any) -> tuple[tf.Tensor, tf.Tensor]:
  """float waveform (N,) or (B, N) -> (log_mel (..., F_max, M) float32, mask (..., F_max) bool).

  The waveform is cropped to `max_audio_seconds` first; frames past its end are zeros with mask False.
  """
  p = _mel_params(config)
  max_frames, num_mel_bins = feature_shape(config)
  waveform = tf.convert_to_tensor(waveform, dtype=tf.float32)
  waveform = waveform[..., : max_audio_samples(p["max_seconds"], p["sample_rate"])]
  log_mel = log_mel_spectrogram(
    waveform,
    sample_rate=p["sample_rate"],
    frame_length=p["frame_length"],
    frame_step=p["frame_step"],
    fft_length=p["fft_length"],
    num_mel_bins=num_mel_bins,
    lower_hz=p["lower_hz"],
    upper_hz=p["upper_hz"],
  )
  num_valid = tf.shape(log_mel)[-2]
  rank = len(log_mel.shape)
  paddings = [[0, 0]] * (rank - 2) + [[0, max_frames - num_valid], [0, 0]]
  log_mel = tf.pad(log_mel, paddings)
  log_mel.set_shape(log_mel.shape[:-2].concatenate([max_frames, num_mel_bins]))
  valid = tf.range(max_frames) < num_valid  # (F_max,): same length for every row of a batch
  mask = tf.broadcast_to(valid, tf.shape(log_mel)[:-1])
  mask.set_shape(log_mel.shape[:-1])
  return log_mel, mask


def audio_features(pcm, config: Any) -> tuple[tf.Tensor, tf.Tensor]:
  """int16 PCM (N,) -> (log_mel (F_max, M) float32, mask (F_max,) bool), F_max from `feature_shape`.

  `config` is the data config (sample_rate, max_audio_seconds, num_mel_bins) or a full config with
  `.data`. Empty or < 25 ms audio gives all-zero features and an all-False mask.
  """
  return waveform_features(pcm16_to_float(pcm), config)
