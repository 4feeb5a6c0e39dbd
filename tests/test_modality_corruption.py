"""Modality dropout, synthetic corruption and the reliability loss (mer_jax/training/modality_corruption.py), and
the train step that uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.data import features
from mer_jax.training import modality_corruption as corruption
from mer_jax.training import train
from mer_jax.training import steps as steps_lib
from tests.test_train import tiny_config


def _events(n=20000, dropout=0.1, rate=0.15):
  has_video = np.arange(n) % 7 != 0
  has_audio = np.arange(n) % 5 != 0
  events = corruption.draw_events(jax.random.key(0), jnp.asarray(has_video), jnp.asarray(has_audio), dropout, rate)
  return has_video, has_audio, {k: np.asarray(v) for k, v in vars(events).items()}


def test_events_are_exclusive_at_their_rates_and_only_where_both_modalities_are_present():
  has_video, has_audio, events = _events()
  stacked = np.stack(list(events.values()))
  assert stacked.sum(axis=0).max() == 1  # at most one event per example: one clean modality always stays
  both = has_video & has_audio
  assert not stacked[:, ~both].any()
  for name, rate in (("drop_video", 0.1), ("drop_audio", 0.1), ("corrupt_video", 0.15), ("corrupt_audio", 0.15)):
    assert np.mean(events[name][both]) == pytest.approx(rate, abs=0.015), name
  with pytest.raises(ValueError, match="must be <= 1"):
    corruption.draw_events(jax.random.key(0), jnp.ones(2, bool), jnp.ones(2, bool), 0.3, 0.3)


def test_mark_missing_never_adds_a_modality():
  has_video, has_audio, events = _events()
  out = corruption.mark_missing(
    {"has_video": has_video, "has_audio": has_audio},
    corruption.Events(**{k: jnp.asarray(v) for k, v in events.items()}),
  )
  video, audio = np.asarray(out["has_video"]), np.asarray(out["has_audio"])
  np.testing.assert_array_equal(video, has_video & ~events["drop_video"])
  np.testing.assert_array_equal(audio, has_audio & ~events["drop_audio"])
  assert np.all((video | audio)[has_video | has_audio])


def test_corrupted_frames_are_a_constant_level_or_smooth_or_blocky_noise_and_the_rest_is_untouched():
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (256, 3, 12, 12, 1), dtype=np.uint8)
  corrupted = np.arange(256) % 2 == 0
  out = np.asarray(corruption.corrupt_frames(jnp.asarray(frames), jnp.asarray(corrupted), jax.random.key(1)))
  np.testing.assert_array_equal(out[~corrupted], frames[~corrupted])
  kinds, steps, repeats = {"black": 0, "grey": 0, "noise": 0}, [], []
  for clip in out[corrupted].astype(np.float32):
    if np.all(clip == clip.flat[0]):
      kinds["black" if clip.flat[0] == 0 else "grey"] += 1
    else:
      kinds["noise"] += 1
      assert not np.array_equal(clip[0], clip[1])  # a new draw in every frame
      assert clip.std() > 20  # noise over the whole range, not a faint texture
      steps.append(np.abs(np.diff(clip, axis=2)).mean())  # neighbour differences: small for a coarse grain
      repeats.append(np.mean(np.diff(clip, axis=2) == 0))  # equal neighbours: inside a block
  assert all(count > 10 for count in kinds.values()), kinds
  # Uniform pixel noise differs by ~85 grey levels between neighbours; the coarsest grain by far less.
  assert max(steps) > 70 and min(steps) < 35, (min(steps), max(steps))
  # Smooth noise almost never repeats a level between neighbours (~1/256); blocks of 3-4.5 pixels mostly do.
  repeats = np.asarray(repeats)
  assert np.sum(repeats < 0.05) > 10 and np.sum(repeats > 0.4) > 5, np.round(np.sort(repeats), 2)


def test_corrupted_waveforms_are_silence_or_white_noise_and_stay_zero_past_their_length():
  n, samples = 200, 4000
  waveform = np.random.default_rng(0).uniform(-0.5, 0.5, (n, samples)).astype(np.float32)
  length = np.full(n, 3000, np.int32)
  waveform[:, 3000:] = 0.0
  corrupted = np.arange(n) % 2 == 1
  out = np.asarray(
    corruption.corrupt_waveform(jnp.asarray(waveform), jnp.asarray(length), jnp.asarray(corrupted), jax.random.key(2))
  )
  np.testing.assert_array_equal(out[~corrupted], waveform[~corrupted])
  assert not out[:, 3000:].any()
  std = out[corrupted, :3000].std(axis=1)
  silent = std == 0
  assert 0.3 < silent.mean() < 0.7
  low, high = corruption.AUDIO_NOISE_STD_RANGE
  assert np.all((std[~silent] > 0.9 * low) & (std[~silent] < 1.1 * high))


def test_corrupt_turns_a_feature_batch_audio_into_silence():
  audio = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)
  mask = np.arange(6)[None, :] < np.array([6, 6, 3, 0])[:, None]
  events = corruption.Events(
    drop_video=jnp.zeros(4, bool),
    drop_audio=jnp.zeros(4, bool),
    corrupt_video=jnp.zeros(4, bool),
    corrupt_audio=jnp.array([False, True, True, True]),
  )
  batch = {"frames": np.zeros((4, 2, 4, 4, 1), np.uint8), "audio": audio, "audio_mask": mask}
  out = np.asarray(corruption.corrupt(batch, events, jax.random.key(0))["audio"])
  np.testing.assert_array_equal(out[0], audio[0])
  silence = np.float32(np.log(features.LOG_OFFSET))
  np.testing.assert_array_equal(out[1], silence)
  np.testing.assert_array_equal(out[2, :3], silence)
  assert not out[2, 3:].any() and not out[3].any()


def test_reliability_loss_is_the_cross_entropy_against_clean_weighted_by_the_modality_confidence():
  reliability = jnp.array([0.9, 0.2, 0.7, 0.5, 0.0, 0.6])
  present = jnp.array([True, True, True, True, False, True])
  corrupted = jnp.array([False, True, True, False, False, False])
  example_mask = jnp.array([True, True, True, False, True, True])
  loss = corruption.reliability_loss(reliability, present, corrupted, example_mask)
  expected = -(np.log(0.9) + np.log(0.8) + np.log(0.3) + np.log(0.6)) / 4  # rows 3 and 4 do not count
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # Rows left alone weigh their modality's confidence; corrupted rows always weigh 1.
  confidence = jnp.array([0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
  loss = corruption.reliability_loss(reliability, present, corrupted, example_mask, confidence)
  expected = -(0.5 * np.log(0.9) + np.log(0.8) + np.log(0.3) + 0.25 * np.log(0.6)) / 2.75
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # Or they take the confidence as their target, at weight 1: a row whose modality knows nothing teaches r -> 0.
  loss = corruption.reliability_loss(reliability, present, corrupted, example_mask, confidence, confidence_target=True)
  row0 = -(0.5 * np.log(0.9) + 0.5 * np.log(0.1))
  row5 = -(0.25 * np.log(0.6) + 0.75 * np.log(0.4))
  expected = (row0 + -np.log(0.8) - np.log(0.3) + row5) / 4
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(corruption.reliability_loss(reliability, present & False, corrupted, example_mask)) == 0.0


def test_label_confidence_is_the_probability_of_the_label_averaged_over_the_chosen_frames():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]))
  np.testing.assert_allclose(corruption.label_confidence(logits, jnp.array([1, 2, -1])), [0.2, 0.8, 1.0], rtol=1e-6)
  frames = jnp.stack([logits, jnp.log(jnp.array([[0.1, 0.6, 0.3]] * 3))], axis=1)  # (B, T=2, C)
  np.testing.assert_allclose(corruption.label_confidence(frames, jnp.array([1, 0, 2])), [0.4, 0.1, 0.35], rtol=1e-6)


def test_the_train_step_trains_the_reliability_heads_on_corrupted_rows():
  """Steps on one fixed batch with all four events frequent: the reliability losses are reported and fall."""
  config = tiny_config(
    "",
    modality_dropout=0.1,
    modality_corruption=0.4,
    reliability_loss_weight=1.0,
    num_train_steps=40,
    learning_rate=3e-3,
  )
  config.model.use_reliability = True
  config.model.audio_relevance = True
  options = train.step_options(config)
  assert steps_lib.uses_reliability_loss(options)
  options_without = train.step_options(tiny_config("", modality_corruption=0.0))
  assert not steps_lib.corrupts_modalities(options_without)

  rng = np.random.default_rng(0)
  batch_size, shapes = 8, options.data
  size = shapes.frame_size
  frames = rng.integers(40, 200, (batch_size, shapes.num_frames, size, size, 1), dtype=np.uint8)
  samples = int(shapes.sample_rate * shapes.max_audio_seconds)
  batch = {
    "frames": frames,
    "waveform": (rng.normal(0, 0.1, (batch_size, samples)) * 32767).astype(np.int16),
    "audio_length": np.full(batch_size, samples, np.int32),
    "text_ids": rng.integers(5, 50, (batch_size, shapes.max_text_length)).astype(np.int32),
    "text_mask": np.ones((batch_size, shapes.max_text_length), bool),
    "has_video": np.ones(batch_size, bool),
    "has_audio": np.ones(batch_size, bool),
    "example_mask": np.ones(batch_size, bool),
  }
  for task, classes in options.tasks:
    batch[f"labels/{task}"] = (np.arange(batch_size) % classes).astype(np.int32)
  state = steps_lib.create_train_state(options, steps_lib.make_mesh(), 0)
  step = jax.jit(lambda state, batch, rng: steps_lib.train_step(state, batch, rng, options=options))
  first, last = [], []
  for i in range(40):
    state, metrics, _ = step(state, batch, jax.random.key(i))
    values = metrics.compute()
    (first if i < 5 else last if i >= 35 else []).append(
      values["loss_reliability_video"] + values["loss_reliability_audio"]
    )
    assert np.isfinite(values["loss_audio_relevance"])
  assert np.isfinite(first).all() and np.mean(last) < 0.6 * np.mean(first)
