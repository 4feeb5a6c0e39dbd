"""show_prediction_sample writes a PNG and a JSON whose numbers are the model's."""

import json

import jax
import numpy as np
import pytest

from configs import tiny
from mer_jax.tools import explain
from mer_jax.data import labels
from mer_jax.models import emotion_model as model_lib


@pytest.fixture(scope="module")
def prediction():
  config = tiny.get_config()
  model = model_lib.EmotionModel(config.model)
  variables = model_lib.init_variables(config, jax.random.key(0))
  batch = {k: np.array(v) for k, v in model_lib.zeros_batch(config, 1).items()}
  batch["frames"] = np.random.default_rng(0).integers(0, 256, batch["frames"].shape, dtype=np.uint8)
  batch["audio_mask"][:, :50] = True
  logits, explanation = jax.jit(lambda v, b: model.apply(v, b, train=False))(variables, batch)
  return config, batch, jax.tree.map(lambda x: np.asarray(x)[0], (logits, explanation))


def test_png_and_json_hold_the_explanation(prediction, tmp_path):
  config, batch, (logits, explanation) = prediction
  out_png = str(tmp_path / "sample.png")
  record = explain.show_prediction_sample(
    "dev/dia1_utt2",
    "Look at the circle. Oh my God!",
    batch["frames"][0],
    logits,
    explanation,
    labels.TASK_CLASSES,
    out_png,
    labels={"emotion": 1, "sentiment": -1},
    frame_times=[0.1, 0.3, 0.5, 0.7],
  )
  png = open(out_png, "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  saved = json.load(open(tmp_path / "sample.json"))
  assert saved == record
  assert saved["selected_indices"] == [int(i) for i in explanation["selected_indices"]]
  np.testing.assert_allclose(saved["frame_scores"], explanation["frame_scores"], atol=1e-4)
  probabilities = saved["tasks"]["emotion"]["probabilities"]
  assert abs(sum(probabilities.values()) - 1) < 1e-3
  assert saved["tasks"]["emotion"]["predicted"] == labels.EMOTIONS[int(np.argmax(logits["emotion"]))]
  assert saved["tasks"]["emotion"]["label"] == "surprise"
  assert "label" not in saved["tasks"]["sentiment"]  # -1 means no label
  assert len(saved["attention_share"]) == 1 + config.model.top_k + config.model.audio.num_segments
  assert abs(sum(saved["attention_share"]) - 1) < 1e-3
