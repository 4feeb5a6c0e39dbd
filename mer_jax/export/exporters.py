"""Edge export: ONNX, TFLite (fp32, fp16, int8) and SavedModel, each run back and compared with JAX.

Routes (why: docs/DEPENDENCIES.md):
  ONNX        jax2onnx `to_onnx`, dynamic batch 'B'; run back with onnxruntime.
  TFLite      JAX -> XLA HLO -> TFLite builtins with TF's `TFLiteConverter.experimental_from_jax`; HLO
              has static shapes, so the batch size is fixed (`tflite_batch_size`, written in metadata).
              Run back with the LiteRT interpreter (ai-edge-litert; TF's own when it is missing).
  SavedModel  jax2tf (native StableHLO in an XlaCallModule op), dynamic batch; run back with TF.

The exported function takes the 7 model inputs of the batch contract (contract.INPUT_NAMES) and returns
`contract.output_names(config)`: probs_<task> (B, C), frame_scores (B, T), selected_indices (B, K) int32,
reliability_video / reliability_audio (B,), gate (B, D). metadata.json (export/metadata.py) says how a raw
clip becomes those inputs (tools/predict.py). Parity (export/parity.py) runs on N real examples of the eval
split when its prepared data is found (else random inputs; parity.json says which); --accuracy-split SPLIT
scores every export and JAX on a whole split (parity.json "accuracy"). The exports are run back by
export/runtimes.py, the runtimes prediction uses.

  python -m mer_jax.export --workdir runs/demo --out export/demo [--config configs/demo.py]
      [--formats onnx,tflite,savedmodel] [--quantize none,fp16,int8] [--step N] [--accuracy-split dev]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

from mer_jax import errors
from mer_jax import ops as ops_lib
from mer_jax import storage
from mer_jax import tools
from mer_jax.export import metadata as export_metadata
from mer_jax.export import parity as parity_lib
from mer_jax.export import runtimes
from mer_jax.export.contract import INPUT_NAMES, SIGNAL_NAMES, export_config, output_names
from mer_jax.models import emotion_model as model_lib
from mer_jax.tools import progress

FORMATS = ("onnx", "tflite", "savedmodel")
QUANTIZATIONS = ("none", "fp16", "int8")
# int8 export: embedding tables at least this large are stored as int8 rows + one fp32 scale per row. The
# TFLite dynamic-range quantizer leaves GATHER tables in fp32, and the edge model's 30522 x 128 token table
# alone is 15.6 MB in fp32 (3.9 MB in int8).
INT8_EMBEDDING_MIN_SIZE = 1 << 16


# ----------------------------------------------------------------------------- the exported function


def _int8_embedding_interceptor(next_fun, args, kwargs, context):
  """nn.Embed lookups in large tables -> int8 rows (gathered) x per-row fp32 scale."""
  module = context.module
  if (
    not isinstance(module, nn.Embed)
    or context.method_name != "__call__"
    or module.num_embeddings * module.features < INT8_EMBEDDING_MIN_SIZE
  ):
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
    explanation[name] for name in SIGNAL_NAMES
  )


def serving_function(
  config: ml_collections.ConfigDict, variables: Any, *, int8_embeddings: bool = False
) -> Callable[..., tuple]:
  """fn(*inputs in INPUT_NAMES order) -> outputs in `output_names` order; weights are closed over. Traced with
  the reference ops form: one grouped conv per depthwise layer, plain convs, a sort-free top-k and the einsum
  frame gather are what edge runtimes have kernels for (no custom calls, no sort)."""
  config = export_config(config)
  model, tasks = model_lib.EmotionModel(config.model, ops=ops_lib.REFERENCE), tuple(config.model.tasks)

  def serve(*inputs):
    interceptor = nn.intercept_methods(_int8_embedding_interceptor) if int8_embeddings else (contextlib.nullcontext())
    with interceptor:
      return _forward(model, tasks, variables, inputs)

  return serve


@functools.lru_cache(maxsize=4)
def _jitted_forward(model_config: ml_collections.FrozenConfigDict):
  model, tasks = model_lib.for_this_host(model_config), tuple(model_config.tasks)
  # Weights are arguments, not closed-over constants: XLA would fold them into the program (slow to
  # compile), and one compiled program then serves every checkpoint of a config.
  return jax.jit(lambda variables, *inputs: _forward(model, tasks, variables, inputs))


def jax_reference(config: ml_collections.ConfigDict, variables: Any, examples: dict) -> dict[str, np.ndarray]:
  """The JAX model as this host trains and serves it (the ops form `config.model.ops` chooses here, not the
  reference form the exports trace) on `examples`: name -> array."""
  config = export_config(config)
  forward = _jitted_forward(ml_collections.FrozenConfigDict(config.model))
  outputs = forward(variables, *[examples[name] for name in INPUT_NAMES])
  return dict(zip(output_names(config), jax.device_get(outputs)))


# ----------------------------------------------------------------------------- writers


def _input_specs(config, batch):
  spec = model_lib.input_spec(config, 1)
  return [jax.ShapeDtypeStruct((batch,) + spec[name].shape[1:], spec[name].dtype) for name in INPUT_NAMES]


def export_onnx(config, variables, path: str) -> None:
  import onnx
  from jax2onnx import to_onnx

  (batch,) = jax.export.symbolic_shape("B")
  serve = serving_function(config, variables)
  proto = to_onnx(
    serve,
    _input_specs(config, batch),
    model_name="mer_jax",
    input_names=list(INPUT_NAMES),
    output_names=list(output_names(config)),
  )
  # jax2onnx's intermediate shape annotations can carry NHWC/NCHW mix-ups that onnxruntime only warns
  # about; the runtime infers shapes itself, so they are dropped.
  del proto.graph.value_info[:]
  onnx.save(proto, path)


def export_tflite(config, variables, path: str, quantize: str = "none", batch_size: int = 1) -> None:
  """fp32 / fp16 (weights stored in fp16) / int8 (dynamic range: int8 weights, fp32 activations)."""
  import tensorflow as tf

  fn = serving_function(config, variables, int8_embeddings=quantize == "int8")
  placeholders = [
    (name, jnp.zeros(spec.shape, spec.dtype)) for name, spec in zip(INPUT_NAMES, _input_specs(config, batch_size))
  ]
  try:
    converter = tf.lite.TFLiteConverter.experimental_from_jax([fn], [placeholders])
    if quantize in ("fp16", "int8"):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "fp16":
      converter.target_spec.supported_types = [tf.float16]
    flatbuffer = converter.convert()
  except Exception as error:  # TF hides the cause behind "Failed to convert the given Jax function to hlo."
    raise RuntimeError(
      f"TFLite export failed in tensorflow {tf.__version__}'s TFLiteConverter.experimental_from_jax "
      f"(JAX -> XLA HLO -> TFLite, the only JAX -> TFLite route: jax2tf output is an XlaCallModule op "
      f"the TFLite converter rejects): {error} (cause: {error.__cause__ or error.__context__!r}). "
      "ONNX and SavedModel do not need it: pass --formats onnx,savedmodel."
    ) from error
  with open(path, "wb") as f:
    f.write(flatbuffer)


def export_savedmodel(config, variables, path: str) -> None:
  import tensorflow as tf
  from jax.experimental import jax2tf

  config = export_config(config)
  model, tasks = model_lib.EmotionModel(config.model, ops=ops_lib.REFERENCE), tuple(config.model.tasks)
  names = output_names(config)
  converted = jax2tf.convert(
    lambda v, *inputs: _forward(model, tasks, v, inputs),
    with_gradient=False,
    polymorphic_shapes=[None] + ["(b, ...)"] * len(INPUT_NAMES),
    native_serialization_platforms=("cpu",),
  )
  module = tf.Module()
  # Weights as variables (not graph constants): the documented jax2tf pattern, and a small graph.
  module.weights = tf.nest.map_structure(
    lambda x: tf.Variable(np.asarray(x), trainable=False), jax.device_get(variables)
  )
  signature = [
    tf.TensorSpec((None,) + s.shape[1:], tf.dtypes.as_dtype(s.dtype), name=n)
    for n, s in zip(INPUT_NAMES, _input_specs(config, 1))
  ]

  @tf.function(autograph=False, input_signature=signature)
  def serving_default(*inputs):
    return dict(zip(names, converted(module.weights, *inputs)))

  module.serving_default = serving_default
  concrete = serving_default.get_concrete_function()
  tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def _versions() -> dict[str, str]:
  from importlib import metadata

  installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
  return {
    p: installed[p] for p in ("jax", "jax2onnx", "onnxruntime", "tensorflow-cpu", "ai-edge-litert") if p in installed
  }


def export_model(
  config: ml_collections.ConfigDict,
  variables: Any,
  out_dir: str,
  formats: Sequence[str] = FORMATS,
  quantize: Sequence[str] = ("none",),
  examples: dict | None = None,
  *,
  tflite_batch_size: int = 1,
  classes: dict[str, Sequence[str]] | None = None,
  source: dict | None = None,
  examples_source: str | None = None,
  clip_config: tuple[dict, str] | None = None,
  accuracy_data: tuple[str, list] | None = None,
) -> dict:
  """Writes the exports, metadata.json and parity.json into `out_dir` (a folder or gs://...); returns the parity dict.

  `quantize` applies to TFLite (model.tflite, model_fp16.tflite, model_int8.tflite); ONNX and SavedModel
  are fp32. `examples_source` says in parity.json where `examples` came from. `accuracy_data`: (split,
  batches of the batch contract) on which every export and JAX are scored (parity.json "accuracy").
  Raises ParityError when an fp32 export misses the bar (written to parity.json first).
  """
  check_choices(formats, quantize)
  # The runtimes load local files (ONNX Runtime, LiteRT): a gs:// out_dir gets the files when the block ends.
  with storage.local_output_dir(out_dir) as folder:
    variables = jax.device_get(variables)
    if examples is None:
      examples, examples_source = parity_lib.make_examples(config), "random inputs (make_examples)"
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

    parity = {
      "examples": int(len(examples["frames"])),
      "examples_source": examples_source or "given by the caller",
      "tolerance_fp32": parity_lib.FP32_TOLERANCE,
      "versions": _versions(),
      "formats": {},
    }
    failures, runners = [], {}
    jobs_bar = progress.bar(jobs, total=len(jobs), description="export + parity", unit="format")
    for key, file_name, writer, fp32 in jobs_bar:
      jobs_bar.set_postfix_str(key, refresh=True)
      path = os.path.join(folder, file_name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      started = time.perf_counter()
      writer(config, variables, path)
      exported = time.perf_counter()
      runners[key] = runtimes.loaded_runner(key, path, names)
      got = runners[key](examples)
      report = parity_lib.compare(config, reference, got)
      report.update(
        file=file_name,
        bytes=_size(path),
        fp32=fp32,
        export_seconds=round(exported - started, 1),
        run_seconds=round(time.perf_counter() - exported, 1),
      )
      if key.startswith("tflite"):
        report["runtime"] = runtimes.tflite_interpreter(path)[1]
      parity["formats"][key] = report
      if fp32 and not report["passed_fp32_bar"]:
        failures.append(
          f"{key}: max |delta| {report['max_abs_delta']:.3g}, classes "
          f"{report['class_agreement']}, frames {report['selected_indices_agreement']}"
        )
    if accuracy_data is not None:
      jax_runner = lambda inputs: jax_reference(config, variables, inputs)
      parity["accuracy"] = parity_lib.accuracy_report(config, jax_runner, runners, *accuracy_data)
    with open(os.path.join(folder, "parity.json"), "w") as f:
      json.dump(parity, f, indent=2)
    export_metadata.write_metadata(config, variables, folder, parity, tflite_batch_size, classes, source, clip_config)
    if failures:
      raise parity_lib.ParityError(
        "Export does not reproduce the JAX model (bar: max |delta| <= "
        f"{parity_lib.FP32_TOLERANCE}, identical classes): "
        + "; ".join(failures)
        + f". Details in {os.path.join(out_dir, 'parity.json')}."
      )
  return parity


def check_choices(formats: Sequence[str], quantize: Sequence[str]) -> None:
  """Raises InvalidInput for a format or TFLite quantization this module does not write."""
  unknown = sorted(set(formats) - set(FORMATS)) + sorted(set(quantize) - set(QUANTIZATIONS))
  if unknown:
    raise errors.InvalidInput(
      f"Unknown format or quantization {unknown}; pass --formats from {','.join(FORMATS)} and --quantize from "
      f"{','.join(QUANTIZATIONS)} (comma-separated)."
    )


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m mer_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, eval/best.json)")
  parser.add_argument("--out", required=True, help="export folder")
  parser.add_argument(
    "--config", default=None, help="the config the run was trained with (default: WORKDIR/config.json)"
  )
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--quantize", default="none,fp16,int8", help="TFLite variants")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--tflite-batch-size", type=int, default=1)
  parser.add_argument("--examples", type=int, default=8, help="eval examples for the parity check")
  parser.add_argument(
    "--accuracy-split", default=None, help="score every export and JAX on this whole prepared split (e.g. dev)"
  )
  args = parser.parse_args(argv)
  from mer_jax.training import runs

  formats, quantize = args.formats.split(","), args.quantize.split(",")
  check_choices(formats, quantize)  # the cheap checks first: loading the run takes a while
  tools.check_output_folder(args.out)
  run = runs.load_run(args.workdir, args.config, args.step)
  config, data_dir = export_config(run.config), run.data_dir()
  accuracy_data = None
  if args.accuracy_split:
    runs.split_size(config, data_dir, args.accuracy_split, flag="--accuracy-split")
    batches = parity_lib.split_batches(config, data_dir, args.accuracy_split, show_progress=True)
    accuracy_data = (args.accuracy_split, batches)
  examples, examples_source = parity_lib.parity_examples(config, data_dir, args.examples)
  parity = export_model(
    config,
    run.variables,
    args.out,
    formats,
    quantize,
    examples,
    tflite_batch_size=args.tflite_batch_size,
    classes=export_metadata.class_names(config, run.best),
    source=run.source,
    examples_source=examples_source,
    accuracy_data=accuracy_data,
    clip_config=export_metadata.clip_read_config(config, data_dir),
  )
  for key, report in parity["formats"].items():
    print(
      f"{key:12s} {report['file']:20s} {report['bytes'] / 1e6:8.2f} MB  max|delta| "
      f"{report['max_abs_delta']:.2e}  classes {report['class_agreement']}"
    )
  for key, entry in parity.get("accuracy", {}).get("formats", {}).items():
    print(
      f"{key:12s} on {parity['accuracy']['split']}: "
      + ", ".join(
        f"{task} acc {e['accuracy']:.4f} ({e['accuracy_change']:+.4f} vs JAX), wF1 {e['weighted_f1']:.4f} "
        f"({e['weighted_f1_change']:+.4f})"
        for task, e in entry.items()
      )
    )
  print(f"Wrote {args.out}/ (metadata.json, parity.json, tokenizer/).")
  return parity


def cli(argv: Sequence[str] | None = None) -> int:
  """Entry point of `mer-jax-export` and `python -m mer_jax.export`: exit status 0 when every export matched JAX
  (a mismatch raises ParityError, with its traceback: it is a fault of the export, not of the user), 2 with one
  line on stderr for a path or value the user can fix."""
  return tools.run_command(main, argv)


if __name__ == "__main__":
  sys.exit(cli())
