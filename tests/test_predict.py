"""Prediction on raw clips: the same model inputs as the input pipeline, JAX vs ONNX end to end, folder prediction
over clips the project did not make (other sizes, rates, broken files), a CSV with and without labels, user errors.

`tiny_corpus`, `tiny_run` and `foreign_prediction` are built once per test process and shared with
tests/test_api.py and tests/test_gallery.py: a 2+3-clip demo corpus prepared at 4 frames of 48 px, a checkpoint of
the tiny config with drawn weights (as tests/test_export.py makes one) and its ONNX export, and folder prediction
with that export over clips the project did not make.
"""

import contextlib
import csv
import fractions
import html
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import av
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tiny
from data import make_demo_corpus
from data import meld_format
from data import prepare
from mer_jax.inference import runners
from mer_jax import errors
from mer_jax.data import input_pipeline
from mer_jax.export import contract
from mer_jax.export import metadata as export_metadata
from mer_jax.tools import predict
from mer_jax.training import run_config as run_config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILT: dict = {}  # the shared fixtures' values, once per process


def tiny_corpus(tmp_path_factory):
  """(root, config): the demo corpus under root/corpus, prepared under root/tfds for configs/tiny.py."""
  if "corpus" not in _BUILT:
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
    _BUILT["corpus"] = (root, config)
  return _BUILT["corpus"]


