"""Edge export: ONNX, TFLite (fp32, fp16, int8) and SavedModel, each run back and compared with JAX.

Routes (why: docs/DEPENDENCIES.md):
  ONNX        jax2onnx `to_onnx`, dynamic batch 'B'; run back with onnxruntime.
  TFLite      JAX -> XLA HLO -> TFLite builtins with TF's `TFLiteConverter.experimental_from_jax`; HLO
              has static shapes, so the batch size is fixed (`tflite_batch_size`, written in metadata).
              Run back with the LiteRT interpreter (ai-edge-litert; TF's own when it is missing).
  SavedModel  jax2tf (native StableHLO in an XlaCallModule op), dynamic batch; run back with TF.

The exported function takes the 7 model inputs of the batch contract (frames (B, T, H, W, 1) uint8, audio
(B, F, M) float32, audio_mask (B, F) bool, text_ids (B, L) int32, text_mask (B, L) bool, has_video (B,) bool,
has_audio (B,) bool) and returns `output_names(config)`: probs_<task> (B, C) softmax per task, frame_scores
(B, T), selected_indices (B, K) int32, reliability_video (B,), reliability_audio (B,).

  python -m mer_jax.export --workdir runs/demo --out export/demo [--config configs/demo.py]
      [--formats onnx,tflite,savedmodel] [--quantize none,fp16,int8] [--step N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mer_jax import labels as labels_lib
from mer_jax import model as model_lib
from mer_jax import topk

INPUT_NAMES = ("frames", "audio", "audio_mask", "text_ids", "text_mask", "has_video", "has_audio")
FORMATS = ("onnx", "tflite", "savedmodel")
QUANTIZATIONS = ("none", "fp16", "int8")
FP32_TOLERANCE = 1e-4  # max |delta| of an fp32 export against JAX (probabilities; frame scores relative)
# int8 export: embedding tables at least this large are stored as int8 rows + one fp32 scale per row. The
# TFLite dynamic-range quantizer leaves GATHER tables in fp32, and the edge model's 30522 x 128 token table
# alone is 15.6 MB in fp32 (3.9 MB in int8).
INT8_EMBEDDING_MIN_SIZE = 1 << 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "config.json")


class ParityError(RuntimeError):
  """An fp32 export does not reproduce the JAX model (too large a delta or a different predicted class)."""


def output_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(f"probs_{task}" for task in config.model.tasks) + (
      "frame_scores", "selected_indices", "reliability_video", "reliability_audio")


def export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose model computes in float32 (a bfloat16 training dtype is no edge format)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = "float32"
  return config


# ----------------------------------------------------------------------------- the exported function


def sort_free_topk_indices(scores: jax.Array, k: int) -> jax.Array:
  """(B, T) scores -> (B, K) int32: the same indices as `topk.hard_topk_indices`, without sort or top_k.

  Frame t is chosen when fewer than K frames beat it (a higher score, or an equal score at a lower index:
  lax.top_k's tie rule; unlike top_k it counts -0.0 and +0.0 as equal); chosen frames are numbered in
  time order by a cumulative sum. TF 2.21's StableHLO
  reader knows neither the composite jax lowers top_k to (SavedModel) nor HLO sort (TFLite); T is ~12, so
  the T x T comparison costs nothing.
  """
  num_frames = scores.shape[-1]
  positions = jnp.arange(num_frames)
  beats = (scores[:, None, :] > scores[:, :, None]) | (
      (scores[:, None, :] == scores[:, :, None]) & (positions[None, None, :] < positions[None, :, None]))
  chosen = jnp.sum(beats, axis=-1) < k  # (B, T)
  slot = jnp.cumsum(chosen.astype(jnp.int32), axis=-1) - 1
  one_hot = chosen[:, None, :] & (slot[:, None, :] == jnp.arange(k)[None, :, None])  # (B, K, T)
  return jnp.sum(one_hot * positions, axis=-1).astype(jnp.int32)


@contextlib.contextmanager
def export_friendly_topk():
  """While tracing an export, `topk.straight_through_topk` is its forward value built without sort.

  Export needs no gradient, and a fresh plain function (not the custom_vjp, whose traced forward jax may
  cache) guarantees the sort-free version is the one traced.
  """
  original = topk.straight_through_topk

  def forward_only(scores, k, temperature):
    del temperature
    return jax.nn.one_hot(sort_free_topk_indices(scores, k), scores.shape[-1], dtype=scores.dtype)

  topk.straight_through_topk = forward_only
  try:
    yield
  finally:
    topk.straight_through_topk = original


def _int8_embedding_interceptor(next_fun, args, kwargs, context):
  """nn.Embed lookups in large tables -> int8 rows (gathered) x per-row fp32 scale."""
  module = context.module
  if (not isinstance(module, nn.Embed) or context.method_name != "__call__"
      or module.num_embeddings * module.features < INT8_EMBEDDING_MIN_SIZE):
    return next_fun(*args, **kwargs)
  table = module.embedding
  if isinstance(table, jax.core.Tracer):
    raise ValueError("int8 embeddings need the weights as constants of the traced function.")
  table = np.asarray(table, np.float32)
  scale = (np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0).astype(np.float32)
  quantized = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
  ids = args[0]
  rows = jnp.take(jnp.asarray(quantized), ids, axis=0).astype(jnp.float32)
  return rows * jnp.take(jnp.asarray(scale), ids, axis=0)[..., None]


def _forward(model: nn.Module, tasks: Sequence[str], variables: Any, inputs: Sequence[jax.Array]):
  logits, explanation = model.apply(variables, dict(zip(INPUT_NAMES, inputs)), train=False)
  return tuple(jax.nn.softmax(logits[task], axis=-1) for task in tasks) + tuple(
      explanation[name] for name in ("frame_scores", "selected_indices", "reliability_video",
                                     "reliability_audio"))


def serving_function(config: ml_collections.ConfigDict, variables: Any, *,
                     int8_embeddings: bool = False) -> Callable[..., tuple]:
  """fn(*inputs in INPUT_NAMES order) -> outputs in `output_names` order; weights are closed over."""
  config = export_config(config)
  model, tasks = model_lib.EmotionModel(config.model), tuple(config.model.tasks)

  def serve(*inputs):
    interceptor = nn.intercept_methods(_int8_embedding_interceptor) if int8_embeddings else (
        contextlib.nullcontext())
    with interceptor:
      return _forward(model, tasks, variables, inputs)
  return serve


@functools.lru_cache(maxsize=4)
def _jitted_forward(model_config: ml_collections.FrozenConfigDict):
  model, tasks = model_lib.EmotionModel(model_config), tuple(model_config.tasks)
  # Weights are arguments, not closed-over constants: XLA would fold them into the program (slow to
  # compile), and one compiled program then serves every checkpoint of a config.
  return jax.jit(lambda variables, *inputs: _forward(model, tasks, variables, inputs))


def jax_reference(config: ml_collections.ConfigDict, variables: Any, examples: dict) -> dict[str, np.ndarray]:
  """The unmodified JAX model (custom_vjp top-k included) on `examples`: name -> array."""
  config = export_config(config)
  forward = _jitted_forward(ml_collections.FrozenConfigDict(config.model))
  outputs = forward(variables, *[examples[name] for name in INPUT_NAMES])
  return dict(zip(output_names(config), jax.device_get(outputs)))


def make_examples(config: ml_collections.ConfigDict, num: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
  """`num` random inputs of the batch contract; row 1 has no video and row 2 no audio (when num > 2)."""
  rng = np.random.default_rng(seed)
  spec = model_lib.input_spec(config, num)
  frames = rng.integers(0, 256, spec["frames"].shape, dtype=np.uint8)
  audio = rng.uniform(-14.0, 2.0, spec["audio"].shape).astype(np.float32)  # log-mel range
  num_audio, length = spec["audio"].shape[1], spec["text_ids"].shape[1]
  audio_mask = np.arange(num_audio)[None] < rng.integers(num_audio // 4, num_audio + 1, (num, 1))
  text_mask = np.arange(length)[None] < rng.integers(2, length + 1, (num, 1))
  vocab = int(config.model.text.compact.vocab_size) if config.model.text.kind == "compact" else 30522
  text_ids = np.where(text_mask, rng.integers(1000, vocab, (num, length)), 0).astype(np.int32)
  has_video, has_audio = np.ones(num, bool), np.ones(num, bool)
  if num > 2:
    has_video[1], has_audio[2] = False, False
    frames[1], audio[2], audio_mask[2] = 0, 0.0, False
  return dict(frames=frames, audio=audio * audio_mask[..., None], audio_mask=audio_mask, text_ids=text_ids,
              text_mask=text_mask, has_video=has_video, has_audio=has_audio)


# ----------------------------------------------------------------------------- writers and runners


def _input_specs(config, batch):
  spec = model_lib.input_spec(config, 1)
  return [jax.ShapeDtypeStruct((batch,) + spec[name].shape[1:], spec[name].dtype) for name in INPUT_NAMES]


@contextlib.contextmanager
def _keyword_avg_pool():
  """While jax2onnx traces: `nn.avg_pool(x, window, ...)` calls reach its flax plugin by keyword.

  jax2onnx 0.17.1 swaps `flax.linen.avg_pool` for a function taking `window_shape` only by keyword, and
  topk.FrameScorer (like flax's own signature) passes it positionally; entered inside the traced
  function, i.e. after jax2onnx installed its patch, and undone before jax2onnx restores flax.
  """
  patched = nn.avg_pool

  def positional(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True):
    return patched(inputs, window_shape=window_shape, strides=strides, padding=padding,
                   count_include_pad=count_include_pad)
  nn.avg_pool = positional
  try:
    yield
  finally:
    nn.avg_pool = patched


def export_onnx(config, variables, path: str) -> None:
  import onnx
  from jax2onnx import to_onnx
  batch, = jax.export.symbolic_shape("B")
  serve = serving_function(config, variables)

  def serve_onnx(*inputs):
    with _keyword_avg_pool():
      return serve(*inputs)
  with export_friendly_topk():
    proto = to_onnx(serve_onnx, _input_specs(config, batch), model_name="mer_jax",
                    input_names=list(INPUT_NAMES), output_names=list(output_names(config)))
  # jax2onnx's intermediate shape annotations can carry NHWC/NCHW mix-ups that onnxruntime only warns
  # about; the runtime infers shapes itself, so they are dropped.
  del proto.graph.value_info[:]
  onnx.save(proto, path)


def run_onnx(path: str, examples: dict) -> list[np.ndarray]:
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.log_severity_level = 3
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  return session.run(None, {name: examples[name] for name in INPUT_NAMES})


def export_tflite(config, variables, path: str, quantize: str = "none", batch_size: int = 1) -> None:
  """fp32 / fp16 (weights stored in fp16) / int8 (dynamic range: int8 weights, fp32 activations)."""
  import tensorflow as tf
  fn = serving_function(config, variables, int8_embeddings=quantize == "int8")
  placeholders = [(name, jnp.zeros(spec.shape, spec.dtype))
                  for name, spec in zip(INPUT_NAMES, _input_specs(config, batch_size))]
  try:
    converter = tf.lite.TFLiteConverter.experimental_from_jax([fn], [placeholders])
    if quantize in ("fp16", "int8"):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "fp16":
      converter.target_spec.supported_types = [tf.float16]
    with export_friendly_topk():
      flatbuffer = converter.convert()
  except Exception as error:  # TF hides the cause behind "Failed to convert the given Jax function to hlo."
    raise RuntimeError(
        f"TFLite export failed in tensorflow {tf.__version__}'s TFLiteConverter.experimental_from_jax "
        f"(JAX -> XLA HLO -> TFLite, the only JAX -> TFLite route: jax2tf output is an XlaCallModule op "
        f"the TFLite converter rejects): {error} (cause: {error.__cause__ or error.__context__!r}). "
        "ONNX and SavedModel do not need it: pass --formats onnx,savedmodel.") from error
  with open(path, "wb") as f:
    f.write(flatbuffer)


def _tflite_interpreter(path):
  try:
    from ai_edge_litert.interpreter import Interpreter
    runtime = "ai-edge-litert"
  except ImportError:  # TF's interpreter: deprecated, still in TF 2.21
    from tensorflow.lite.python.interpreter import Interpreter
    runtime = "tf.lite"
  return Interpreter(model_path=path), runtime


def run_tflite(path: str, examples: dict) -> list[np.ndarray]:
  """Runs the fixed-batch model over `examples` in chunks (the last one padded with copies of row 0)."""
  interpreter, _ = _tflite_interpreter(path)
  interpreter.allocate_tensors()
  inputs = {d["name"]: d for d in interpreter.get_input_details()}
  batch = int(inputs["frames"]["shape"][0])
  total = len(examples["frames"])
  chunks = []
  for start in range(0, total, batch):
    rows = np.arange(start, start + batch)
    rows = np.where(rows < total, rows, 0)
    for name in INPUT_NAMES:
      interpreter.set_tensor(inputs[name]["index"], np.ascontiguousarray(examples[name][rows]))
    interpreter.invoke()
    chunks.append([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
  return [np.concatenate(parts)[:total] for parts in zip(*chunks)]


def export_savedmodel(config, variables, path: str) -> None:
  import tensorflow as tf
  from jax.experimental import jax2tf
  config = export_config(config)
  model, tasks, names = model_lib.EmotionModel(config.model), tuple(config.model.tasks), output_names(config)
  converted = jax2tf.convert(lambda v, *inputs: _forward(model, tasks, v, inputs), with_gradient=False,
                             polymorphic_shapes=[None] + ["(b, ...)"] * len(INPUT_NAMES),
                             native_serialization_platforms=("cpu",))
  module = tf.Module()
  # Weights as variables (not graph constants): the documented jax2tf pattern, and a small graph.
  module.weights = tf.nest.map_structure(lambda x: tf.Variable(np.asarray(x), trainable=False),
                                         jax.device_get(variables))
  signature = [tf.TensorSpec((None,) + s.shape[1:], tf.dtypes.as_dtype(s.dtype), name=n)
               for n, s in zip(INPUT_NAMES, _input_specs(config, 1))]

  @tf.function(autograph=False, input_signature=signature)
  def serving_default(*inputs):
    return dict(zip(names, converted(module.weights, *inputs)))
  module.serving_default = serving_default
  with export_friendly_topk():
    concrete = serving_default.get_concrete_function()
  tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def run_savedmodel(path: str, examples: dict) -> dict[str, np.ndarray]:
  import tensorflow as tf
  signature = tf.saved_model.load(path).signatures["serving_default"]
  outputs = signature(**{name: tf.constant(examples[name]) for name in INPUT_NAMES})
  return {name: value.numpy() for name, value in outputs.items()}


# ----------------------------------------------------------------------------- parity


def compare(config: ml_collections.ConfigDict, reference: dict, outputs: dict) -> dict:
  """Max |delta| of the probabilities (and of each output), agreement of predicted classes and frames."""
  report = {"per_output": {}, "class_agreement": {}}
  for name, expected in reference.items():
    got = np.asarray(outputs[name])
    if got.shape != expected.shape:
      raise ParityError(f"Output {name}: shape {got.shape} from the export, {expected.shape} from JAX.")
    report["per_output"][name] = float(np.max(np.abs(got.astype(np.float64) - expected)))
  tasks = tuple(config.model.tasks)
  report["max_abs_delta"] = max(report["per_output"][f"probs_{t}"] for t in tasks)
  for task in tasks:
    agree = np.argmax(outputs[f"probs_{task}"], -1) == np.argmax(reference[f"probs_{task}"], -1)
    report["class_agreement"][task] = float(np.mean(agree))
  report["selected_indices_agreement"] = float(np.mean(np.all(
      outputs["selected_indices"] == reference["selected_indices"], axis=-1)))
  score_scale = max(1.0, float(np.max(np.abs(reference["frame_scores"]))))
  report["passed_fp32_bar"] = bool(
      report["max_abs_delta"] <= FP32_TOLERANCE
      and report["per_output"]["frame_scores"] <= FP32_TOLERANCE * score_scale
      and all(v == 1.0 for v in report["class_agreement"].values())
      and report["selected_indices_agreement"] == 1.0)
  return report


def _versions() -> dict[str, str]:
  from importlib import metadata
  installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
  return {p: installed[p] for p in ("jax", "jax2onnx", "onnxruntime", "tensorflow-cpu", "ai-edge-litert")
          if p in installed}


def export_model(config: ml_collections.ConfigDict, variables: Any, out_dir: str,
                 formats: Sequence[str] = FORMATS, quantize: Sequence[str] = ("none",),
                 examples: dict | None = None, *, tflite_batch_size: int = 1,
                 classes: dict[str, Sequence[str]] | None = None, source: dict | None = None) -> dict:
  """Writes the exports, metadata.json and parity.json into `out_dir`; returns the parity dict.

  `quantize` applies to TFLite (model.tflite, model_fp16.tflite, model_int8.tflite); ONNX and SavedModel
  are fp32. Raises ParityError when an fp32 export misses the bar (written to parity.json first).
  """
  unknown = sorted(set(formats) - set(FORMATS)) + sorted(set(quantize) - set(QUANTIZATIONS))
  if unknown:
    raise ValueError(f"Unknown format or quantization {unknown}; use formats from {FORMATS} and "
                     f"quantize from {QUANTIZATIONS}.")
  os.makedirs(out_dir, exist_ok=True)
  variables = jax.device_get(variables)
  examples = examples if examples is not None else make_examples(config)
  reference = jax_reference(config, variables, examples)
  names = output_names(config)
  jobs = []  # (key, file name, writer, runner, fp32)
  if "onnx" in formats:
    jobs.append(("onnx", "model.onnx", export_onnx, run_onnx, True))
  if "tflite" in formats:
    for q in quantize:
      file_name = "model.tflite" if q == "none" else f"model_{q}.tflite"
      writer = lambda c, v, p, q=q: export_tflite(c, v, p, q, tflite_batch_size)
      jobs.append(("tflite" if q == "none" else f"tflite_{q}", file_name, writer, run_tflite, q == "none"))
  if "savedmodel" in formats:
    jobs.append(("savedmodel", "saved_model", export_savedmodel, run_savedmodel, True))

  parity = {"examples": int(len(examples["frames"])), "tolerance_fp32": FP32_TOLERANCE,
            "versions": _versions(), "formats": {}}
  failures = []
  for key, file_name, writer, runner, fp32 in jobs:
    path = os.path.join(out_dir, file_name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    started = time.perf_counter()
    writer(config, variables, path)
    exported = time.perf_counter()
    got = runner(path, examples)
    got = got if isinstance(got, dict) else dict(zip(names, got))
    report = compare(config, reference, got)
    report.update(file=file_name, bytes=_size(path), fp32=fp32, export_seconds=round(exported - started, 1),
                  run_seconds=round(time.perf_counter() - exported, 1))
    if key.startswith("tflite"):
      report["runtime"] = _tflite_interpreter(path)[1]
    parity["formats"][key] = report
    if fp32 and not report["passed_fp32_bar"]:
      failures.append(f"{key}: max |delta| {report['max_abs_delta']:.3g}, classes "
                      f"{report['class_agreement']}, frames {report['selected_indices_agreement']}")
  with open(os.path.join(out_dir, "parity.json"), "w") as f:
    json.dump(parity, f, indent=2)
  write_metadata(config, variables, out_dir, parity, tflite_batch_size, classes, source)
  if failures:
    raise ParityError("Export does not reproduce the JAX model (bar: max |delta| <= "
                      f"{FP32_TOLERANCE}, identical classes): " + "; ".join(failures)
                      + f". Details in {os.path.join(out_dir, 'parity.json')}.")
  return parity


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- metadata


def class_names(config: ml_collections.ConfigDict, best: dict | None = None) -> dict[str, list[str]]:
  """Per task: the names in eval/best.json, else config.data.classes, else mer_jax/labels.py."""
  names = {}
  for task, count in config.model.tasks.items():
    candidates = [((best or {}).get("tasks", {}).get(task) or {}).get("class_names"),
                  (config.data.get("classes") or {}).get(task), labels_lib.TASK_CLASSES.get(task)]
    found = next((list(c) for c in candidates if c and len(c) == count), None)
    if found is None:
      raise ValueError(f"No list of {count} class names for task {task!r}; set config.data.classes = "
                       f"{{{task!r}: (...)}} or add it to mer_jax/labels.py.")
    names[task] = found
  return names


def write_metadata(config, variables, out_dir, parity, tflite_batch_size=1, classes=None, source=None):
  """metadata.json (inputs, outputs, labels, preprocessing, batch policy) and tokenizer/ in `out_dir`."""
  from mer_jax import features
  from mer_jax import minilm
  data = config.data
  spec = model_lib.input_spec(config, 1)
  tokenizer_dir = os.path.join(out_dir, "tokenizer")
  os.makedirs(tokenizer_dir, exist_ok=True)
  for name in TOKENIZER_FILES:  # the files AutoTokenizer reads; not the MiniLM weights
    if (minilm.model_dir() / name).is_file():
      shutil.copy(minilm.model_dir() / name, tokenizer_dir)
  mel = features._mel_params(config)  # the exact parameters the input pipeline uses
  metadata = {
      "format_version": 1,
      "inputs": [{"name": n, "shape": ["batch"] + list(spec[n].shape[1:]),
                  "dtype": str(np.dtype(spec[n].dtype))} for n in INPUT_NAMES],
      "outputs": [{"name": n, "meaning": m} for n, m in zip(output_names(config), _output_meanings(config))],
      "labels": dict(classes) if classes else class_names(config),
      "preprocessing": {
          "num_frames": int(data.num_frames), "frame_size": int(data.frame_size), "frame_channels": 1,
          "frame_times": "t_i = (i + 0.5) * duration / T, grey uint8, face crop (Haar) else centre crop",
          "sample_rate": mel["sample_rate"], "max_audio_seconds": mel["max_seconds"],
          "audio_frames": int(spec["audio"].shape[1]),
          "log_mel": {**{k: mel[k] for k in ("num_mel_bins", "frame_length", "frame_step", "fft_length",
                                             "lower_hz", "upper_hz")}, "log_offset": features.LOG_OFFSET,
                      "function": "mer_jax.features.audio_features"},
          "max_text_length": int(data.max_text_length), "tokenizer": "tokenizer/",
          "text": "[CLS] utterance [SEP] (+ context [SEP]), padded with id 0; text_mask marks real tokens",
      },
      "batch_size": {"onnx": "dynamic", "savedmodel": "dynamic", "tflite": int(tflite_batch_size),
                     "tflite_note": "TFLite goes through XLA HLO, which has static shapes: feed exactly "
                                    "this many rows (pad and drop the extra outputs)."},
      "files": {key: report["file"] for key, report in parity["formats"].items()},
      "model": {"config": json.loads(export_config(config).model.to_json()),
                "parameters": model_lib.count_parameters(variables["params"])},
      "source": source or {"checkpoint": None},
  }
  with open(os.path.join(out_dir, "metadata.json"), "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata


def _output_meanings(config) -> list[str]:
  return [f"(batch, {n}) float32 softmax over labels[{t!r}]" for t, n in config.model.tasks.items()] + [
      f"(batch, {config.data.num_frames}) float32 text-guided score of each frame",
      f"(batch, {config.model.top_k}) int32 chosen frames, in time order",
      "(batch,) float32 in [0, 1]", "(batch,) float32 in [0, 1]"]


# ----------------------------------------------------------------------------- checkpoints and CLI


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(variables, source, best.json or None) of `step`; default: the best step, else the latest.

  Weights come from the train state the trainer saved (mer_jax/checkpoint.py); `config` must be the one
  the run was trained with (Checkpointer.restore names the fields that differ).
  """
  from mer_jax import checkpoint as checkpoint_lib
  from mer_jax import train
  workdir = os.path.abspath(os.path.expanduser(workdir))
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {directory}; train first (python launch.py --config ... "
                            f"--workdir {workdir}) or pass the workdir of a trained run.")
  best_path = os.path.join(workdir, "eval", "best.json")
  best = json.load(open(best_path)) if os.path.isfile(best_path) else None
  checkpointer = checkpoint_lib.Checkpointer(directory, config, keep=config.get("keep_checkpoints", 3),
                                             best_metric=config.get("best_metric"), asynchronous=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint yet; train longer or wait for the "
                              "first save (config.checkpoint_every_steps).")
    if step is None:
      step = best["step"] if best and best["step"] in steps else max(steps)
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; it has steps {sorted(steps)}.")
    options = train.step_options(config)
    state = checkpointer.restore(step, train.abstract_train_state(options, train.make_mesh(), config.seed))
  finally:
    checkpointer.close()
  source = {"workdir": workdir, "checkpoint_step": int(step),
            "chosen_as": "given" if best is None or step != best.get("step") else "best",
            "best": {k: best.get(k) for k in ("step", "split", "best_metric", "value")} if best else None}
  return {"params": state.params, "batch_stats": state.batch_stats}, source, best


def load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("export_config_file", path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path} not found; pass --config configs/<name>.py.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m mer_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, eval/best.json)")
  parser.add_argument("--out", required=True, help="export folder")
  parser.add_argument("--config", default="configs/default.py", help="the config the run was trained with")
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--quantize", default="none,fp16,int8", help="TFLite variants")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--tflite-batch-size", type=int, default=1)
  parser.add_argument("--examples", type=int, default=8, help="random examples for the parity check")
  args = parser.parse_args(argv)
  config = export_config(load_config(args.config))
  variables, source, best = load_checkpoint(config, args.workdir, args.step)
  parity = export_model(config, variables, args.out, args.formats.split(","), args.quantize.split(","),
                        make_examples(config, args.examples), tflite_batch_size=args.tflite_batch_size,
                        classes=class_names(config, best), source=source)
  for key, report in parity["formats"].items():
    print(f"{key:12s} {report['file']:20s} {report['bytes'] / 1e6:8.2f} MB  max|delta| "
          f"{report['max_abs_delta']:.2e}  classes {report['class_agreement']}")
  print(f"Wrote {args.out}/ (metadata.json, parity.json, tokenizer/).")
  return parity


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
