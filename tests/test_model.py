"""The assembled model: outputs and explanation, missing modalities, K frames only, gradients reach the scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import tiny
from mer_jax.models import emotion_model as model_lib


@pytest.fixture(scope="module")
def setup():
  config = tiny.get_config()
  model = model_lib.EmotionModel(config.model)
  rng = np.random.default_rng(0)
  batch = model_lib.zeros_batch(config, 3)
  batch = {k: np.array(v) for k, v in batch.items()}
  batch["frames"] = rng.integers(0, 256, batch["frames"].shape, dtype=np.uint8)
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["audio_mask"][:, :60] = True
  batch["text_ids"][:, :5] = rng.integers(1000, 2000, (3, 5))
  batch["text_mask"][:, :5] = True
  variables = model_lib.init_variables(config, jax.random.key(0))
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))
  return config, model, variables, batch, apply


def test_outputs_and_explanation(setup):
  config, _, variables, batch, apply = setup
  logits, explanation = apply(variables, batch)
  assert logits["emotion"].shape == (3, 7) and logits["sentiment"].shape == (3, 3)
  t, k = config.data.num_frames, config.model.top_k
  assert explanation["frame_scores"].shape == (3, t)
  indices = np.asarray(explanation["selected_indices"])
  assert indices.shape == (3, k) and np.all(np.diff(indices, axis=1) > 0)  # K distinct frames in time order
  np.testing.assert_array_equal(indices, np.sort(np.argsort(-np.asarray(explanation["frame_scores"]))[:, :k]))
  assert explanation["gate"].shape == (3, config.model.width)
  assert explanation["attention"].shape == (3, 2, config.data.max_text_length, 1 + k + 2)
  np.testing.assert_allclose(np.asarray(explanation["attention"]).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(logits["emotion"])))


def test_unchosen_frames_do_not_change_the_output(setup):
  _, _, variables, batch, apply = setup
  logits, explanation = apply(variables, batch)
  chosen = np.asarray(explanation["selected_indices"])
  changed = dict(batch)
  frames = batch["frames"].copy()
  for row in range(3):
    for frame in range(frames.shape[1]):
      if frame not in chosen[row]:
        frames[row, frame] = frames[row, frame] // 2  # darker: scores change, selection here did not
  changed["frames"] = frames
  logits_changed, explanation_changed = apply(variables, changed)
  if np.array_equal(explanation_changed["selected_indices"], chosen):
    np.testing.assert_array_equal(logits["emotion"], logits_changed["emotion"])
  # Changing a chosen frame does change the output.
  changed["frames"] = batch["frames"].copy()
  changed["frames"][0, chosen[0, 0]] = 255 - changed["frames"][0, chosen[0, 0]]
  assert not np.allclose(apply(variables, changed)[0]["emotion"][0], logits["emotion"][0])


def test_missing_modalities_are_removed(setup):
  _, _, variables, batch, apply = setup
  no_video = dict(batch, has_video=np.asarray([False, True, True]))
  logits, explanation = apply(variables, no_video)
  assert float(explanation["reliability_video"][0]) == 0.0 and float(explanation["reliability_video"][1]) > 0
  other_frames = dict(no_video, frames=np.full_like(batch["frames"], 200))
  logits_other, _ = apply(variables, other_frames)
  np.testing.assert_allclose(logits["emotion"][0], logits_other["emotion"][0], atol=1e-5)
  no_audio = dict(batch, has_audio=np.asarray([False, True, True]))
  _, explanation = apply(variables, no_audio)
  assert float(explanation["reliability_audio"][0]) == 0.0
  np.testing.assert_array_equal(np.asarray(explanation["attention"])[0, :, :, -2:], 0.0)


def test_gradients_reach_every_component_including_the_scorer(setup):
  config, model, variables, batch, _ = setup
  labels = jnp.asarray([1, 2, 3])

  def loss(params):
    (logits, _), _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      batch,
      train=True,
      rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"],
    )
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits["emotion"]), labels[:, None], 1))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for component in ("frame_selector", "backbone", "audio_encoder", "text_encoder", "fusion", "cross_attention"):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[component]))
    assert norm > 0, component
  scorer_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["frame_selector"]["scorer"]["query"]))
  assert scorer_norm > 0


def test_soft_selection_ablation_runs_all_frames():
  config = tiny.get_config()
  config.model.selection = "soft"
  variables = model_lib.init_variables(config, jax.random.key(0))
  model = model_lib.EmotionModel(config.model)
  logits, explanation = jax.jit(lambda v, b: model.apply(v, b, train=False))(
    variables, model_lib.zeros_batch(config, 2)
  )
  assert explanation["attention"].shape[-1] == 1 + config.data.num_frames + config.model.audio.num_segments
  assert logits["emotion"].shape == (2, 7)


def test_model_sizes():
  edge = default.get_config()
  base = default.get_config()
  base.model = default.model_config("base")

  def count(config):
    model = model_lib.EmotionModel(config.model)
    shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, model_lib.zeros_batch(config, 1), train=False)
    )
    return model_lib.count_parameters(shapes["params"]), shapes["params"]

  edge_total, edge_params = count(edge)
  base_total, base_params = count(base)
  assert edge_total < 10_000_000
  assert model_lib.count_parameters(edge_params["backbone"]) == 926_720
  assert model_lib.count_parameters(base_params["text_encoder"]) == 22_565_376  # MiniLM-L6 without pooler
  assert base_total > edge_total


def test_text_only_model_ignores_frames_and_audio(setup):
  """config.model.modalities = ('text',): no video/audio parameters, outputs depend on the text alone."""
  config = tiny.get_config()
  config.model.modalities = ("text",)
  _, _, _, batch, _ = setup
  variables = model_lib.init_variables(config, jax.random.key(0))
  assert set(variables["params"]).isdisjoint({"backbone", "frame_selector", "audio_encoder", "fusion"})
  model = model_lib.EmotionModel(config.model)
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))
  logits, explanation = apply(variables, batch)
  other = dict(
    batch,
    frames=np.zeros_like(batch["frames"]),
    audio=np.zeros_like(batch["audio"]),
    has_video=np.zeros(3, bool),
    has_audio=np.zeros(3, bool),
  )
  other_logits, _ = apply(variables, other)
  np.testing.assert_array_equal(logits["emotion"], other_logits["emotion"])
  text_changed = dict(batch, text_ids=batch["text_ids"] + 1)
  assert not np.allclose(apply(variables, text_changed)[0]["emotion"], logits["emotion"])
  assert explanation["frame_scores"].shape == (3, config.data.num_frames)
  np.testing.assert_array_equal(explanation["selected_indices"], [[0, 1]] * 3)
  np.testing.assert_array_equal(explanation["reliability_video"], 0.0)
  config.model.modalities = ("video", "text")
  with pytest.raises(ValueError, match="modalities"):
    model_lib.EmotionModel(config.model).init(jax.random.key(0), model_lib.zeros_batch(config, 1), train=False)
