"""Accelerator benchmark: bf16 training and serving of the edge model on one GPU (or TPU chip).

    python -m benchmarks.accelerator [--quick] [--model edge|tiny] [--json] [--batch_sizes 2048,512] [--budget_s 600]
                                     [--variant] [--skip_pipeline] [--out DIR]

On `jax.devices()[0]`, with bf16 compute (`--dtype`) and float32 parameters (config.model.dtype='bfloat16'):

  latency      eval forward at batch 1 (and 32), device-resident inputs, one call at a time, block on
               each: median / p90 of many calls; float32 compute too, for comparison
  model-only   the library's jitted train step (`mer_jax.training.steps.compiled_steps`: Mesh, donated state) on a
               fixed device-resident batch, largest batch size first: steps/s, clips/s, TFLOP/s of the
               model's FLOPs (XLA's count of the unoptimised step, lowered for the CPU so that every backend
               and formulation divides the same number), peak device memory
  end-to-end   the train step as training runs it: synthetic prepared examples read once by tf.data into the
               in-memory cache (`mer_jax.data.raw_batches.raw_dataset`, `example_cache.fill_cache`), raw
               batches gathered in the step-based train order and put on the device two steps ahead
               (`train.prefetch_to_device`), log-mel and augmentation inside the jitted step; and the host
               pipeline's rate alone. TF runs on the host CPU only (as launch.py arranges)
  variant      `--variant`: the same train step with the other depthwise formulation
               (benchmarks/depthwise_variants.py): the xla form's shifted slices, chosen for XLA:CPU, where the
               run's ops form keeps XLA's grouped convs (the reference form, which GPUs and TPUs get), else
               the grouped convs

The ops form is what training picks here (`mer_jax.ops.choose` for config.model.ops, the device and bf16);
the results name it.

Latency and the first batch size always run; each later part starts only while the budget left covers the
slowest compile so far plus its timing, so a short lease still returns what it measured, and results are
written after every part. Writes <out>/<device>.json and .md (`--quick`: <device>-quick.*; default out:
benchmarks/results). With no accelerator it runs on the CPU: `--quick` (batch 8, the tiny model, every part) is
what CI runs to keep this file from rotting. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import sys
import time

from benchmarks import workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def log(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


def device_name(device) -> str:
  """The results file's name: 'gpu-nvidia-h200', 'tpu-v5-lite', or 'cpu-<cores>core-<arch>'."""
  if device.platform == "cpu":
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"
  kind = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  return kind if kind.startswith(device.platform) else f"{device.platform}-{kind}"


