"""CPU latency of the edge model in JAX, ONNX Runtime and TFLite (fp32, int8), and its file sizes.

  python -m benchmarks.latency [--quick] [--json] [--out F] [--workdir RUN] [--threads N]

The edge model of configs/default.py (T=12 frames of 112x112, K=4) with drawn weights (or a trained
run's with --workdir) is exported to a temporary folder (mer_jax.export.exporters, which traces the reference
ops form: depthwise convs as grouped convs, no custom calls), then each runtime's median wall time of one call
is measured at batch 1 and batch 32 after warm-up, with the sessions that mer_jax.tools.predict uses, plus
batch 1 at 1 thread. JAX runs the ops form `mer_jax.ops.choose` picks for config.model.ops (named in the
results). TFLite has a static batch (XLA HLO), so batch 32 is a second export; --quick
skips those two exports and takes fewer repetitions (the model's jit and ONNX export still dominate).
Writes benchmarks/results/latency.json (or --out). The load average is recorded: on a shared machine the
numbers include the other jobs' interference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

from configs import default
from mer_jax.export import contract
from mer_jax.export import exporters as export
from mer_jax.export import parity
from mer_jax.export import runtimes
from mer_jax import ops as ops_lib
from mer_jax.training import host_memory
from mer_jax.models import emotion_model as model_lib

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
TARGETS_MS = {"onnxruntime_batch1_ms": 10.0, "tflite_batch1_ms": 15.0, "jax_batch1_ms": 20.0}


def drawn_variables(config, seed: int = 0):
  """Weights of the right shapes and plausible scale, without compiling the model's init."""
  model = model_lib.EmotionModel(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), model_lib.zeros_batch(config, 1), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1])
    if "var" in name:  # BatchNorm variances stay positive
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    if "scale" in name:
      return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
    return (rng.normal(size=leaf.shape) / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def median_ms(fn, warmup: int, reps: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return round(float(np.median(times)) * 1e3, 3)


def _jax_call(config, variables, examples):
  forward = export._jitted_forward(ml_collections.FrozenConfigDict(contract.export_config(config).model))
  args = [jax.device_put(examples[name]) for name in contract.INPUT_NAMES]
  variables = jax.device_put(variables)
  return lambda: jax.block_until_ready(forward(variables, *args))


def _tflite_call(path, examples, threads):
  interpreter, _ = runtimes.tflite_interpreter(path, threads)
  details = {d["name"]: d for d in interpreter.get_input_details()}
  for name, detail in details.items():  # inputs set once: the call itself is what is timed
    interpreter.set_tensor(detail["index"], np.ascontiguousarray(examples[name]))
  return interpreter.invoke


def run(
  quick: bool = False, workdir: str | None = None, threads: int | None = None, ort_optimization: str = "all"
) -> dict:
  config = contract.export_config(default.get_config())
  if workdir:
    from mer_jax.training import runs

    run = runs.load_run(workdir)
    config, variables = contract.export_config(run.config), run.variables
  else:
    variables = drawn_variables(config)
  variables = jax.device_get(variables)
  threads = threads or os.cpu_count() or 1
  warmup, reps1, reps32 = (2, 10, 3) if quick else (5, 50, 10)
  batches = {1: parity.make_examples(config, 1), 32: parity.make_examples(config, 32, seed=1)}
  result = {
    "meta": {
      "config": "configs/default.py (edge)" if not workdir else workdir,
      "num_frames": int(config.data.num_frames),
      "frame_size": int(config.data.frame_size),
      "top_k": int(config.model.top_k),
      "quick": quick,
      "threads": threads,
      "ort_graph_optimization": ort_optimization,
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "load_average_start": os.getloadavg()[0],
      "malloc": host_memory.describe(),
      "jax_ops_form": ops_lib.choose(config.model.ops, dtype=config.model.dtype).name,
      "weights": "checkpoint" if workdir else "drawn (shapes of the model's init)",
    }
  }
  seconds = {}
  with tempfile.TemporaryDirectory() as tmp:
    for batch, examples in batches.items():
      started = time.perf_counter()
      call = _jax_call(config, variables, examples)
      call()  # compile outside the timing
      seconds[f"jax_compile_batch{batch}"] = time.perf_counter() - started
      result[f"jax_batch{batch}_ms"] = median_ms(call, warmup, reps1 if batch == 1 else reps32)

    started = time.perf_counter()
    onnx_path = os.path.join(tmp, "model.onnx")
    export.export_onnx(config, variables, onnx_path)
    seconds["onnx_export"] = time.perf_counter() - started
    session = runtimes.onnx_session(onnx_path, threads, ort_optimization)
    for batch, examples in batches.items():
      feed = {name: examples[name] for name in contract.INPUT_NAMES}
      result[f"onnxruntime_batch{batch}_ms"] = median_ms(
        lambda: session.run(None, feed), warmup, reps1 if batch == 1 else reps32
      )
    result["onnx_mb"] = round(os.path.getsize(onnx_path) / 1e6, 3)
    sweep = result["meta"]["batch1_ms_by_threads"] = {"onnxruntime": {}, "tflite": {}, "tflite_int8": {}}
    feed = {name: batches[1][name] for name in contract.INPUT_NAMES}
    for count in sorted({1, threads}):  # on a loaded machine one thread can beat two
      single = runtimes.onnx_session(onnx_path, count, ort_optimization)
      sweep["onnxruntime"][count] = median_ms(lambda: single.run(None, feed), warmup, reps1)

    for quantize, key in (("none", "tflite"), ("int8", "tflite_int8")):
      for batch in (1,) if quick else (1, 32):
        started = time.perf_counter()
        path = os.path.join(tmp, f"{key}_b{batch}.tflite")
        export.export_tflite(config, variables, path, quantize, batch)
        seconds[f"{key}_export_batch{batch}"] = time.perf_counter() - started
        call = _tflite_call(path, batches[batch], threads)
        result[f"{key}_batch{batch}_ms"] = median_ms(call, warmup, reps1 if batch == 1 else reps32)
        result[f"{key}_mb"] = round(os.path.getsize(path) / 1e6, 3)
        if batch == 1:
          for count in sorted({1, threads}):
            sweep[key][count] = median_ms(_tflite_call(path, batches[1], count), warmup, reps1)
  result["meta"]["setup_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
  result["meta"]["load_average_end"] = os.getloadavg()[0]
  result["meta"]["targets_ms"] = TARGETS_MS
  return result


def table(result: dict) -> str:
  lines = [f"{'runtime':14s} {'batch 1 ms':>11s} {'batch 32 ms':>12s} {'size MB':>8s}  target (batch 1)"]
  for name, key, size in (
    ("JAX jit", "jax", None),
    ("ONNX Runtime", "onnxruntime", "onnx_mb"),
    ("TFLite fp32", "tflite", "tflite_mb"),
    ("TFLite int8", "tflite_int8", "tflite_int8_mb"),
  ):
    b1, b32 = result.get(f"{key}_batch1_ms"), result.get(f"{key}_batch32_ms")
    target = TARGETS_MS.get(f"{key}_batch1_ms")
    lines.append(
      f"{name:14s} {b1:11.2f} {b32 if b32 is not None else float('nan'):12.2f} "
      f"{result.get(size, float('nan')) if size else float('nan'):8.2f}  "
      + (f"<= {target:.0f} ms: {'met' if b1 <= target else 'missed'}" if target else "")
    )
  meta = result["meta"]
  lines.append(f"JAX ops form: {meta.get('jax_ops_form', 'n/a')}; exports: reference")
  lines.append(f"batch 1 ms by threads: {json.dumps(meta['batch1_ms_by_threads'])}")
  lines.append(
    f"threads {meta['threads']}, load average {meta['load_average_start']:.1f} -> "
    f"{meta['load_average_end']:.1f} on {meta['cpu_count']} CPUs (numbers include other jobs' load)"
  )
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="batch-1 TFLite only, few repetitions")
  parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/latency.json)")
  parser.add_argument("--workdir", default=None, help="a trained run's weights and config")
  parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime / TFLite threads (default: all CPUs)")
  parser.add_argument("--ort-optimization", default="all", choices=("none", "basic", "extended", "all"))
  args = parser.parse_args(argv)
  result = run(args.quick, args.workdir, args.threads, args.ort_optimization)
  out = args.out or os.path.join(RESULTS_DIR, "latency.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result) if args.json else table(result))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
