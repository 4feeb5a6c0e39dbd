"""The Python API (`mer_jax.load(...).predict(...)`): typed results from a workdir (JAX) and from an ONNX export
(without JAX), predict_many, its errors, and the README's snippet run as written on the tiny run."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mer_jax
from mer_jax.inference import api
from mer_jax.inference import runners
from mer_jax import errors
from tests.test_predict import strict_json
from tests.test_predict import tiny_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def workdir_model(run):
  return mer_jax.load(run.workdir)


def test_import_mer_jax_is_cheap():
  """`import mer_jax` loads no JAX, TensorFlow or media library; the API comes on first use."""
  script = (
    "import sys, mer_jax; heavy = [m for m in ('jax', 'tensorflow', 'av', 'cv2', 'numpy') if m in sys.modules]; "
    "assert not heavy, heavy; from mer_jax.inference import api; assert mer_jax.Prediction is api.Prediction"
  )
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]


def test_load_and_predict_errors_say_what_to_pass(tmp_path):
  with pytest.raises(errors.PathNotFound, match="none not found; pass a training workdir"):
    mer_jax.load(tmp_path / "none")
  with pytest.raises(errors.PathNotFound, match="neither a training workdir .* nor an export folder"):
    mer_jax.load(tmp_path)
  (tmp_path / "model.pt").write_bytes(b"weights")
  with pytest.raises(errors.InvalidInput, match="model.pt is not a model mer_jax reads"):
    mer_jax.load(tmp_path / "model.pt")
  with pytest.raises(errors.PathNotFound, match="metadata.json not found"):
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    mer_jax.load(tmp_path / "model.onnx")
  with pytest.raises(errors.InvalidInput, match="neither a video nor a text"):
    api._request({"video": None, "text": ""}, 0)
  with pytest.raises(errors.InvalidInput, match="unknown keys"):
    api._request({"clip": "a.mp4"}, 0)


def test_an_export_folder_gives_its_first_model_file(tmp_path, monkeypatch):
  """model.onnx, model.tflite, model_fp16.tflite, model_int8.tflite: the first there (`--quantize int8` alone
  writes only the last); the message names them all when there is none."""
  monkeypatch.setattr(runners, "EdgeRunner", lambda path, threads: path)
  (tmp_path / "metadata.json").write_text("{}")
  with pytest.raises(errors.PathNotFound, match="one of model.onnx, model.tflite, model_fp16.tflite, model_int8"):
    runners.load_runner(str(tmp_path))
  for name in reversed(runners.EXPORT_MODEL_FILES):
    (tmp_path / name).write_bytes(b"x")
    assert runners.load_runner(str(tmp_path)) == str(tmp_path / name)


def test_workdir_errors_are_the_users_only_when_runs_says_so(tmp_path, monkeypatch):
  """runs.load_run raises PathNotFound for what a user can fix, and it reaches the caller as it is; another
  FileNotFoundError (a bug, a file gone mid-read) keeps its own type and traceback."""
  from mer_jax.training import runs

  def load_run_raising(error):
    def load_run(*_):
      raise error

    return load_run

  (tmp_path / "config.json").write_text("{}")
  monkeypatch.setattr(runs, "load_run", load_run_raising(errors.PathNotFound("No checkpoints in W")))
  with pytest.raises(errors.PathNotFound, match="^No checkpoints in W$"):
    mer_jax.load(tmp_path)
  monkeypatch.setattr(runs, "load_run", load_run_raising(FileNotFoundError("ocdbt manifest")))
  with pytest.raises(FileNotFoundError, match="ocdbt manifest") as raised:
    mer_jax.load(tmp_path)
  assert not isinstance(raised.value, errors.UserError)


def _prediction(probability: float, score: float) -> api.Prediction:
  return api.Prediction(
    id="a",
    clip="a.mp4",
    text="Hi.",
    tasks={"emotion": api.TaskPrediction("joy", {"joy": probability, "anger": 0.5})},
    chosen_frames=(api.ChosenFrame(0, 0.5, score),),
    frame_times=(0.5, 1.5),
    frame_scores=(score, 0.25),
    reliability_video=0.5,
    reliability_audio=float("inf"),
    gate_mean=None,
    gate_quartiles=None,
    has_video=True,
    has_audio=True,
    duration_seconds=2.0,
    problems=("no_audio_stream",),
  )


def test_to_json_is_strict_json_with_non_finite_numbers_named():
  finite = dataclasses.replace(_prediction(0.5, 0.1), reliability_audio=0.5)
  assert strict_json(json.dumps(finite.to_json(), allow_nan=False))["problems"] == ["no_audio_stream"]
  record = _prediction(float("nan"), float("-inf")).to_json()
  line = strict_json(json.dumps(record, allow_nan=False))
  assert line["probs"]["emotion"] == {"joy": None, "anger": 0.5} and line["reliability_audio"] is None
  assert line["frame_scores"] == [None, 0.25] and line["chosen_frames"][0]["score"] is None
  assert line["problems"] == [
    "no_audio_stream",
    "non_finite_output: probs.emotion, chosen_frames, frame_scores, reliability_audio (null in JSON)",
  ]


@pytest.mark.slow
def test_workdir_predictions_are_typed_and_batched_the_same(run, workdir_model, tmp_path):
  model = workdir_model
  assert model.runtime == "jax" and set(model.class_names) == {"emotion", "sentiment"}
  clip = run.clip_paths[0]
  prediction = model.predict(video=clip, text="See the cross? Excuse me?", return_frames=True)
  assert isinstance(prediction, mer_jax.Prediction) and prediction.id == "dia0_utt0" and prediction.clip == clip
  for task, entry in prediction.tasks.items():
    assert isinstance(entry, mer_jax.TaskPrediction) and list(entry.probabilities) == list(model.class_names[task])
    assert sum(entry.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert entry.label == max(entry.probabilities, key=entry.probabilities.get) == prediction.labels[task]
  k, t = run.config.model.top_k, run.config.data.num_frames
  assert len(prediction.chosen_frames) == k and len(prediction.frame_times) == len(prediction.frame_scores) == t
  assert [f.index for f in prediction.chosen_frames] == sorted(f.index for f in prediction.chosen_frames)
  for frame in prediction.chosen_frames:
    assert (
      frame.time_seconds == prediction.frame_times[frame.index] and frame.score == prediction.frame_scores[frame.index]
    )
  assert prediction.frames.shape == (t, 32, 32) and prediction.frames.dtype == np.uint8
  assert prediction.gate.ndim == 1 and 0.0 <= prediction.gate_mean <= 1.0 and len(prediction.gate_quartiles) == 3
  assert 0.0 <= prediction.reliability_video <= 1.0 and prediction.error is None
  line = strict_json(json.dumps(prediction.to_json(), allow_nan=False))
  assert line["chosen_frames"][0].keys() == {"index", "time_seconds", "score"}

  text_only = model.predict(text="See the cross?")
  assert not text_only.has_video and not text_only.has_audio and text_only.error is None and text_only.clip is None
  assert text_only.chosen_frames == text_only.frame_times == text_only.frame_scores == ()
  with pytest.raises(errors.PathNotFound, match="none.mp4 not found"):
    model.predict(video=tmp_path / "none.mp4", text="hi")
  with pytest.raises(errors.InvalidInput, match="pass a video, a text or both"):
    model.predict()

  # Batches of 3 (the last one padded): the same numbers as one clip at a time; a broken clip gets its error.
  broken = tmp_path / "broken.mp4"
  broken.write_text("not a video")
  items = [(path, "See the cross?") for path in run.clip_paths]
  items += [{"video": broken, "text": "Hi.", "id": "bad"}, {"text": "Only words."}]
  many = model.predict_many(items, batch_size=3)
  assert [p.id for p in many] == ["dia0_utt0", "dia0_utt1", "dia0_utt2", "bad", "text4"]
  assert many[3].error.startswith("unreadable_file") and "predicted from text only" in many[3].error
  assert many[3].chosen_frames == () and many[3].frame_scores == ()
  assert many[4].error is None and not many[4].has_video
  for path, batched in zip(run.clip_paths, many):
    alone = model.predict(video=path, text="See the cross?")
    for task, entry in alone.tasks.items():
      np.testing.assert_allclose(
        list(batched.tasks[task].probabilities.values()), list(entry.probabilities.values()), atol=1e-5
      )
    assert batched.chosen_frames == alone.chosen_frames


@pytest.mark.slow
def test_onnx_api_runs_without_jax_and_agrees_with_the_workdir(run, workdir_model, tmp_path):
  damaged = tmp_path / "export"
  shutil.copytree(run.export, damaged)
  good = (damaged / "model.onnx").read_bytes()
  (damaged / "model.onnx").write_bytes(good[: len(good) // 2])
  with pytest.raises(errors.InvalidInput, match="model.onnx cannot be opened by the runtime .*INVALID_PROTOBUF"):
    mer_jax.load(damaged)
  (damaged / "model.onnx").write_bytes(b"")
  with pytest.raises(errors.InvalidInput, match="model.onnx is empty .0 bytes.; pass the model file"):
    mer_jax.load(damaged)
  # A whole model this onnxruntime is too old for is not the user's file to fix: onnxruntime's error, unchanged.
  import onnx

  newer = onnx.load_from_string(good)
  for opset in newer.opset_import:
    if opset.domain in ("", "ai.onnx"):
      opset.version = 999
  (damaged / "model.onnx").write_bytes(newer.SerializeToString())
  with pytest.raises(Exception, match="Opset 999") as raised:
    mer_jax.load(damaged)
  assert not isinstance(raised.value, errors.UserError), raised.value
  (damaged / "model.onnx").unlink()
  (damaged / "model_int8.tflite").write_bytes(b"not a flatbuffer " * 8)
  with pytest.raises(errors.InvalidInput, match="model_int8.tflite cannot be opened by the runtime"):
    mer_jax.load(damaged)

  clip, text = run.clip_paths[1], "Please, notice the triangle!"
  script = (
    "import json, sys, mer_jax; model = mer_jax.load(sys.argv[1]); "
    "print(json.dumps({'runtime': model.runtime, **model.predict(video=sys.argv[2], text=sys.argv[3]).to_json()})); "
    "assert 'jax' not in sys.modules, 'jax imported'; "
    "assert 'tensorflow_datasets' not in sys.modules, 'tensorflow_datasets imported'"
  )
  command = [sys.executable, "-c", script, run.onnx, clip, text]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  by_onnx = strict_json(done.stdout.strip().splitlines()[-1])
  by_jax = workdir_model.predict(video=clip, text=text).to_json()
  assert by_onnx["runtime"] == "onnxruntime" and by_onnx["label"] == by_jax["label"]
  for task, probabilities in by_jax["probs"].items():
    for name, p in probabilities.items():
      assert by_onnx["probs"][task][name] == pytest.approx(p, abs=1e-4), (task, name)
  assert [f["index"] for f in by_onnx["chosen_frames"]] == [f["index"] for f in by_jax["chosen_frames"]]
  assert by_onnx["reliability_audio"] == pytest.approx(by_jax["reliability_audio"], abs=1e-4)


README_PATHS = {  # what the README's snippet names -> where the tiny run has it
  '"runs/demo"': "workdir",
  '"export/demo/model.onnx"': "onnx",
  '"~/.cache/mer_jax/demo_corpus/dev_splits_complete/dia0_utt0.mp4"': "clip",
}


def readme_snippet() -> str:
  """The README's ```python block that calls mer_jax.load."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)
  (snippet,) = [block for block in blocks if "mer_jax.load(" in block]
  return snippet


@pytest.mark.slow
def test_the_readme_snippet_runs_as_written(run, tmp_path):
  snippet = readme_snippet()
  paths = {"workdir": run.workdir, "onnx": run.onnx, "clip": run.clip_paths[0]}
  for written, key in README_PATHS.items():
    assert written in snippet, f"the README snippet no longer names {written}; update README_PATHS"
    snippet = snippet.replace(written, repr(paths[key]))
  script = tmp_path / "snippet.py"
  script.write_text(snippet)
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert any(name in out for name in ("joy", "neutral", "surprise", "fear", "sadness", "disgust", "anger")), out