def percentile(values, q: float) -> float:
  """The q-quantile (0..1) of `values`, nearest rank."""
  values = sorted(values)
  return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def peak_memory_gib(device) -> float | None:
  """The device allocator's peak since the process started (None where the backend keeps no peak)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


MODEL_NAMES = {
  "edge": "edge model, T=12 frames of 112 px, K=4",
  "tiny": "tiny model (configs/tiny.py), T=4 of 32 px, K=2",
}


def accelerator_config(batch_size: int, dtype: str = "bfloat16", model: str = "edge"):
  """The benchmark's config at this batch and compute dtype: `model` 'edge' (benchmarks/workers.py: the edge model
  at its real shapes) or 'tiny' (configs/tiny.py: a model that compiles in seconds, for --quick smoke runs)."""
  if model == "tiny":
    from configs import tiny

    config = tiny.get_config()
    config.batch_size = batch_size
  else:
    config = workers.benchmark_config(batch_size)
  config.model.dtype = dtype
  return config


def model_flops_per_step(batch_size: int, model: str = "edge", dtype: str = "bfloat16") -> float:
  """FLOPs of one train step as XLA counts the unoptimised computation, lowered (not compiled) for one CPU
  device: an accelerator's compiled executable counts its rewritten program, which differs between
  formulations and compiler settings."""
  import jax
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  config = accelerator_config(batch_size, dtype, model)
  options = train.step_options(config, ops=workers.flop_count_ops())  # XLA counts no FLOPs inside an FFI call
  mesh = steps_lib.make_mesh(jax.devices("cpu")[:1])
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workers.make_batch(config, batch_size))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  step = jax.jit(functools.partial(steps_lib.train_step, options=options))
  return workers.cost_flops(step.lower(steps_lib.abstract_train_state(options, mesh), batch, rng))


def time_calls(fn, calls: int) -> list[float]:
  """Seconds of each of `calls` calls of fn (which blocks on its result)."""
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def measure_latency(variables, dtype: str, batch_size: int, calls: int, model: str = "edge") -> dict:
  """Eval forward of `batch_size` clips, one blocking call at a time -> median / p90 / min ms."""
  import jax

  config = accelerator_config(batch_size, dtype, model)
  inputs = jax.device_put(workers.model_inputs(workers.make_batch(config, batch_size)))
  compiled = workers.jax_forward(config, variables, inputs)
  run = lambda: jax.block_until_ready(compiled(variables, inputs))
  time_calls(run, 5)  # first calls allocate and load the executable
  times = time_calls(run, calls)
  return {
    "dtype": dtype,
    "batch_size": batch_size,
    "calls": calls,
    "ops_form": workers.chosen_ops(config).name,
    "median_ms": 1e3 * percentile(times, 0.5),
    "p90_ms": 1e3 * percentile(times, 0.9),
    "min_ms": 1e3 * min(times),
  }


def time_steps(trainer, target_s: float, rounds: int, batches=None) -> dict:
  """Per-step seconds over `rounds` rounds of back-to-back steps, each ~target_s long (median round).

  Two warm-up steps, then two timed ones size the rounds: the first steps after a compile (or after an
  idle pipeline filled its prefetch buffer) are not the steady state."""
  trainer.run(2, batches)
  start = time.perf_counter()
  trainer.run(2, batches)
  per_step = max((time.perf_counter() - start) / 2, 1e-4)
  steps = max(2, int(target_s / per_step))
  per_round = []
  for _ in range(rounds):
    start = time.perf_counter()
    trainer.run(steps, batches)
    per_round.append((time.perf_counter() - start) / steps)
  return {
    "steps_per_round": steps,
    "rounds": rounds,
    "step_s": percentile(per_round, 0.5),
    "step_s_min": min(per_round),
    "step_s_max": max(per_round),
  }


def train_result(trainer, batch_size: int, timing: dict, flops_per_step: float, peak_memory) -> dict:
  step_s = timing["step_s"]
  return {
    "batch_size": batch_size,
    "ops_form": trainer.ops_form,
    **timing,
    "steps_per_s": 1 / step_s,
    "clips_per_s": batch_size / step_s,
    "model_flops_per_step": flops_per_step,
    "tflops_per_s": flops_per_step / step_s / 1e12,
    "compile_s": trainer.compile_wall_s,
    "peak_memory_gib": peak_memory,
  }


def make_trainer(batch_size: int, depthwise: str | None = None, model: str = "edge", dtype: str = "bfloat16"):
  """-> (config, workers.JaxTrainer) for this batch size: a fresh state, the step compiled."""
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  config = accelerator_config(batch_size, dtype, model)
  state = workers.init_train_state(train.step_options(config), steps_lib.make_mesh(), config.seed)
  return config, workers.JaxTrainer(config, workers.make_batch(config, batch_size), state, depthwise=depthwise)


def cached_train_batches(config, batch_size: int, examples: int):
  """The training input over `examples` synthetic prepared examples: tf.data reads them once into the in-memory
  cache, then raw batches (int16 waveforms, uint8 frames) come in the step-based train order, as train.py reads."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # tf.data stays on the host; the accelerator is JAX's
  from mer_jax.data import example_cache, input_pipeline, raw_batches

  prepared = workers.synthetic_examples(config, examples)
  table = input_pipeline.build_token_table(input_pipeline.read_meta(prepared), config.data, workers.stub_tokenize)
  raw = raw_batches.raw_dataset(prepared, config, table, batch_size=batch_size, train=True)
  cache = example_cache.fill_cache(tf.data.Dataset.as_numpy_iterator(raw))
  order = example_cache.TrainOrder(cache.size, batch_size, int(config.seed))
  return example_cache.TrainBatches(cache, order)


