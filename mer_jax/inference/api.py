"""The Python API: load a trained model once, predict on clips + transcripts, get typed results.

    import mer_jax
    model = mer_jax.load("runs/demo")                  # a training workdir (JAX), an export folder, .onnx, .tflite
    prediction = model.predict(video="clip.mp4", text="Look at the circle. Oh my God!")
    prediction.tasks["emotion"].label, prediction.tasks["emotion"].probabilities, prediction.chosen_frames
    predictions = model.predict_many([{"video": "a.mp4", "text": "Hi."}, ("b.mp4", "No way!")], workers=2)

Every clip goes through the training data's own code: the clip reader with the settings the prepared data was
read with, then the input pipeline's frame resize (`runners.resize_frames`, a copy held equal to it by a test),
log-mel (`features.audio_features`) and tokenizer, so the model sees a clip as it saw its training examples. An
.onnx / .tflite file runs with onnxruntime / LiteRT, reads metadata.json and tokenizer/ beside it and imports
neither JAX nor TensorFlow Datasets. Field-by-field reference: docs/API.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from mer_jax import errors
from mer_jax.inference import runners
from mer_jax.data import clip_reader
from mer_jax.export import contract

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


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class _Request:
  id: str
  video: str | None
  text: str
  context: tuple[str, ...] | None
  next_context: tuple[str, ...] | None = None


def _request(item, position: int) -> _Request:
  """An item of predict_many -> a _Request; raises errors.InvalidInput for an item it cannot read."""
  if isinstance(item, Mapping):
    unknown = sorted(set(item) - {"video", "text", "context", "next_context", "id"})
    if unknown:
      raise errors.InvalidInput(
        f"Item {position} has unknown keys {unknown}; use video, text, context, next_context, id."
      )
    video, text, context, name = item.get("video"), item.get("text"), item.get("context"), item.get("id")
    next_context = item.get("next_context")
  elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
    video, text, context, name = (*item, None, None)[:3] + (None,)
    next_context = None
  else:
    raise errors.InvalidInput(
      f"Item {position} is {item!r}; pass a dict(video=, text=, context=, id=) or (video, text)."
    )
  if video is None and not text:
    raise errors.InvalidInput(f"Item {position} has neither a video nor a text; pass at least one.")
  if isinstance(context, str):
    context = [context]
  if isinstance(next_context, str):
    next_context = [next_context]
  video = None if video is None else os.path.expanduser(os.fspath(video))
  if name is None:
    name = os.path.splitext(os.path.basename(video))[0] if video else f"text{position}"
  lines = lambda values: None if values is None else tuple(str(value) for value in values)
  return _Request(str(name), video, str(text or ""), lines(context), lines(next_context))


class Model:
  """A trained model, loaded once (`mer_jax.load`): predict on one clip or many.

  runtime: 'jax', 'onnxruntime', 'ai-edge-litert' or 'tf.lite'. class_names: task -> class names in label-id order.
  """

  def __init__(self, runner):
    self._runner = runner
    self.path, self.runtime = runner.path, runner.runtime
    self.class_names = {task: tuple(names) for task, names in runner.class_names.items()}
    self.preprocessing: runners.Preprocessing = runner.preprocessing
    self.data_layout: dict = runner.data_layout  # how the training data's CSVs were laid out (may be empty)

  def __repr__(self) -> str:
    return f"Model({self.path!r}, runtime={self.runtime!r}, tasks={list(self.class_names)})"

  def predict(
    self,
    video: str | None = None,
    text: str | None = None,
    context: Sequence[str] | None = None,
    *,
    next_context: Sequence[str] | None = None,
    return_frames=False,
  ) -> Prediction:
    """One clip (None: text only) and its transcript; context: earlier utterances ('Speaker: text'), oldest first;
    next_context: later ones, in dialogue order (read by a model trained with config.data.context_future_turns).

    A clip that cannot be read gives a Prediction whose `error` says why; a missing path raises errors.PathNotFound.
    """
    if video is None and not text:
      raise errors.InvalidInput("Nothing to predict from: pass a video, a text or both.")
    if video is not None:
      runners.check_clip_path(os.path.expanduser(os.fspath(video)))
    item = {"video": video, "text": text, "context": context, "next_context": next_context}
    return next(self.iter_predict([item], workers=1, return_frames=return_frames))

  def predict_many(self, items: Iterable, *, workers: int | None = 1, batch_size: int = 8, return_frames=False):
    """[Prediction] for items: dicts (video=, text=, context=, next_context=, id=) or (video, text) pairs. Never raises on a
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
      batch.append(
        (
          request,
          clip,
          runners.example_inputs(clip, request.text, self.preprocessing, request.context, request.next_context),
        )
      )
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
  return Model(runners.load_runner(os.path.expanduser(os.fspath(path)), config, step, threads))
