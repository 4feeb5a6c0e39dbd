"""Prediction on a raw clip: the same model inputs as the input pipeline, and JAX vs ONNX end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from data import make_demo_corpus
from data import meld_format
from data import prepare
from mer_jax.training import checkpoint as checkpoint_lib
from mer_jax.export import contract
from mer_jax.export import metadata as export_metadata
from mer_jax.data import input_pipeline
from mer_jax.tools import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A 2+3-clip demo corpus prepared at 4 frames of 48 px (the tiny model resizes them to 32 px)."""
  root = tmp_path_factory.mktemp("predict")
  make_demo_corpus.make_corpus(root / "corpus", num_train=2, num_dev=3, num_test=0, seed=1, workers=1)
  reading = meld_format.MeldFormatConfig(
    name="tiny_demo",
    version="1.0.0",
    num_frames=4,
    frame_size=48,
    face_crop=False,
    max_audio_seconds=2.0,
    exact_frames=True,
    skip_loop_filter=False,
    num_workers=1,
  )
  prepare.prepare(root / "corpus", root / "tfds", reading)
  config = tiny.get_config()
  config.data.builder_config = "tiny_demo"
  config.data.data_dir = str(root / "tfds")
  return root, config


def _dev_examples(root, config):
  """(prepared examples by id, pipeline inputs by id) of the dev split."""
  builder = input_pipeline.load_builder(config)
  prepared = {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="dev"))}
  batches = input_pipeline.batch_iterator(config, "dev", train=False, process_index=0, process_count=1)
  rows = {}
  for batch in batches:
    for row in np.flatnonzero(batch["example_mask"]):
      rows[batch["id"][row].decode()] = {k: v[row] for k, v in batch.items()}
  return prepared, rows


def _clip_path(root, example_id):
  return str(root / "corpus" / "dev_splits_complete" / (example_id.split("/")[1] + ".mp4"))


def test_predict_inputs_equal_the_input_pipeline(corpus):
  root, config = corpus
  prepared, pipeline = _dev_examples(root, config)
  assert len(pipeline) == 3
  reading, source = export_metadata.clip_read_config(config)
  assert source.startswith("prepared data") and reading["num_frames"] == 4 and reading["face_crop"] is False
  prep = predict.Preprocessing(export_metadata.data_fields(config), reading)
  for example_id, expected in pipeline.items():
    inputs, clip = predict.clip_inputs(_clip_path(root, example_id), prepared[example_id]["text"].decode(), prep)
    assert inputs["frames"].shape == (1, 4, 32, 32, 1)
    np.testing.assert_array_equal(inputs["frames"][0], expected["frames"], err_msg=example_id)
    np.testing.assert_allclose(inputs["audio"][0], expected["audio"], atol=1e-5, err_msg=example_id)
    np.testing.assert_array_equal(inputs["audio_mask"][0], expected["audio_mask"])
    np.testing.assert_array_equal(inputs["text_ids"][0], expected["text_ids"])
    np.testing.assert_array_equal(inputs["text_mask"][0], expected["text_mask"])
    assert (inputs["has_video"][0], inputs["has_audio"][0]) == (expected["has_video"], expected["has_audio"])
    np.testing.assert_allclose(clip.frame_times, prepared[example_id]["frame_times"], atol=1e-6)
  # A clip with content in both modalities is among them (the demo corrupts ~10% of clips).
  assert any(e["has_video"] and e["has_audio"] and e["frames"].std() > 0 for e in pipeline.values())


def test_context_follows_the_pipeline_order():
  assert predict._context_text(["A: one", "B: two", "A: three"], 2) == "A: three\nB: two"
  assert predict._context_text(["A: one"], 0) is None and predict._context_text(None, 3) is None


def test_missing_inputs_say_what_to_pass(tmp_path):
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    contract.read_metadata(str(tmp_path))
  with pytest.raises(ValueError, match="training workdir, an export folder"):
    predict.load_model(str(tmp_path / "model.pt"))
  with pytest.raises(FileNotFoundError, match="--video .* not found"):
    predict.clip_inputs(str(tmp_path / "none.mp4"), "hi", predict.Preprocessing({}, {}))
  with pytest.raises(FileNotFoundError, match="config.json not found.*or pass --config"):
    predict.load_model(str(tmp_path))  # a folder that is neither a run nor an export


@pytest.mark.slow
def test_predict_end_to_end_jax_and_onnx_agree(corpus, tmp_path):
  from mer_jax.export import exporters as export
  from tests.test_export import _checkpoint_workdir

  root, config = corpus
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  _checkpoint_workdir(config, workdir)
  checkpoint_lib.save_run_config(config, workdir)  # as training does: predict/export need only the workdir
  prepared, pipeline = _dev_examples(root, config)
  example_id = next(i for i, e in pipeline.items() if e["has_video"] and e["has_audio"])
  video, text = _clip_path(root, example_id), prepared[example_id]["text"].decode()

  by_jax = predict.main(["--model", workdir, "--video", video, "--text", text, "--json"])
  assert by_jax["runtime"] == "jax"
  for task, entry in by_jax["tasks"].items():
    assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-4), task
  assert len(by_jax["selected_frames"]) == config.model.top_k
  times = by_jax["frame_times"]
  assert all(f["time_seconds"] == times[f["index"]] for f in by_jax["selected_frames"])
  assert 0.0 < times[0] < times[-1] < by_jax["duration_seconds"]

  # Export on real dev examples, scored on the whole dev split.
  parity = export.main(
    ["--workdir", workdir, "--out", out, "--formats", "onnx", "--examples", "2", "--accuracy-split", "dev"]
  )
  assert parity["examples"] == 2 and "'dev' split" in parity["examples_source"]
  accuracy = parity["accuracy"]
  assert accuracy["split"] == "dev" and accuracy["examples"] == 3
  assert accuracy["formats"]["onnx"]["emotion"]["accuracy_change"] == 0.0
  assert accuracy["formats"]["onnx"]["emotion"]["agreement_with_jax"] == 1.0
  metadata = json.load(open(os.path.join(out, "metadata.json")))
  assert metadata["preprocessing"]["clip_read_config"]["frame_size"] == 48

  # The ONNX route in a fresh process: never imports JAX, agrees with JAX, writes the explanation.
  png = str(tmp_path / "explain.png")
  script = (
    "import json, sys; from mer_jax.tools import predict; "
    "r = predict.main(sys.argv[1:]); assert 'jax' not in sys.modules, 'jax imported'"
  )
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      script,
      "--model",
      os.path.join(out, "model.onnx"),
      "--video",
      video,
      "--text",
      text,
      "--json",
      "--explain",
      png,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  by_onnx = json.loads(done.stdout.strip().splitlines()[-1])
  assert by_onnx["runtime"] == "onnxruntime"
  for task, entry in by_jax["tasks"].items():
    got = by_onnx["tasks"][task]
    assert got["predicted"] == entry["predicted"]
    for name, p in entry["probabilities"].items():
      assert got["probabilities"][name] == pytest.approx(p, abs=1e-4), (task, name)
  assert by_onnx["selected_frames"] == by_jax["selected_frames"]
  assert by_onnx["reliability_video"] == pytest.approx(by_jax["reliability_video"], abs=1e-4)
  assert os.path.getsize(png) > 10_000
  record = json.load(open(str(tmp_path / "explain.json")))
  assert record["selected_indices"] == [f["index"] for f in by_jax["selected_frames"]]
