"""Edge export: ONNX, TFLite and SavedModel of a tiny-config checkpoint run back and match JAX."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mer_jax import errors
from mer_jax.training import checkpoint as checkpoint_lib
from mer_jax.export import contract
from mer_jax.export import exporters as export
from mer_jax.export import parity as parity_lib
from mer_jax.export import runtimes
from mer_jax.data import labels
from mer_jax.models import emotion_model as model_lib
from mer_jax.data import tokenizer as tokenizer_lib
from mer_jax.training import runs
from mer_jax.training import train
from mer_jax.training import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTIMENT_NAMES = ["calm", "good", "bad"]  # not labels.py's: metadata must take them from eval/best.json


def _fill(path, leaf, rng):
  """A plausible value for one weight, by its name and shape (BatchNorm variances > 0, scales ~1)."""
  name = str(path[-1])
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    return np.full(leaf.shape, 2, leaf.dtype)  # step counters
  if "var" in name:
    return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
  if "scale" in name:
    return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
  fan_in = max(1, int(np.prod(leaf.shape[:-1])))
  return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)


def _random_variables(config):
  """Model weights without compiling the model's init (shapes from jax.eval_shape)."""
  model, batch = model_lib.EmotionModel(config.model), model_lib.zeros_batch(config, 1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, train=False))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(lambda path, leaf: _fill(path, leaf, rng), shapes)


def test_fp32_mismatch_raises_and_is_recorded(tmp_path, monkeypatch):
  config = tiny.get_config()
  variables = _random_variables(config)
  examples = parity_lib.make_examples(config, 5)  # 5 rows like the CLI test: one compiled reference for both
  reference = export.jax_reference(config, variables, examples)

  def off_by_a_little(key, path, names):
    return lambda examples: {k: v + 1e-3 if v.dtype == np.float32 else v for k, v in reference.items()}

  monkeypatch.setattr(export, "export_onnx", lambda config, variables, path: open(path, "wb").close())
  monkeypatch.setattr(runtimes, "loaded_runner", off_by_a_little)
  with pytest.raises(parity_lib.ParityError, match="onnx: max \\|delta\\| 0.001"):
    export.export_model(config, variables, str(tmp_path), formats=["onnx"], examples=examples)
  parity = json.loads((tmp_path / "parity.json").read_text())
  assert parity["formats"]["onnx"]["passed_fp32_bar"] is False
  assert parity["formats"]["onnx"]["max_abs_delta"] == pytest.approx(1e-3, rel=1e-3)
  assert parity["examples_source"] == "given by the caller"
  with pytest.raises(ValueError, match="Unknown format"):
    export.export_model(config, variables, str(tmp_path), formats=["coreml"], examples=examples)
  with pytest.raises(FileNotFoundError, match="No checkpoints in .*train first"):
    runs.load_checkpoint(config, str(tmp_path / "never_trained"))
  with pytest.raises(errors.PathNotFound, match="Workdir .*never_trained not found; pass the folder given to"):
    runs.load_run(str(tmp_path / "never_trained"))
  with pytest.raises(errors.PathNotFound, match="is not a training workdir \\(no config.json or checkpoints/\\)"):
    runs.load_run(str(tmp_path))  # a folder that exists: parity.json, no run


def test_tflite_failure_names_the_blocker_and_the_way_around(tmp_path, monkeypatch):
  import tensorflow as tf

  def removed(serving_funcs, inputs):
    raise ValueError("Failed to convert the given Jax function to hlo.")

  monkeypatch.setattr(tf.lite.TFLiteConverter, "experimental_from_jax", staticmethod(removed))
  config = tiny.get_config()
  with pytest.raises(RuntimeError, match="experimental_from_jax .*--formats onnx,savedmodel"):
    export.export_tflite(config, _random_variables(config), str(tmp_path / "model.tflite"))
  assert not (tmp_path / "model.tflite").exists()


def _checkpoint_workdir(config, workdir):
  """A train state saved at step 2 by the project's Checkpointer, with its eval/best.json.

  Its weights are drawn (non-trivial BatchNorm statistics included) instead of trained: compiling the
  real train step of even the tiny model costs ~60 s of CPU, over this file's time budget. Export only
  sees the restored values, so the path under test (orbax layout, restore, best step) is the same.
  """
  rng = np.random.default_rng(5)
  abstract = steps_lib.abstract_train_state(train.step_options(config), steps_lib.make_mesh(), config.seed)
  state = jax.tree_util.tree_map_with_path(lambda path, leaf: _fill(path, leaf, rng), abstract)
  state = state.replace(step=np.asarray(2, np.int32))
  checkpointer = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), config, best_metric=config.best_metric, asynchronous=False
  )
  checkpointer.save(2, state, {config.best_metric: 0.25})
  checkpointer.close()
  os.makedirs(os.path.join(workdir, "eval"))
  best = {
    "step": 2,
    "split": "validation",
    "best_metric": config.best_metric,
    "value": 0.25,
    "tasks": {"emotion": {"class_names": list(labels.EMOTIONS)}, "sentiment": {"class_names": SENTIMENT_NAMES}},
  }
  with open(os.path.join(workdir, "eval", "best.json"), "w") as f:
    json.dump(best, f)
  return {"params": state.params, "batch_stats": state.batch_stats}


