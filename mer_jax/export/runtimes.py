"""Running an exported model: ONNX Runtime and TFLite (LiteRT) sessions, and SavedModel through TF.

Shared by the export's parity check (`mer_jax.export.exporters`), prediction on an exported file
(`mer_jax.tools.predict`) and the latency benchmark, so all of them run an export the same way. Imports
no JAX: an edge prediction must not need it. Inputs are dicts by `contract.INPUT_NAMES`; outputs come
back in the export's `contract.output_names` order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import numpy as np

from mer_jax.export import contract


def import_tensorflow_without_jax():
  """`import tensorflow` that leaves JAX unimported.

  TF 2.21's tflite util runs `from jax import jit` when JAX is installed (slow, and what an edge
  prediction must not need); blocked for that import only, TF records JAX as missing and goes on.
  """
  if "tensorflow" not in sys.modules and "jax" not in sys.modules:
    sys.modules["jax"] = None  # makes `import jax` raise ImportError
    try:
      import tensorflow
    finally:
      if sys.modules.get("jax", 0) is None:
        del sys.modules["jax"]
  import tensorflow

  return tensorflow


# ----------------------------------------------------------------------------- ONNX Runtime


def onnx_session(path: str, threads: int = 0, optimization: str = "all"):
  """onnxruntime CPU session; threads 0 = onnxruntime's choice (one per physical core)."""
  import onnxruntime as ort

  options = ort.SessionOptions()
  options.log_severity_level = 3
  options.intra_op_num_threads = int(threads)
  options.graph_optimization_level = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
  }[optimization]
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx_session(session, inputs: dict) -> list[np.ndarray]:
  """Outputs in the export's order for `inputs` (any batch size: the ONNX batch axis is dynamic)."""
  return session.run(None, {d.name: inputs[d.name] for d in session.get_inputs()})


def run_onnx(path: str, examples: dict) -> list[np.ndarray]:
  """The .onnx file at `path` on `examples`, in a fresh session: outputs in the export's order."""
  return run_onnx_session(onnx_session(path), examples)


# ----------------------------------------------------------------------------- TFLite


def tflite_interpreter(path: str, threads: int | None = None):
  """(interpreter with tensors allocated, runtime name): LiteRT's, else TF's (deprecated, in TF 2.21)."""
  try:
    from ai_edge_litert.interpreter import Interpreter

    runtime = "ai-edge-litert"
  except ImportError:
    Interpreter = import_tensorflow_without_jax().lite.Interpreter
    runtime = "tf.lite"
  interpreter = Interpreter(model_path=path, num_threads=threads)
  interpreter.allocate_tensors()
  return interpreter, runtime


def run_tflite_interpreter(interpreter, inputs: dict) -> list[np.ndarray]:
  """Runs the fixed-batch model over `inputs` in chunks (the last one padded with copies of row 0)."""
  details = {d["name"]: d for d in interpreter.get_input_details()}
  batch = int(details["frames"]["shape"][0])
  total = len(inputs["frames"])
  chunks = []
  for start in range(0, total, batch):
    rows = np.arange(start, start + batch)
    rows = np.where(rows < total, rows, 0)
    for name, detail in details.items():
      interpreter.set_tensor(detail["index"], np.ascontiguousarray(inputs[name][rows]))
    interpreter.invoke()
    chunks.append([interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()])
  return [np.concatenate(parts)[:total] for parts in zip(*chunks)]


def run_tflite(path: str, examples: dict) -> list[np.ndarray]:
  """The .tflite file at `path` on `examples` (in chunks of its fixed batch): outputs in the export's order."""
  return run_tflite_interpreter(tflite_interpreter(path)[0], examples)


# ----------------------------------------------------------------------------- any export


def loaded_runner(key: str, path: str, names: Sequence[str]) -> Callable[[dict], dict]:
  """The export `key` ('onnx', 'savedmodel', 'tflite*') at `path`, loaded once: fn(inputs) -> {name: array}."""
  if key == "savedmodel":
    tf = import_tensorflow_without_jax()
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return lambda examples: {
      name: value.numpy()
      for name, value in signature(**{name: tf.constant(examples[name]) for name in contract.INPUT_NAMES}).items()
    }
  if key == "onnx":
    session = onnx_session(path)
    return lambda examples: dict(zip(names, run_onnx_session(session, examples)))
  interpreter = tflite_interpreter(path)[0]
  return lambda examples: dict(zip(names, run_tflite_interpreter(interpreter, examples)))
