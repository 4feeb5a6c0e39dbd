"""Prosody synthesis for the demo corpus: a speech-like voiced signal whose prosody depends on emotion.

Each emotion has a mean F0 level, an F0 contour (rise/fall/flat, in semitones over the clip), an
energy, a speaking rate (syllable-like amplitude bursts per second), a harmonic tilt (lower = richer,
harsher voice) and an F0 tremor. Every clip draws a "speaker" around those means, wide enough that
the classes overlap: audio alone is only partly predictive of the emotion (about 60% with simple
features), as in real speech. Output is `(N,) float32` at 16 kHz in [-1, 1].
"""

import numpy as np

SAMPLE_RATE = 16000

# f0 Hz, slope semitones over the clip, energy (peak-syllable RMS), rate syllables/s,
# tilt (harmonic k has amplitude k**-tilt), tremor depth in semitones (at 6-8 Hz).
PROSODY = {
  "neutral": dict(f0=135.0, slope=0.0, energy=0.09, rate=3.6, tilt=1.6, tremor=0.0),
  "joy": dict(f0=205.0, slope=4.0, energy=0.15, rate=4.6, tilt=1.3, tremor=0.0),
  "sadness": dict(f0=110.0, slope=-4.0, energy=0.05, rate=2.5, tilt=2.0, tremor=0.2),
  "surprise": dict(f0=225.0, slope=8.0, energy=0.13, rate=3.4, tilt=1.4, tremor=0.0),
  "fear": dict(f0=195.0, slope=0.0, energy=0.07, rate=5.6, tilt=1.7, tremor=0.8),
  "disgust": dict(f0=120.0, slope=-2.0, energy=0.09, rate=2.9, tilt=1.0, tremor=0.0),
  "anger": dict(f0=165.0, slope=-5.0, energy=0.22, rate=5.0, tilt=0.8, tremor=0.0),
}

# Per-clip speaker spread around the emotion's means. Tuned so that a logistic regression on simple
# features (energy, pitch, pitch slope, rate, spectral tilt) gets roughly 0.5-0.7 accuracy.
SPREAD = dict(f0_semitones=4.5, slope=4.5, energy_log10=0.23, rate_rel=0.27, tilt=0.45)

NOISE_FLOOR = 0.003  # room noise under clean speech, so clean audio is never digital silence
NUM_HARMONICS = 10


def _speaker(emotion: str, rng: np.random.Generator) -> dict:
  if emotion not in PROSODY:
    raise ValueError(f"Unknown emotion {emotion!r}; expected one of {tuple(PROSODY)}.")
  p = PROSODY[emotion]
  return dict(
    f0=p["f0"] * 2.0 ** (rng.normal(0.0, SPREAD["f0_semitones"]) / 12.0),
    slope=p["slope"] + rng.normal(0.0, SPREAD["slope"]),
    energy=p["energy"] * 10.0 ** rng.normal(0.0, SPREAD["energy_log10"]),
    rate=p["rate"] * max(0.5, 1.0 + rng.normal(0.0, SPREAD["rate_rel"])),
    tilt=max(0.4, p["tilt"] + rng.normal(0.0, SPREAD["tilt"])),
    tremor=p["tremor"],
  )


def _syllable_envelope(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
  """Amplitude envelope `(n,)` in [0, 1]: raised-cosine bursts at about `rate` per second."""
  env = np.zeros(n, np.float64)
  t = rng.uniform(0.05, 0.2)
  end = n / SAMPLE_RATE - 0.1
  while t < end:
    length = min(0.55 / rate * rng.uniform(0.8, 1.2), end - t)
    i0, i1 = int(t * SAMPLE_RATE), int((t + length) * SAMPLE_RATE)
    if i1 - i0 > 8:
      gain = rng.uniform(0.7, 1.0)  # stressed and unstressed syllables
      env[i0:i1] = np.maximum(env[i0:i1], gain * np.sin(np.linspace(0.0, np.pi, i1 - i0)) ** 2)
    t += 1.0 / rate * rng.uniform(0.7, 1.3)
  return env


def synth_prosody(emotion: str, num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """A speech-like clip of `num_samples` samples for `emotion`. Returns `(N,) float32`."""
  sp = _speaker(emotion, rng)
  t = np.arange(num_samples) / SAMPLE_RATE
  duration = max(num_samples / SAMPLE_RATE, 1e-3)
  semitones = sp["slope"] * (t / duration - 0.5)
  if sp["tremor"] > 0:
    semitones = semitones + sp["tremor"] * np.sin(2 * np.pi * rng.uniform(6.0, 8.0) * t)
  f0 = sp["f0"] * 2.0 ** (semitones / 12.0)
  phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
  voice = np.zeros(num_samples)
  weights = np.arange(1, NUM_HARMONICS + 1, dtype=np.float64) ** -sp["tilt"]
  for k, w in enumerate(weights, start=1):
    # Harmonics above Nyquist would alias into noise; fade them out instead.
    voice += w * np.sin(k * phase) * (k * f0 < 0.45 * SAMPLE_RATE)
  voice /= np.sqrt(0.5 * np.sum(weights**2))  # unit RMS before the envelope
  breath = rng.normal(0.0, 0.08, num_samples)
  env = _syllable_envelope(num_samples, sp["rate"], rng)
  signal = sp["energy"] * env * (voice + breath) + rng.normal(0.0, NOISE_FLOOR, num_samples)
  return np.clip(signal, -0.99, 0.99).astype(np.float32)


def corrupt_audio(kind: str, num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """Audio that carries no content: loud `white_noise` or `silence`. Returns `(N,) float32`."""
  if kind == "white_noise":
    return np.clip(rng.normal(0.0, 0.2, num_samples), -0.99, 0.99).astype(np.float32)
  if kind == "silence":
    return np.zeros(num_samples, np.float32)
  raise ValueError(f"Unknown audio corruption {kind!r}; expected 'white_noise' or 'silence'.")
