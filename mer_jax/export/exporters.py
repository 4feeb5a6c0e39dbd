"""Edge export: ONNX, TFLite (fp32, fp16, int8) and SavedModel, each run back and compared with JAX.

Routes (why: docs/DEPENDENCIES.md):
  ONNX        jax2onnx `to_onnx`, dynamic batch 'B'; run back with onnxruntime.
  TFLite      JAX -> XLA HLO -> TFLite builtins with TF's `TFLiteConverter.experimental_from_jax`; HLO
              has static shapes, so the batch size is fixed (`tflite_batch_size`, written in metadata).
              Run back with the LiteRT interpreter (ai-edge-litert; TF's own when it is missing).
  SavedModel  jax2tf (native StableHLO in an XlaCallModule op), dynamic batch; run back with TF.

The exported function takes the 7 model inputs of the batch contract (INPUT_NAMES) and returns
`output_names(config)`: probs_<task> (B, C), frame_scores (B, T), selected_indices (B, K) int32,
reliability_video / reliability_audio (B,), gate (B, D). metadata.json (export_metadata.py) says how a raw
clip becomes those inputs (predict.py). Parity runs on N real examples of the eval split when its prepared
data is found (else random inputs; parity.json says which); --accuracy-split SPLIT scores every export
and JAX on a whole split (parity.json "accuracy").

  python -m mer_jax.export --workdir runs/demo --out export/demo [--config configs/demo.py]
      [--formats onnx,tflite,savedmodel] [--quantize none,fp16,int8] [--step N] [--accuracy-split dev]
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

from mer_jax.export import metadata as export_metadata
from mer_jax.models import mobilenet_v3
from mer_jax.models import emotion_model as model_lib
from mer_jax.tools import predict
from mer_jax.models import frame_selector as topk

INPUT_NAMES = ("frames", "audio", "audio_mask", "text_ids", "text_mask", "has_video", "has_audio")
FORMATS = ("onnx", "tflite", "savedmodel")
QUANTIZATIONS = ("none", "fp16", "int8")
FP32_TOLERANCE = 1e-4  # max |delta| of an fp32 export against JAX (probabilities; frame scores relative)
# int8 export: embedding tables at least this large are stored as int8 rows + one fp32 scale per row. The
# TFLite dynamic-range quantizer leaves GATHER tables in fp32, and the edge model's 30522 x 128 token table
# alone is 15.6 MB in fp32 (3.9 MB in int8).
INT8_EMBEDDING_MIN_SIZE = 1 << 16
SIGNAL_NAMES = ("frame_scores", "selected_indices", "reliability_video", "reliability_audio", "gate")


# Kept here too: explain.py, report.py, tests and benchmarks call them as export.*.
class_names, make_examples = export_metadata.class_names, export_metadata.make_examples


class ParityError(RuntimeError):
  """An fp32 export does not reproduce the JAX model (too large a delta or a different predicted class)."""


def output_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(f"probs_{task}" for task in config.model.tasks) + SIGNAL_NAMES


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
  time order by a cumulative sum. TF 2.21's StableHLO reader knows neither the composite jax lowers
  top_k to (SavedModel) nor HLO sort (TFLite); T is ~12, so the T x T comparison costs nothing.
  """
  num_frames = scores.shape[-1]
  positions = jnp.arange(num_frames)
  beats = (scores[:, None, :] > scores[:, :, None]) | (
      (scores[:, None, :] == scores[:, :, None]) & (positions[None, None, :] < positions[None, :, None]))
  chosen = jnp.sum(beats, axis=-1) < k  # (B, T)
  slot = jnp.cumsum(chosen.astype(jnp.int32), axis=-1) - 1
  one_hot = chosen[:, None, :] & (slot[:, None, :] == jnp.arange(k)[None, :, None])  # (B, K, T)
  return jnp.sum(one_hot * positions, axis=-1).astype(jnp.int32)


def grouped_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """`mobilenet_v3.depthwise_conv` as one grouped conv: what edge runtimes have fast kernels for.

  The shifted-slice form (fast for XLA CPU training) becomes ~50 Slice/Mul/Add nodes per layer in ONNX
  and TFLite; as a grouped conv, ONNX Runtime ran the edge model 3.2x and TFLite 4x faster (2-core CPU).
  """
  return mobilenet_v3.plain_conv(x, kernel, stride, pad, groups=x.shape[-1])