def _pooling(config):
  config.model.scorer.downscale = 2  # as in the edge model: the scorer average-pools frames first
  return config


@pytest.mark.slow
def test_cli_exports_checkpoint_and_all_runtimes_match_jax(tmp_path, monkeypatch):
  config = _pooling(tiny.get_config())
  load_config = runs.load_config
  monkeypatch.setattr(runs, "load_config", lambda path: _pooling(load_config(path)))
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  trained = _checkpoint_workdir(config, workdir)
  parity = export.main(
    [
      "--workdir",
      workdir,
      "--out",
      out,
      "--config",
      os.path.join(REPO, "configs/tiny.py"),
      "--formats",
      "onnx,tflite,savedmodel",
      "--quantize",
      "none,int8",
      "--examples",
      "5",
    ]
  )

  assert set(parity["formats"]) == {"onnx", "tflite", "tflite_int8", "savedmodel"}
  for key in ("onnx", "tflite", "savedmodel"):
    report = parity["formats"][key]
    assert report["max_abs_delta"] <= 1e-4, (key, report)
    assert report["class_agreement"] == {"emotion": 1.0, "sentiment": 1.0}, (key, report)
    assert report["selected_indices_agreement"] == 1.0 and report["passed_fp32_bar"]
  int8 = parity["formats"]["tflite_int8"]
  assert int8["max_abs_delta"] < 0.05 and int8["bytes"] < 0.5 * parity["formats"]["tflite"]["bytes"]
  assert json.loads(open(os.path.join(out, "parity.json")).read()) == parity

  # The exports hold the checkpoint's weights: the restored tree is the trained one, and ONNX (5 rows at
  # once: dynamic batch) and TFLite (5 calls of batch 1) reproduce JAX with it on new examples.
  restored, source, _ = runs.load_checkpoint(config, workdir)
  assert source["checkpoint_step"] == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), trained)
  examples = parity_lib.make_examples(config, 5, seed=3)
  expected = export.jax_reference(config, trained, examples)
  got = runtimes.run_onnx(os.path.join(out, "model.onnx"), examples)
  np.testing.assert_allclose(got[0], expected["probs_emotion"], atol=1e-4)
  got = runtimes.run_tflite(os.path.join(out, "model.tflite"), examples)
  np.testing.assert_allclose(got[1], expected["probs_sentiment"], atol=1e-4)
  np.testing.assert_array_equal(got[3], expected["selected_indices"])

  metadata = json.loads(open(os.path.join(out, "metadata.json")).read())
  assert metadata["labels"] == {"emotion": list(labels.EMOTIONS), "sentiment": SENTIMENT_NAMES}
  assert metadata["source"]["checkpoint_step"] == 2 and metadata["source"]["chosen_as"] == "best"
  assert metadata["batch_size"]["tflite"] == 1 and metadata["batch_size"]["onnx"] == "dynamic"
  pre = metadata["preprocessing"]
  assert [pre[k] for k in ("num_frames", "frame_size", "sample_rate", "max_text_length")] == [4, 32, 16000, 16]
  assert pre["log_mel"]["num_mel_bins"] == 16 and pre["audio_frames"] == examples["audio"].shape[1]
  assert [o["name"] for o in metadata["outputs"]] == list(contract.output_names(config))
  assert contract.output_names(metadata) == contract.output_names(config)
  assert contract.output_names(config)[-1] == "gate" and parity["formats"]["onnx"]["per_output"]["gate"] < 1e-4
  # No prepared data for this run: random parity inputs, and the clip reader's defaults, both said so.
  assert parity["examples_source"].startswith("random inputs")
  assert pre["clip_read_config"]["num_frames"] == 4 and "defaults" in pre["clip_read_config_source"]
  assert pre["data"]["frame_size"] == 32 and pre["data"]["max_text_length"] == 16
  assert metadata["files"]["tflite_int8"] == "model_int8.tflite"
  text = ["Oh my god, you're back!"]
  exported = tokenizer_lib.load_tokenizer(os.path.join(out, "tokenizer"))
  np.testing.assert_array_equal(
    tokenizer_lib.tokenize(exported, text, 16)[0], tokenizer_lib.tokenize(tokenizer_lib.load_tokenizer(), text, 16)[0]
  )

  with pytest.raises(FileNotFoundError, match="No checkpoint of step 7"):
    runs.load_checkpoint(config, workdir, step=7)