def run(args) -> dict:
  import jax
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  device = jax.devices()[0]
  began = time.perf_counter()
  left = lambda: args.budget_s - (time.perf_counter() - began)
  result = {
    "device": device_name(device),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "host_cpus": os.cpu_count(),
    "quick": args.quick,
    "model": args.model,
    "compute_dtype": args.dtype,
    "parameters_dtype": "float32",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "train": [],
    "latency": [],
    "skipped": [],
    "errors": [],
  }
  log(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}")
  calls = 20 if args.quick else 300
  rounds, target_s = (2, 0.2) if args.quick else (5, 1.5)
  save = lambda: write_results(result, args)  # after every part: a crash later keeps what was measured
  slowest_compile = [0.0]
  affordable = lambda extra_s: left() > slowest_compile[0] + extra_s

  config = accelerator_config(max(args.batch_sizes), args.dtype, args.model)
  state = workers.init_train_state(train.step_options(config), steps_lib.make_mesh(), config.seed)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for dtype, size in ((args.dtype, 1),) if args.quick else ((args.dtype, 1), ("float32", 1), (args.dtype, 32)):
    latency = measure_latency(variables, dtype, size, calls, args.model)
    result["latency"].append(latency)
    log(f"forward {dtype} b{size}: median {latency['median_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms")
    save()

  largest = None
  for batch_size in sorted(args.batch_sizes, reverse=True):
    if largest is not None and not affordable(rounds * target_s + 10):
      result["skipped"].append(f"train batch {batch_size}: budget spent")
      continue
    config, trainer = make_trainer(batch_size, model=args.model, dtype=args.dtype)
    slowest_compile[0] = max(slowest_compile[0], trainer.compile_wall_s)
    # The allocator's peak is process-wide: only the first (largest) trainer's is its own.
    entry = train_result(
      trainer,
      batch_size,
      time_steps(trainer, target_s, rounds),
      model_flops_per_step(batch_size, args.model, args.dtype),
      peak_memory_gib(device) if largest is None else None,
    )
    result["train"].append(entry)
    log(
      f"train b{batch_size}: {entry['clips_per_s']:.0f} clips/s ({1e3 * entry['step_s']:.2f} ms/step, "
      f"{entry['tflops_per_s']:.1f} TFLOP/s, compile {entry['compile_s']:.0f} s)"
    )
    save()
    if largest is None:
      largest = (config, trainer, entry)

  if largest and not args.skip_pipeline:
    config, trainer, model_only = largest
    batch_size = model_only["batch_size"]
    if left() < 4 * rounds * target_s + 30:  # no compile (the step is reused): examples, reads, fed rounds
      result["skipped"].append("end-to-end: budget spent")
    else:
      try:
        batches = cached_train_batches(config, batch_size, min(4 * batch_size, args.max_examples))
        start = time.perf_counter()
        for _ in range(8 if args.quick else 40):
          next(batches)
        read = {"wall": (time.perf_counter() - start) / (8 if args.quick else 40)}
        from mer_jax.training import train as train_lib
        from mer_jax.training import steps as steps_lib

        # The raw batch has other shapes than the model-only batch: its own compiled step, on a fresh state.
        state = workers.init_train_state(trainer.options, trainer.mesh, config.seed)
        fed_trainer = workers.JaxTrainer(config, next(batches), state)
        prefetched = train_lib.prefetch_to_device(batches, fed_trainer.mesh)
        try:
          fed = time_steps(fed_trainer, 2 * target_s, rounds, batches=prefetched)
        finally:
          prefetched.close()
        result["end_to_end"] = {
          "batch_size": batch_size,
          "pipeline_batches_per_s": 1 / read["wall"],
          "pipeline_clips_per_s": batch_size / read["wall"],
          "fed": fed,
          "clips_per_s": batch_size / fed["step_s"],
          "steps_per_s": 1 / fed["step_s"],
          "model_only_clips_per_s": model_only["clips_per_s"],
        }
        log(
          f"end-to-end b{batch_size}: {result['end_to_end']['clips_per_s']:.0f} clips/s; host pipeline alone "
          f"{result['end_to_end']['pipeline_clips_per_s']:.0f} clips/s"
        )
      except Exception as error:  # e.g. an image without TensorFlow: keep the other parts, say why
        result["errors"].append(f"end-to-end: {type(error).__name__}: {error}")
        log(f"end-to-end failed: {type(error).__name__}: {error}")
      save()

  if args.variant and largest:
    from benchmarks import depthwise_variants

    batch_size = largest[2]["batch_size"]
    formulation = depthwise_variants.contrasting_formulation(largest[1].options.ops)
    if not affordable(rounds * target_s + 10):
      result["skipped"].append(f"{formulation} depthwise variant: budget spent")
    else:
      _, trainer = make_trainer(batch_size, depthwise=formulation, model=args.model, dtype=args.dtype)
      entry = train_result(
        trainer, batch_size, time_steps(trainer, target_s, rounds), largest[2]["model_flops_per_step"], None
      )
      result[f"variant_{formulation}_depthwise"] = entry
      log(
        f"train b{batch_size}, {formulation} depthwise convs ({trainer.ops_form}): {entry['clips_per_s']:.0f} clips/s"
      )
  result["wall_s"] = time.perf_counter() - began
  save()
  return result