@contextlib.contextmanager
def export_friendly_ops():
  """While tracing an export: top-k without sort (its forward value), depthwise convs as grouped convs,
  grey-input convs as plain convs, the frame gather as an einsum (not the CPU's FFI kernel).

  Export needs no gradient, and a fresh plain function (not the custom_vjp, whose traced forward jax may
  cache) guarantees the sort-free version is the one traced. Both compute the same values (test_export).
  """
  originals = (topk.straight_through_topk, mobilenet_v3.depthwise_conv, mobilenet_v3.single_channel_conv,
               topk.gather_frames)

  def forward_only(scores, k, temperature):
    del temperature
    return jax.nn.one_hot(sort_free_topk_indices(scores, k), scores.shape[-1], dtype=scores.dtype)

  topk.straight_through_topk, mobilenet_v3.depthwise_conv = forward_only, grouped_depthwise_conv
  mobilenet_v3.single_channel_conv = mobilenet_v3.plain_conv
  topk.gather_frames = topk.einsum_gather_frames
  try:
    yield
  finally:
    (topk.straight_through_topk, mobilenet_v3.depthwise_conv, mobilenet_v3.single_channel_conv,
     topk.gather_frames) = originals


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
      explanation[name] for name in SIGNAL_NAMES)


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


# ----------------------------------------------------------------------------- writers and runners


def _input_specs(config, batch):
  spec = model_lib.input_spec(config, 1)
  return [jax.ShapeDtypeStruct((batch,) + spec[name].shape[1:], spec[name].dtype) for name in INPUT_NAMES]


def export_onnx(config, variables, path: str) -> None:
  import onnx
  from jax2onnx import to_onnx
  batch, = jax.export.symbolic_shape("B")
  serve = serving_function(config, variables)
  with export_friendly_ops():
    proto = to_onnx(serve, _input_specs(config, batch), model_name="mer_jax",
                    input_names=list(INPUT_NAMES), output_names=list(output_names(config)))
  # jax2onnx's intermediate shape annotations can carry NHWC/NCHW mix-ups that onnxruntime only warns
  # about; the runtime infers shapes itself, so they are dropped.
  del proto.graph.value_info[:]
  onnx.save(proto, path)


def run_onnx(path: str, examples: dict) -> list[np.ndarray]:
  """Outputs in `output_names` order; the session predict.py uses."""
  return predict.run_onnx_session(predict.onnx_session(path), examples)


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
    with export_friendly_ops():
      flatbuffer = converter.convert()
  except Exception as error:  # TF hides the cause behind "Failed to convert the given Jax function to hlo."
    raise RuntimeError(
        f"TFLite export failed in tensorflow {tf.__version__}'s TFLiteConverter.experimental_from_jax "
        f"(JAX -> XLA HLO -> TFLite, the only JAX -> TFLite route: jax2tf output is an XlaCallModule op "
        f"the TFLite converter rejects): {error} (cause: {error.__cause__ or error.__context__!r}). "
        "ONNX and SavedModel do not need it: pass --formats onnx,savedmodel.") from error
  with open(path, "wb") as f:
    f.write(flatbuffer)


