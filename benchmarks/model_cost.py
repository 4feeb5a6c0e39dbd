"""Parameters, FLOPs and CPU latency of the model.

  python -m benchmarks.model_cost [--json] [--runs 20]

FLOPs come from XLA's cost analysis of the compiled eval forward pass of the edge model (T=12 frames of
112x112, batch 1), for K=4 and K=12, built with the xla ops form (XLA counts nothing inside the cpu_ffi form's
FFI calls); latency is the median of `--runs` jitted batch-1 calls after warm-up, in the ops form
`mer_jax.ops.choose` picks for config.model.ops. Both forms are named in the results. Prints a table and writes
benchmarks/results/model_cost.json.

The size of the train step's program per ops form (`train_step_hlo_*`): instructions in every computation (entry,
reduction bodies, branches) of the lowered, unoptimised HLO module of the edge model's train step
(`lowered.as_text(dialect="hlo")`, batch 2, float32, lowered for one CPU device, not compiled), and how many of them
are slices and concatenates. The CPU-shaped xla form unrolls its depthwise convs and their gradients into one slice
per kernel tap and its BatchNorm sums into one slice per column; the reference form (GPUs, TPUs) has neither, so its
count is the same for frames of 64 px as of 112 px (`train_step_hlo_instructions_reference_64px`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import time

import jax
import numpy as np

from benchmarks import workers
from configs import default
from mer_jax import ops
from mer_jax.models import emotion_model as model_lib
from mer_jax.models import mobilenet_v3

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def _abstract_params(config):
  """Parameter shapes without computing anything (no MiniLM weights loaded)."""
  model = model_lib.EmotionModel(config.model)
  return jax.eval_shape(
    lambda: model.init({"params": jax.random.key(0)}, model_lib.zeros_batch(config, 1), train=False)
  )["params"]


def compiled_forward(config, batch_size: int = 1, ops=None):
  """(jitted eval forward, variables, batch) for `config` with random parameters, in ops form `ops` (default:
  the one a run of `config` uses here)."""
  model = model_lib.EmotionModel(config.model, ops=ops or workers.chosen_ops(config))
  batch = model_lib.zeros_batch(config, batch_size)
  rng = np.random.default_rng(0)
  batch["frames"] = rng.integers(0, 256, batch["frames"].shape, dtype=np.uint8)
  batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
  batch["audio_mask"] = np.ones(batch["audio_mask"].shape, bool)
  variables = model.init({"params": jax.random.key(0)}, batch, train=False)
  forward = jax.jit(lambda variables, batch: model.apply(variables, batch, train=False))
  return forward, variables, batch


def forward_flops(config) -> float:
  forward, variables, batch = compiled_forward(config, ops=workers.flop_count_ops())
  cost = forward.lower(variables, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0]
  return float(cost["flops"])


def backbone_flops(frame_size: int = 112) -> float:
  backbone = mobilenet_v3.MobileNetV3Small(ops=workers.flop_count_ops())
  images = np.zeros((1, frame_size, frame_size, 1), np.float32)
  variables = backbone.init(jax.random.key(0), images, train=False)
  cost = jax.jit(lambda v, x: backbone.apply(v, x, train=False)).lower(variables, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def latency_ms(config, runs: int) -> float:
  forward, variables, batch = compiled_forward(config)
  jax.block_until_ready(forward(variables, batch))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(forward(variables, batch))
    times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times))


# The forms whose train steps are counted: the CPU-shaped one, the one GPUs and TPUs run, and the C++ kernels' one.
HLO_FORMS = {"xla (CPU-shaped)": ops.XLA, "reference (accelerator)": ops.REFERENCE, "cpu_ffi": ops.CPU_FFI}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_OPCODE = re.compile(r"\b([a-z][\w\-]*)\(")


def lowered_train_step(config, form, batch_size: int = 2):
  """mer_jax.training.steps.train_step of `config` under ops form `form`, lowered (not compiled) for one CPU device
  from abstract shapes: nothing is initialised or run."""
  from benchmarks import workers
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  options = train.step_options(config, ops=form)
  mesh = steps_lib.make_mesh(jax.devices("cpu")[:1])
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workers.make_batch(config, batch_size))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  step = jax.jit(functools.partial(steps_lib.train_step, options=options))
  return step.lower(steps_lib.abstract_train_state(options, mesh), batch, rng)


def hlo_counts(hlo_text: str) -> dict:
  """{'instructions', 'slices', 'concatenates'} of an HLO module's text: every `name = type opcode(...)` line of
  every computation."""
  counts = {"instructions": 0, "slices": 0, "concatenates": 0}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    counts["instructions"] += 1
    opcode = _OPCODE.search(match.group(1))  # the type before it has no `word(`; metadata comes after it
    if opcode and opcode.group(1) in ("slice", "concatenate"):
      counts[opcode.group(1) + "s"] += 1
  return counts


def train_step_hlo(config) -> dict:
  """The train_step_hlo_* results: HLO counts of the lowered train step per form of HLO_FORMS (None for cpu_ffi
  where the C++ kernels cannot be built), and the reference form's instruction count for 64 px frames."""
  from mer_jax.ops.cpu import build as cpu_build

  counts = {}
  for name, form in HLO_FORMS.items():
    if form is ops.CPU_FFI and not cpu_build.available():
      counts[name] = None
      continue
    counts[name] = hlo_counts(lowered_train_step(config, form).as_text(dialect="hlo"))
  narrow = config.copy_and_resolve_references()
  narrow.data.frame_size = 64
  reference_64px = hlo_counts(lowered_train_step(narrow, ops.REFERENCE).as_text(dialect="hlo"))
  return {
    f"train_step_hlo_{kind}": {name: None if c is None else c[kind] for name, c in counts.items()}
    for kind in ("instructions", "slices", "concatenates")
  } | {"train_step_hlo_instructions_reference_64px": reference_64px["instructions"]}


def measure(runs: int = 20) -> dict:
  edge = default.get_config()
  base = default.get_config()
  base.model = default.model_config("base")
  base.data.max_text_length = 128
  k12 = default.get_config()
  k12.model.top_k = 12
  results = {
    "params_total_edge": model_lib.count_parameters(_abstract_params(edge)),
    "params_total_base": model_lib.count_parameters(_abstract_params(base)),
    "params_video_backbone": model_lib.count_parameters(_abstract_params(edge)["backbone"]),
    "flops_forward_k4": forward_flops(edge),
    "flops_forward_k12": forward_flops(k12),
    "flops_backbone_one_frame": backbone_flops(edge.data.frame_size),
    "latency_ms_cpu_batch1_edge": latency_ms(edge, runs),
    "ops_form_flops": workers.flop_count_ops().name,
    "ops_form_latency": workers.chosen_ops(edge).name,
  }
  results["flops_ratio_k4_over_k12"] = results["flops_forward_k4"] / results["flops_forward_k12"]
  results.update(train_step_hlo(edge))
  results["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}"
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--runs", type=int, default=20, help="timed runs for the latency median")
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "model_cost.json"), help="JSON path")
  args = parser.parse_args()
  results = measure(args.runs)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  if args.json:
    print(json.dumps(results))
  else:
    rows = []
    for key, value in results.items():  # a dict (per ops form) as one row per entry
      rows += [(f"{key}[{name}]", v) for name, v in value.items()] if isinstance(value, dict) else [(key, value)]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
      shown = f"{value:,.3f}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
      print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
  main()