def tiny_run(tmp_path_factory):
  """The tiny corpus + a workdir (checkpoint, config.json) + its ONNX export, as a namespace of paths."""
  if "run" not in _BUILT:
    from mer_jax.export import exporters
    from tests.test_export import _checkpoint_workdir

    root, config = tiny_corpus(tmp_path_factory)
    workdir, out = str(root / "run"), str(root / "export")
    _checkpoint_workdir(config, workdir)
    run_config_lib.save_run_config(config, workdir)  # as training does: predict/export need only the workdir
    parity = exporters.main(
      ["--workdir", workdir, "--out", out, "--formats", "onnx", "--examples", "2", "--accuracy-split", "dev"]
    )
    clips = root / "corpus" / "dev_splits_complete"
    _BUILT["run"] = types.SimpleNamespace(
      root=root,
      config=config,
      workdir=workdir,
      export=out,
      onnx=os.path.join(out, "model.onnx"),
      parity=parity,
      clips=str(clips),
      csv=str(root / "corpus" / "dev_sent_emo.csv"),
      clip_paths=sorted(str(p) for p in clips.glob("*.mp4")),
    )
  return _BUILT["run"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(tmp_path_factory)


def _dev_examples(config):
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
  prepared, pipeline = _dev_examples(config)
  assert len(pipeline) == 3
  reading, source = export_metadata.clip_read_config(config)
  assert source.startswith("prepared data") and reading["num_frames"] == 4 and reading["face_crop"] is False
  prep = runners.Preprocessing(export_metadata.data_fields(config), reading)
  for example_id, expected in pipeline.items():
    inputs, clip = runners.clip_inputs(_clip_path(root, example_id), prepared[example_id]["text"].decode(), prep)
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


def strict_json(text: str):
  """json.loads that rejects NaN and Infinity, as strict JSON readers (browsers, jq) do."""

  def reject(constant):
    raise ValueError(f"{constant} is not JSON")

  return json.loads(text, parse_constant=reject)


def test_context_follows_the_pipeline_order():
  assert runners.context_text(["A: one", "B: two", "A: three"], 2) == "A: three\nB: two"
  assert runners.context_text(["A: one"], 0) is None and runners.context_text(None, 3) is None
  assert runners.context_text(["A: one"], 1, ["B: two", "C: three"], 2) == "A: one\nB: two\nC: three"
  # A CSV's rows -> each row's earlier and later utterances, then the context: as input_pipeline.dialogue_contexts.
  rows = [
    {"id": "d/1_2", "dialogue_id": 1, "utterance_id": 2, "speaker": "B", "text": "two"},
    {"id": "d/1_0", "dialogue_id": 1, "utterance_id": 0, "speaker": "A", "text": "zero"},
    {"id": "d/2_0", "dialogue_id": 2, "utterance_id": 0, "speaker": "", "text": "alone"},
    {"id": "d/1_5", "dialogue_id": 1, "utterance_id": 5, "speaker": "", "text": "five"},
  ]
  neighbours = runners.dialogue_neighbours(rows)
  assert neighbours == {
    "d/1_0": ([], ["B: two", "five"]),
    "d/1_2": (["A: zero"], ["five"]),
    "d/1_5": (["A: zero", "B: two"], []),
    "d/2_0": ([], []),
  }
  columns = [[row[key] for row in rows] for key in ("speaker", "text", "dialogue_id", "utterance_id")]
  for turns, future in ((1, 0), (2, 0), (3, 0), (0, 1), (2, 2), (1, 3)):
    expected = input_pipeline.dialogue_contexts(*columns, turns, future)
    got = [runners.context_text(*neighbours[row["id"]][:1], turns, neighbours[row["id"]][1], future) for row in rows]
    assert got == expected, (turns, future)


def test_frame_resize_equals_the_input_pipeline():
  """runners.resize_frames (no TensorFlow Datasets import) is input_pipeline.resize_frames, pixel for pixel."""
  rng = np.random.default_rng(3)
  for size, target in ((48, 32), (112, 64), (112, 112), (50, 32)):
    frames = rng.integers(0, 256, (4, size, size, 1), dtype=np.uint8)
    expected = input_pipeline.resize_frames(tf.constant(frames), target).numpy()
    resized = runners.resize_frames(frames, target)
    assert resized.dtype == np.uint8 and resized.shape == (4, target, target, 1)
    np.testing.assert_array_equal(resized, expected, err_msg=f"{size} -> {target}")


def test_missing_inputs_say_what_to_pass(tmp_path):
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    contract.read_metadata(str(tmp_path))
  (tmp_path / "model.pt").write_bytes(b"x")
  with pytest.raises(errors.InvalidInput, match="model.pt is not a model mer_jax reads; pass a training workdir"):
    runners.load_runner(str(tmp_path / "model.pt"))
  with pytest.raises(errors.PathNotFound, match="none.onnx not found; pass a training workdir"):
    runners.load_runner(str(tmp_path / "none.onnx"))
  with pytest.raises(errors.PathNotFound, match="--video .*none.mp4 not found; pass the path of an mp4"):
    predict.main(["--model", str(tmp_path), "--video", str(tmp_path / "none.mp4"), "--text", "hi"])
  with pytest.raises(errors.PathNotFound, match="is neither a training workdir .* nor an export folder"):
    runners.load_runner(str(tmp_path))  # a folder that is neither a run nor an export
  with pytest.raises(errors.InvalidInput, match="--text is empty"):
    predict.main(["--model", str(tmp_path), "--video", str(tmp_path / "model.pt"), "--text", "  "])
  # An --explain path that cannot be written fails before the model loads (here: no model at all).
  video = ["--model", str(tmp_path / "none"), "--video", str(tmp_path / "model.pt"), "--text", "hi"]
  with pytest.raises(errors.InvalidInput, match="--explain .* is a folder; pass the PNG's path"):
    predict.main([*video, "--explain", str(tmp_path)])
  with pytest.raises(errors.InvalidInput, match="--explain .*model.pt is a file, not a folder"):
    predict.main([*video, "--explain", str(tmp_path / "model.pt" / "x.png")])


@pytest.mark.slow
def test_predict_end_to_end_jax_and_onnx_agree(run, tmp_path):
  prepared, pipeline = _dev_examples(run.config)
  example_id = next(i for i, e in pipeline.items() if e["has_video"] and e["has_audio"])
  video, text = _clip_path(run.root, example_id), prepared[example_id]["text"].decode()

  by_jax = predict.main(["--model", run.workdir, "--video", video, "--text", text, "--json"])
  assert by_jax["runtime"] == "jax" and by_jax["error"] is None
  for task, probabilities in by_jax["probs"].items():
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4), task
    assert by_jax["label"][task] == max(probabilities, key=probabilities.get)
  assert len(by_jax["chosen_frames"]) == run.config.model.top_k
  times = by_jax["frame_times"]
  assert all(f["time_seconds"] == times[f["index"]] for f in by_jax["chosen_frames"])
  assert all(f["score"] == by_jax["frame_scores"][f["index"]] for f in by_jax["chosen_frames"])
  assert 0.0 < times[0] < times[-1] < by_jax["duration_seconds"]

  # The export (made by tiny_run on real dev examples), scored on the whole dev split.
  assert run.parity["examples"] == 2 and "'dev' split" in run.parity["examples_source"]
  accuracy = run.parity["accuracy"]
  assert accuracy["split"] == "dev" and accuracy["examples"] == 3
  assert accuracy["formats"]["onnx"]["emotion"]["accuracy_change"] == 0.0
  assert accuracy["formats"]["onnx"]["emotion"]["agreement_with_jax"] == 1.0
  metadata = json.loads(pathlib.Path(run.export, "metadata.json").read_text())
  assert metadata["preprocessing"]["clip_read_config"]["frame_size"] == 48

  # The ONNX route in a fresh process, as a user runs it: never imports JAX, agrees with JAX, writes the PNG.
  png = str(tmp_path / "explain.png")
  script = (
    "import sys; from mer_jax.tools import predict; code = predict.cli(); "
    "assert 'jax' not in sys.modules, 'jax imported'; "
    "assert 'tensorflow_datasets' not in sys.modules, 'tensorflow_datasets imported'; sys.exit(code)"
  )
  command = [sys.executable, "-c", script, "--model", run.onnx, "--video", video, "--text", text, "--json"]
  done = subprocess.run(command + ["--explain", png], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  by_onnx = strict_json(done.stdout.strip().splitlines()[-1])
  assert by_onnx["runtime"] == "onnxruntime"
  assert by_onnx["label"] == by_jax["label"]
  for task, probabilities in by_jax["probs"].items():
    for name, p in probabilities.items():
      assert by_onnx["probs"][task][name] == pytest.approx(p, abs=1e-4), (task, name)
  assert [f["index"] for f in by_onnx["chosen_frames"]] == [f["index"] for f in by_jax["chosen_frames"]]
  assert by_onnx["reliability_video"] == pytest.approx(by_jax["reliability_video"], abs=1e-4)
  assert os.path.getsize(png) > 10_000
  record = strict_json((tmp_path / "explain.json").read_text())
  assert sorted(record["selected_indices"]) == [f["index"] for f in by_jax["chosen_frames"]]


# ----------------------------------------------------------------------------- folders


def write_foreign_clip(path, width, height, fps, sample_rate, layout, seconds=1.5, video=True, audio=True):
  """A clip unlike the demo corpus's: its own size, frame rate, audio rate and channels (H.264 + AAC in mp4)."""
  with av.open(str(path), "w") as container:
    if video:
      picture = container.add_stream("libx264", rate=fps)
      picture.width, picture.height, picture.pix_fmt = width, height, "yuv420p"
      picture.options = {"preset": "ultrafast"}
    if audio:
      sound = container.add_stream("aac", rate=sample_rate)
      sound.codec_context.layout = layout
    channels = 2 if layout == "stereo" else 1
    for i in range(int(seconds * fps) if video else 0):
      x = np.linspace(0, 255, width, dtype=np.float32)[None, :] + 9 * i
      frame = np.repeat((x % 256).astype(np.uint8)[..., None], 3, axis=2).repeat(height, axis=0)
      for packet in picture.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    if audio:
      samples = int(seconds * sample_rate)
      tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / sample_rate)).astype(np.float32)
      for start in range(0, samples, 1024):
        chunk = np.ascontiguousarray(np.tile(tone[start : start + 1024], (channels, 1)))
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, fractions.Fraction(1, sample_rate)
        for packet in sound.encode(frame):
          container.mux(packet)
    for stream in ([picture] if video else []) + ([sound] if audio else []):
      for packet in stream.encode():
        container.mux(packet)
  return str(path)