def markdown(result: dict) -> str:
  forms = sorted({entry["ops_form"] for entry in result["train"] + result["latency"] if "ops_form" in entry})
  lines = [
    f"`{result['device']}` ({result['device_kind']}); jax {result['jax']}; {result.get('compute_dtype', 'bfloat16')} compute, float32 "
    f"parameters; {MODEL_NAMES[result.get('model', 'edge')]}; ops form {', '.join(forms) or 'n/a'}"
    + (f"; XLA_FLAGS={result['xla_flags']}." if result.get("xla_flags") else "."),
    "",
    "| | batch | steps/s | clips/s | model TFLOP/s | peak memory (GiB) | compile (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for entry in result["train"]:
    memory = entry["peak_memory_gib"]
    lines.append(
      f"| model-only train step | {entry['batch_size']} | {entry['steps_per_s']:.1f} | "
      f"**{entry['clips_per_s']:.0f}** | {entry['tflops_per_s']:.1f} | "
      f"{'-' if memory is None else f'{memory:.1f}'} | {entry['compile_s']:.0f} |"
    )
  for key in ("variant_grouped_depthwise", "variant_shifted_slices_depthwise"):
    if key in result:
      entry = result[key]
      lines.append(
        f"| same, ops form {entry.get('ops_form', key)} | {entry['batch_size']} | "
        f"{entry['steps_per_s']:.1f} | {entry['clips_per_s']:.0f} | {entry['tflops_per_s']:.1f} | | "
        f"{entry['compile_s']:.0f} |"
      )
  if "end_to_end" in result:
    e2e = result["end_to_end"]
    lines.append(
      f"| end-to-end, fed by tf.data | {e2e['batch_size']} | {e2e['steps_per_s']:.1f} | "
      f"**{e2e['clips_per_s']:.0f}** | | | |"
    )
    lines.append(
      f"| tf.data pipeline alone ({result['host_cpus']} host CPUs) | {e2e['batch_size']} | "
      f"{e2e['pipeline_batches_per_s']:.1f} | {e2e['pipeline_clips_per_s']:.0f} | | | |"
    )
  lines += ["", "| eval forward | ops form | batch | median (ms) | p90 (ms) |", "|---|---|---|---|---|"]
  for latency in result["latency"]:
    lines.append(
      f"| {latency['dtype']} | {latency.get('ops_form', 'n/a')} | {latency['batch_size']} | "
      f"**{latency['median_ms']:.3f}** | {latency['p90_ms']:.3f} |"
    )
  for skipped in result["skipped"] + result.get("errors", []):
    lines.append(f"\nNot measured: {skipped}.")
  return "\n".join(lines) + "\n"


def write_results(result: dict, args) -> str:
  """Writes <out>/<device>[-quick].json and .md; returns the markdown table."""
  table = markdown(result)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, result["device"] + ("-quick" if args.quick else ""))
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(table)
  return table


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="batch 8, few calls, the tiny model: a smoke run")
  parser.add_argument(
    "--dtype",
    choices=("bfloat16", "float32"),
    default=None,
    help="compute dtype (default bfloat16; quick on a CPU: float32)",
  )
  parser.add_argument(
    "--model",
    choices=("edge", "tiny"),
    default=None,
    help="edge (default) or tiny (configs/tiny.py; --quick's default)",
  )
  parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
  parser.add_argument(
    "--batch_sizes", default=None, help="comma-separated, run largest first; default 2048,512 (quick: 8)"
  )
  parser.add_argument(
    "--budget_s", type=float, default=600.0, help="seconds; a later part starts only while this covers it"
  )
  parser.add_argument("--max_examples", type=int, default=4096, help="synthetic examples behind tf.data")
  parser.add_argument("--skip_pipeline", action="store_true", help="leave out the end-to-end part")
  parser.add_argument(
    "--variant", action="store_true", help="also time the other depthwise formulation (grouped convs or shifted slices)"
  )
  parser.add_argument("--out", default=RESULTS_DIR, help="folder for <device>.json and .md")
  args = parser.parse_args(argv)
  args.batch_sizes = [int(b) for b in (args.batch_sizes or ("8" if args.quick else "2048,512")).split(",")]
  args.model = args.model or ("tiny" if args.quick else "edge")
  # XLA:CPU compiles bfloat16 train steps slowly (the tiny model's: 114 s), so a quick run on a CPU checks the code
  # paths in float32; on an accelerator it keeps bfloat16.
  import jax

  args.dtype = args.dtype or ("float32" if args.quick and jax.default_backend() == "cpu" else "bfloat16")
  result = run(args)
  print(write_results(result, args))
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