def run_tflite(path: str, examples: dict) -> list[np.ndarray]:
  """Runs the fixed-batch model over `examples` in chunks (predict.run_tflite_interpreter)."""
  return predict.run_tflite_interpreter(predict.tflite_interpreter(path)[0], examples)


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
  # Saving traces the function again, so the export-friendly ops stay in place for that too.
  with export_friendly_ops():
    concrete = serving_default.get_concrete_function()
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def loaded_runner(key: str, path: str, names: Sequence[str]) -> Callable[[dict], dict]:
  """The export `key` at `path`, loaded once: fn(inputs) -> {output name: array}."""
  if key == "savedmodel":
    import tensorflow as tf
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return lambda examples: {name: value.numpy() for name, value in signature(
        **{name: tf.constant(examples[name]) for name in INPUT_NAMES}).items()}
  if key == "onnx":
    session = predict.onnx_session(path)
    return lambda examples: dict(zip(names, predict.run_onnx_session(session, examples)))
  interpreter = predict.tflite_interpreter(path)[0]
  return lambda examples: dict(zip(names, predict.run_tflite_interpreter(interpreter, examples)))


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
                 classes: dict[str, Sequence[str]] | None = None, source: dict | None = None,
                 examples_source: str | None = None, clip_config: tuple[dict, str] | None = None,
                 accuracy_data: tuple[str, list] | None = None) -> dict:
  """Writes the exports, metadata.json and parity.json into `out_dir`; returns the parity dict.

  `quantize` applies to TFLite (model.tflite, model_fp16.tflite, model_int8.tflite); ONNX and SavedModel
  are fp32. `examples_source` says in parity.json where `examples` came from. `accuracy_data`: (split,
  batches of the batch contract) on which every export and JAX are scored (parity.json "accuracy").
  Raises ParityError when an fp32 export misses the bar (written to parity.json first).
  """
  unknown = sorted(set(formats) - set(FORMATS)) + sorted(set(quantize) - set(QUANTIZATIONS))
  if unknown:
    raise ValueError(f"Unknown format or quantization {unknown}; use formats from {FORMATS} and "
                     f"quantize from {QUANTIZATIONS}.")
  os.makedirs(out_dir, exist_ok=True)
  variables = jax.device_get(variables)
  if examples is None:
    examples, examples_source = make_examples(config), "random inputs (make_examples)"
  reference = jax_reference(config, variables, examples)
  names = output_names(config)
  jobs = []  # (key, file name, writer, fp32)
  if "onnx" in formats:
    jobs.append(("onnx", "model.onnx", export_onnx, True))
  if "tflite" in formats:
    for q in quantize:
      file_name = "model.tflite" if q == "none" else f"model_{q}.tflite"
      writer = lambda c, v, p, q=q: export_tflite(c, v, p, q, tflite_batch_size)
      jobs.append(("tflite" if q == "none" else f"tflite_{q}", file_name, writer, q == "none"))
  if "savedmodel" in formats:
    jobs.append(("savedmodel", "saved_model", export_savedmodel, True))

  parity = {"examples": int(len(examples["frames"])),
            "examples_source": examples_source or "given by the caller",
            "tolerance_fp32": FP32_TOLERANCE, "versions": _versions(), "formats": {}}
  failures, runners = [], {}
  for key, file_name, writer, fp32 in jobs:
    path = os.path.join(out_dir, file_name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    started = time.perf_counter()
    writer(config, variables, path)
    exported = time.perf_counter()
    runners[key] = loaded_runner(key, path, names)
    got = runners[key](examples)
    report = compare(config, reference, got)
    report.update(file=file_name, bytes=_size(path), fp32=fp32, export_seconds=round(exported - started, 1),
                  run_seconds=round(time.perf_counter() - exported, 1))
    if key.startswith("tflite"):
      report["runtime"] = predict.tflite_interpreter(path)[1]
    parity["formats"][key] = report
    if fp32 and not report["passed_fp32_bar"]:
      failures.append(f"{key}: max |delta| {report['max_abs_delta']:.3g}, classes "
                      f"{report['class_agreement']}, frames {report['selected_indices_agreement']}")
  if accuracy_data is not None:
    parity["accuracy"] = export_metadata.accuracy_report(config, variables, runners, *accuracy_data)
  with open(os.path.join(out_dir, "parity.json"), "w") as f:
    json.dump(parity, f, indent=2)
  export_metadata.write_metadata(config, variables, out_dir, parity, tflite_batch_size, classes, source,
                                 clip_config)
  if failures:
    raise ParityError("Export does not reproduce the JAX model (bar: max |delta| <= "
                      f"{FP32_TOLERANCE}, identical classes): " + "; ".join(failures)
                      + f". Details in {os.path.join(out_dir, 'parity.json')}.")
  return parity


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- checkpoints and CLI


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(variables, source, best.json or None) of `step`; default: the best step, else the latest.

  Weights come from the train state the trainer saved (mer_jax/training/checkpoint.py); `config` must be the one
  the run was trained with (Checkpointer.restore names the fields that differ).
  """
  from mer_jax.training import checkpoint as checkpoint_lib
  from mer_jax.training import train
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
  parser.add_argument("--config", default=None,
                      help="the config the run was trained with (default: WORKDIR/config.json)")
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--quantize", default="none,fp16,int8", help="TFLite variants")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--tflite-batch-size", type=int, default=1)
  parser.add_argument("--examples", type=int, default=8, help="eval examples for the parity check")
  parser.add_argument("--accuracy-split", default=None,
                      help="score every export and JAX on this whole prepared split (e.g. dev)")
  args = parser.parse_args(argv)
  from mer_jax.training import checkpoint as checkpoint_lib
  from mer_jax.training import train
  config = export_config(load_config(args.config) if args.config else checkpoint_lib.load_run_config(args.workdir))
  variables, source, best = load_checkpoint(config, args.workdir, args.step)
  data_dir = train.resolve_data_dir(config, args.workdir)
  examples, examples_source = export_metadata.parity_examples(config, data_dir, args.examples)
  accuracy_data = args.accuracy_split and (
      args.accuracy_split, export_metadata.split_batches(config, data_dir, args.accuracy_split))
  parity = export_model(config, variables, args.out, args.formats.split(","), args.quantize.split(","),
                        examples, tflite_batch_size=args.tflite_batch_size,
                        classes=export_metadata.class_names(config, best), source=source,
                        examples_source=examples_source, accuracy_data=accuracy_data or None,
                        clip_config=export_metadata.clip_read_config(config, data_dir))
  for key, report in parity["formats"].items():
    print(f"{key:12s} {report['file']:20s} {report['bytes'] / 1e6:8.2f} MB  max|delta| "
          f"{report['max_abs_delta']:.2e}  classes {report['class_agreement']}")
  for key, entry in parity.get("accuracy", {}).get("formats", {}).items():
    print(f"{key:12s} on {parity['accuracy']['split']}: " + ", ".join(
        f"{task} acc {e['accuracy']:.4f} ({e['accuracy_change']:+.4f} vs JAX), wF1 {e['weighted_f1']:.4f} "
        f"({e['weighted_f1_change']:+.4f})" for task, e in entry.items()))
  print(f"Wrote {args.out}/ (metadata.json, parity.json, tokenizer/).")
  return parity


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