def foreign_folder(folder: pathlib.Path) -> dict:
  """Clips the project did not make, good and broken, a transcript beside one, and a file that is not a clip."""
  folder.mkdir(parents=True, exist_ok=True)
  wide = write_foreign_clip(folder / "wide_30fps.mp4", 640, 360, 30, 44100, "stereo")
  write_foreign_clip(folder / "small_15fps.mov", 320, 240, 15, 22050, "mono")
  (folder / "small_15fps.txt").write_text("Look at the circle. Oh my God!\n")
  data = pathlib.Path(wide).read_bytes()
  (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
  (folder / "empty.mp4").write_bytes(b"")
  (folder / "notes_named.mp4").write_text("this is a text file, not a video\n")
  write_foreign_clip(folder / "voice_only.m4a", 0, 0, 0, 16000, "mono", video=False)
  (folder / "README.md").write_text("not a clip")
  return {
    "good": {"wide_30fps", "small_15fps"},
    "broken": {"truncated", "empty", "notes_named"},
    "audio_only": {"voice_only"},
  }


def _lines(out) -> dict:
  lines = [strict_json(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert len({line["id"] for line in lines}) == len(lines)
  return {line["id"]: line for line in lines}


def foreign_prediction(tmp_path_factory):
  """`predict --folder` with the tiny run's ONNX export over `foreign_folder`, once per process: a namespace of
  out (the folder it wrote), kinds, summary and the stdout / stderr it printed."""
  if "foreign" not in _BUILT:
    built = tiny_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("foreign")
    kinds = foreign_folder(root / "clips")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      summary = predict.main(["--model", built.onnx, "--folder", str(root / "clips"), "--out", str(root / "out")])
    _BUILT["foreign"] = types.SimpleNamespace(
      root=root, out=root / "out", kinds=kinds, summary=summary, stdout=stdout.getvalue(), stderr=stderr.getvalue()
    )
  return _BUILT["foreign"]


@pytest.mark.slow
def test_folder_of_foreign_clips_gives_one_line_per_clip_and_a_gallery(run, tmp_path_factory):
  foreign = foreign_prediction(tmp_path_factory)
  kinds, out, summary = foreign.kinds, foreign.out, foreign.summary
  lines = _lines(out)
  assert set(lines) == kinds["good"] | kinds["broken"] | kinds["audio_only"]
  assert summary["clips"] == 6 and summary["errors"] == 4 and summary["files_not_clips"] == ["README.md"]
  assert "README.md" in foreign.stderr and "6 clips" in foreign.stdout
  for name, line in lines.items():
    assert set(line["probs"]) == {"emotion", "sentiment"} and line["label"]["emotion"] in line["probs"]["emotion"]
    assert sum(line["probs"]["emotion"].values()) == pytest.approx(1.0, abs=1e-4)
    assert not any(problem.startswith("non_finite_output") for problem in line["problems"]), line
    if name in kinds["good"]:
      assert line["error"] is None and line["has_video"] and line["has_audio"], line
      assert 1.4 < line["duration_seconds"] < 1.7 and line["frame_times"][-1] < line["duration_seconds"]
      assert len(line["chosen_frames"]) == run.config.model.top_k
      assert len(line["frame_times"]) == len(line["frame_scores"]) == run.config.data.num_frames
    else:
      # No video read: no frame was chosen among the blank ones the model saw.
      assert line["chosen_frames"] == [] and line["frame_times"] == [] and line["frame_scores"] == [], line
      assert line["error"] and not line["has_video"], line
      assert line["has_audio"] == (name in kinds["audio_only"]), line
      expected = "predicted from audio only" if name in kinds["audio_only"] else "predicted from no input"
      assert expected in line["error"], line
  assert lines["small_15fps"]["text"] == "Look at the circle. Oh my God!" and lines["wide_30fps"]["text"] == ""
  assert lines["empty"]["error"].startswith("empty_file") and "corrupt_mp4" in lines["truncated"]["error"]
  assert lines["notes_named"]["error"].startswith("unreadable_file")
  assert lines["voice_only"]["error"].startswith("no_video_stream")
  page = (out / "gallery.html").read_text()
  assert page.count('<section class="clip') == 6
  assert all(f'data-id="{name}"' in page for name in lines)
  assert page.count("data:image/webp;base64,") == 2 * 4  # T frames of the two clips with video
  assert page.count('<p class="reason">') == 4 and all(html.escape(lines[n]["error"]) in page for n in kinds["broken"])
  assert strict_json((out / "summary.json").read_text())["clips"] == 6
  assert not list(out.glob("*.tmp"))

  # One clip at a time, a file that is not a clip is the user's to fix: one line, exit status 2.
  not_a_clip = str(foreign.root / "clips" / "notes_named.mp4")
  with pytest.raises(errors.InvalidInput, match="notes_named.mp4 is not a clip FFmpeg can read .unreadable_file"):
    predict.main(["--model", run.onnx, "--video", not_a_clip, "--text", "Hi."])


@pytest.mark.slow
def test_folder_with_a_csv_carries_labels_and_explanations(run, tmp_path, capsys):
  out = tmp_path / "labelled"
  summary = predict.main(
    ["--model", run.onnx, "--folder", run.clips, "--csv", run.csv, "--out", str(out), "--explain-pngs"]
  )
  lines = _lines(out)
  assert sorted(lines) == ["dev/dia0_utt0", "dev/dia0_utt1", "dev/dia0_utt2"]
  for line in lines.values():
    assert line["true_label"]["emotion"] in line["probs"]["emotion"]
    assert line["correct"]["emotion"] == (line["label"]["emotion"] == line["true_label"]["emotion"])
    # The tiny run's sentiment classes are not MELD's (tests/test_export.py): no truth, the row still predicted.
    assert line["true_label"]["sentiment"] is None and "sentiment" not in line["correct"]
    assert (out / line["explanation_png"]).stat().st_size > 10_000
  assert summary["accuracy"]["emotion"]["labelled"] == 3 and "sentiment" not in summary["accuracy"]
  assert summary["labels_unknown_to_the_model"]["sentiment"] and summary["clips_not_in_csv"] == []
  captured = capsys.readouterr()
  assert "emotion accuracy" in captured.out and "sentiment labels the model does not know" in captured.err
  page = (out / "gallery.html").read_text()
  assert "emotion accuracy" in page and page.count('href="explanations/') == 3

  # The same CSV without its label columns: predictions without truth, nothing skipped.
  bare = tmp_path / "dev_unlabelled.csv"
  with open(run.csv, newline="") as source, open(bare, "w", newline="") as target:
    rows = list(csv.DictReader(source))
    columns = [name for name in rows[0] if name.strip().lower() not in ("emotion", "sentiment")]
    writer = csv.DictWriter(target, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  unlabelled = predict.main(["--model", run.onnx, "--folder", run.clips, "--csv", str(bare), "--out", str(tmp_path)])
  lines = _lines(tmp_path)
  assert len(lines) == 3 and unlabelled["accuracy"] == {} and not any("true_label" in line for line in lines.values())


def test_csv_rows_labels_and_clips_come_from_one_reading(tmp_path, capsys):
  """--csv: a row's text, context and labels are those of the first row of its id (as meld_csv.read_rows keeps);
  rows with a bad id are skipped and listed, never predicted as diaNone; clips no row names are listed."""
  model = types.SimpleNamespace(
    data_layout={}, class_names={"emotion": ("neutral", "joy", "anger"), "sentiment": ("low", "high")}
  )
  folder = tmp_path / "clips"
  folder.mkdir()
  for name in ("dia0_utt0.mp4", "dia0_utt1.mp4", "dia3_utt0.mp4", "dia7_utt0.mp4", "notes.txt"):
    (folder / name).write_bytes(b"x")
  table = [
    ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"),
    ("First words.", "Ross", "joy", "high", "0", "0"),
    ("A duplicate, not predicted.", "Joey", "anger", "low", "0", "0"),
    ("No dialogue id.", "Ross", "anger", "low", "x", "1"),
    ("Second words.", "Rachel", "surprised", "", "0", "1"),
    ("Its duplicate, known label.", "Rachel", "neutral", "low", "0", "1"),
    ("Another dialogue.", "", "NEUTRAL", "medium", "3", "0"),
  ]
  csv_path = tmp_path / "dev_sent_emo.csv"
  with open(csv_path, "w", newline="") as f:
    csv.writer(f).writerows(table)

  items, truth, notes = predict._csv_items(str(folder), str(csv_path), model)
  assert [item["id"] for item in items] == ["dev/dia0_utt0", "dev/dia0_utt1", "dev/dia3_utt0"]
  assert [item["text"] for item in items] == ["First words.", "Second words.", "Another dialogue."]
  assert [item["context"] for item in items] == [[], ["Ross: First words."], []]
  assert [item["next_context"] for item in items] == [["Rachel: Second words."], [], []]
  assert items[1]["video"] == str(folder / "dia0_utt1.mp4")
  assert truth == {
    "dev/dia0_utt0": {"emotion": "joy", "sentiment": "high"},
    "dev/dia0_utt1": {"emotion": None, "sentiment": None},  # its first row: an unknown label, a no-label value
    "dev/dia3_utt0": {"emotion": "neutral", "sentiment": None},
  }
  assert notes["labels_unknown_to_the_model"] == {"emotion": {"surprised": 1}, "sentiment": {"medium": 1}}
  skipped = notes["rows_skipped"]
  assert skipped["bad_id"]["count"] == 1 and skipped["duplicate_id"]["ids"] == ["dev/dia0_utt0", "dev/dia0_utt1"]
  assert notes["clips_not_in_csv"] == ["dia7_utt0.mp4"]
  predict._print_notes(items, notes)
  err = capsys.readouterr().err
  assert "1 clips in --folder are named by no --csv row, not predicted: dia7_utt0.mp4" in err
  assert "1 CSV rows skipped (bad_id)" in err and "'surprised' (1)" in err


def test_cli_user_errors_are_one_line_with_exit_status_2(tmp_path):
  """As a user runs it: `python -m mer_jax.predict` with a missing path or a folder that is no model (side by side)."""
  (tmp_path / "empty").mkdir()
  clip = tmp_path / "clip.mp4"
  clip.write_bytes(b"")
  missing, empty = str(tmp_path / "none"), str(tmp_path / "empty")
  cases = {
    "missing model": (["--model", missing, "--video", str(clip), "--text", "hi"], f"--model {missing} not found; pass"),
    "not a model": (["--model", empty, "--video", str(clip), "--text", "hi"], "is neither a training workdir"),
    "missing video": (["--model", empty, "--video", missing, "--text", "hi"], f"--video {missing} not found; pass"),
    "missing folder": (["--model", empty, "--folder", missing, "--out", empty], f"--folder {missing} not found; pass"),
  }
  running = {
    name: subprocess.Popen(
      [sys.executable, "-m", "mer_jax.predict", *argv],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, (argv, _) in cases.items()
  }
  for name, process in running.items():
    _, stderr = process.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, (name, stderr[-2000:])
    assert lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, lines[0])
