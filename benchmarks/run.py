"""JAX vs PyTorch, side by side on this machine: training throughput, forward latency, cost vs K, input
pipeline rate and memory.

  python -m benchmarks.run [--quick] [--json]

The JAX side is the library's own train step (`mer_jax.training.steps.compiled_steps`: jitted over a Mesh, donated
state, in the ops form `mer_jax.ops.choose` picks for config.model.ops, named in the results); the PyTorch side
is benchmarks/torch_reference.py + torch_train.py, the same model and recipe.
Each framework runs in its own worker process (benchmarks/workers.py) with the same batch and inputs;
this process alternates timed requests between them, in rotating order, so load from other processes
falls on both alike, and takes ratios round by round (median and spread reported). Wall time and process
CPU time are both recorded. Timings are reported, never asserted. Both workers are started with the malloc
that `python -m mer_jax.training.host_memory` exports (tcmalloc if installed, else glibc with huge pages;
PyTorch gets the same); `--malloc system` runs both with glibc's defaults.

Writes benchmarks/results/<machine>.json and .md (`--quick`: <machine>-quick.*) and prints the table;
with --json the last stdout line is the whole result as one JSON object. `--quick` (batch 8, few steps,
no variants) is what CI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from mer_jax.training import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
TOP_K_VALUES = (1, 2, 4, 8, 12)
SWITCH_PAUSE_S = 0.05  # lets the idle worker's thread pool stop spinning before the other one starts


def machine_name() -> str:
  return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def log(*parts) -> None:
  """Progress goes to stderr: stdout keeps the table and the one JSON line."""
  print(*parts, file=sys.stderr, flush=True)


def median(values) -> float:
  values = sorted(values)
  middle = len(values) // 2
  return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


class Worker:
  """One benchmarks.workers process; `request(op, n)` -> {'wall', 'cpu'} per call."""

  def __init__(self, framework: str, spec: dict, environ: dict):
    self.framework = framework
    env = dict(environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO + os.pathsep + environ.get("PYTHONPATH", ""))
    self.process = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.workers", framework, json.dumps(spec)],
      cwd=REPO,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
    )
    self.info = None

  def _receive(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(
        f"The {self.framework} benchmark worker died (exit code {self.process.wait()}); its error is printed above."
      )
    message = json.loads(line)
    if "error" in message:
      raise RuntimeError(f"The {self.framework} benchmark worker failed:\n{message['error']}")
    return message

  def wait_ready(self) -> dict:
    self.info = self._receive()["info"]
    return self.info

  def request(self, op: str, n: int) -> dict:
    self.process.stdin.write(json.dumps({"op": op, "n": n}) + "\n")
    self.process.stdin.flush()
    return self._receive()

  def close(self) -> dict:
    try:
      return self.request("quit", 1)
    finally:
      self.process.stdin.close()
      self.process.wait(timeout=60)


def interleaved(runners: dict, repeats: int, calls: int) -> dict:
  """runners: label -> (worker, op). Alternate them over `repeats` rounds, the order rotating each round,
  after one untimed round of the same length (each worker's own warm-up ran its ops once, long before).
  With an untimed round of one call, JAX's first timed train round was the slowest in every run (210-290
  ms against 160-196 ms on the Zen 5 host): its first few calls back to back are slower.

  -> {label: {'wall': [s per call, one per round], 'cpu': [...]}, 'load': [1-min load average per round]}.
  """
  labels = list(runners)
  samples = {label: {"wall": [], "cpu": []} for label in labels}
  samples["load"] = []
  for worker, op in runners.values():
    worker.request(op, calls)
  for round_index in range(repeats):
    shift = round_index % len(labels)
    for label in labels[shift:] + labels[:shift]:
      worker, op = runners[label]
      time.sleep(SWITCH_PAUSE_S)
      result = worker.request(op, calls)
      samples[label]["wall"].append(result["wall"])
      samples[label]["cpu"].append(result["cpu"])
    samples["load"].append(os.getloadavg()[0])
  return samples


def per_round_ratio(samples: dict, numerator: str, denominator: str, key: str = "wall") -> dict:
  """Median and spread of samples[numerator] / samples[denominator], round by round."""
  ratios = [a / b for a, b in zip(samples[numerator][key], samples[denominator][key])]
  return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def versions() -> dict:
  from importlib import metadata

  found = {"python": platform.python_version()}
  for package in ("jax", "jaxlib", "flax", "torch", "tensorflow-cpu", "numpy"):
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = None
  return found


# ----------------------------------------------------------------------------- the run


def measure(args) -> dict:
  size = args.batch_size
  forward_sizes = sorted({1, size})
  results = {
    "machine": machine_name(),
    "quick": args.quick,
    "batch_size": size,
    "steps_per_round": args.steps,
    "rounds": args.repeats,
    "num_frames": 12,
    "frame_size": 112,
    "top_k": 4,
    "cpu_count": os.cpu_count(),
    "cpu_model": cpu_model(),
    "versions": versions(),
    "load_average_start": os.getloadavg()[0],
  }
  environ = (
    host_memory.without_fast_malloc()
    if args.malloc == "system"
    else host_memory.environment(dict(os.environ, **{host_memory.CHOICE: args.malloc}))
  )
  common = {"batch_size": size, "forward_sizes": forward_sizes, "time_k": list(args.time_k)}
  specs = {
    "jax": dict(
      common, framework="jax", flops_k=list(TOP_K_VALUES), pipeline=True, depthwise=["grouped"] if args.variants else []
    ),
    "torch": dict(common, framework="torch", torch_nchw=args.variants),
  }
  # One core, one thread: on a loaded machine torch's OpenMP threads (spin-waiting at every barrier) can
  # lose more to a preempted partner than the second core gives, so that setting is timed too.
  specs["torch_1core"] = {"framework": "torch", "batch_size": size, "threads": 1}
  if args.variants:
    specs["jax_1core"] = {"framework": "jax", "batch_size": size, "threads": 1}
  log(f"[setup] starting {len(specs)} workers (JAX compiles; a few minutes on 2 cores) ...")
  started = time.perf_counter()
  workers = {}
  try:
    for name, spec in specs.items():
      workers[name] = Worker(spec.pop("framework"), spec, environ)
    infos = {name: worker.wait_ready() for name, worker in workers.items()}
    results["setup_wall_s"] = time.perf_counter() - started
    jax_info, torch_info = infos["jax"], infos["torch"]
    results.update(
      jax_init_cpu_s=jax_info["init_cpu_s"],
      jax_train_compile_cpu_s=jax_info["train_compile_cpu_s"],
      train_flops_per_step=jax_info["train_flops_per_step"],
      torch_threads=torch_info["torch_threads"],
      xla_flags=jax_info["xla_flags"],
      params_torch=torch_info["params"],
      flops_forward_b1_by_k=jax_info["flops_forward_b1_by_k"],
      malloc_jax=jax_info["malloc"],
      malloc_torch=torch_info["malloc"],
      ops_form_jax=jax_info["ops_form"],
      ops_form_jax_forward=jax_info["forward_ops_form"],
      ops_form_flops=jax_info["flops_ops_form"],
    )
    flops = jax_info["flops_forward_b1_by_k"]
    results["flops_ratio_k4_over_k12"] = flops["4"] / flops["12"]

    runners = {
      "jax": (workers["jax"], "train"),
      "torch": (workers["torch"], "train"),
      "torch_1core": (workers["torch_1core"], "train"),
    }
    if args.variants:
      runners.update(
        jax_grouped_depthwise=(workers["jax"], "train_grouped"),
        torch_nchw=(workers["torch"], "train_nchw"),
        jax_1core=(workers["jax_1core"], "train"),
      )
    log(f"[train] {args.repeats} interleaved rounds of {args.steps} steps, batch {size} ...")
    samples = interleaved(runners, args.repeats, args.steps)
    for label in runners:
      wall = median(samples[label]["wall"])
      results[f"train_step_ms_{label}"] = 1e3 * wall
      results[f"train_steps_per_s_{label}"] = 1.0 / wall
      results[f"train_clips_per_s_{label}"] = size / wall
      results[f"train_cpu_s_per_step_{label}"] = median(samples[label]["cpu"])
      results[f"train_gflops_per_s_{label}"] = results["train_flops_per_step"] / wall / 1e9
    ratio = per_round_ratio(samples, "torch", "jax")  # step-time ratio torch/jax = throughput ratio jax/torch
    results["train_throughput_ratio_jax_over_torch_all_cores"] = ratio["median"]
    results["train_throughput_ratio_all_cores_spread"] = [ratio["min"], ratio["max"]]
    results["train_cpu_time_ratio_torch_over_jax"] = per_round_ratio(samples, "torch", "jax", "cpu")["median"]
    speedups = {"torch_cores_over_1core": ("torch_1core", "torch")}
    if args.variants:
      speedups.update(
        explicit_over_grouped_depthwise=("jax_grouped_depthwise", "jax"),
        torch_channels_last_over_nchw=("torch_nchw", "torch"),
        jax_cores_over_1core=("jax_1core", "jax"),
      )
    for label, (slow, fast) in speedups.items():
      results[f"train_speedup_{label}"] = per_round_ratio(samples, slow, fast)["median"]
    torch_labels = [label for label in runners if label.startswith("torch")]
    jax_labels = [label for label in runners if label in ("jax", "jax_1core")]
    best_torch = min(torch_labels, key=lambda k: results[f"train_step_ms_{k}"])
    best_jax = min(jax_labels, key=lambda k: results[f"train_step_ms_{k}"])
    results.update(best_torch_variant=best_torch, best_jax_variant=best_jax)
    # The headline compares each framework at its fastest thread setting on this machine now: on a loaded
    # machine PyTorch on all cores can be many times slower than on one, and a ratio against that would
    # flatter JAX.
    ratio = per_round_ratio(samples, best_torch, best_jax)
    results["train_throughput_ratio_jax_over_torch"] = ratio["median"]
    results["train_throughput_ratio_spread"] = [ratio["min"], ratio["max"]]
    results["train_load_average"] = samples.pop("load")
    results["train_samples_wall_s"] = {k: v["wall"] for k, v in samples.items()}

    log("[forward] eval forward latency ...")
    runners = {f"{fw}_b{n}": (workers[fw], f"forward_b{n}") for n in forward_sizes for fw in ("jax", "torch")}
    samples = interleaved(runners, args.repeats, args.forward_calls)
    for n in forward_sizes:
      for fw in ("jax", "torch"):
        results[f"forward_ms_{fw}_b{n}"] = 1e3 * median(samples[f"{fw}_b{n}"]["wall"])
      results[f"forward_latency_ratio_torch_over_jax_b{n}"] = per_round_ratio(samples, f"torch_b{n}", f"jax_b{n}")[
        "median"
      ]

    log("[top-k] forward time vs K ...")
    runners = {f"{fw}_k{k}": (workers[fw], f"forward_k{k}") for k in args.time_k for fw in ("jax", "torch")}
    samples = interleaved(runners, args.repeats, args.forward_calls)
    for fw in ("jax", "torch"):
      results[f"forward_ms_b{size}_by_k_{fw}"] = {
        str(k): 1e3 * median(samples[f"{fw}_k{k}"]["wall"]) for k in args.time_k
      }

    log("[pipeline] tf.data alone, and feeding the JAX train step ...")
    read = interleaved({"read": (workers["jax"], "pipeline_read")}, 2, args.pipeline_batches)
    results["pipeline_batches_per_s"] = 1.0 / median(read["read"]["wall"])
    results["pipeline_clips_per_s"] = size * results["pipeline_batches_per_s"]
    samples = interleaved(
      {"fixed": (workers["jax"], "train"), "fed": (workers["jax"], "train_fed")}, args.repeats, args.steps
    )
    results["train_steps_per_s_jax_fed_by_pipeline"] = 1.0 / median(samples["fed"]["wall"])
    results["fed_over_fixed_batch_step_rate"] = per_round_ratio(samples, "fixed", "fed")["median"]
    results["pipeline_rate_over_train_step_rate"] = results["pipeline_batches_per_s"] / results["train_steps_per_s_jax"]
  finally:
    for name, worker in workers.items():
      try:
        stats = worker.close()
        results[f"peak_rss_mb_{name}"] = stats["peak_rss_mb"]
      except Exception as e:  # a worker that already died: its error is on stderr
        log(f"[{name}] {e}")
        worker.process.kill()
  results["load_average_end"] = os.getloadavg()[0]
  results["wall_s_total"] = time.perf_counter() - started
  return results


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
  r, b = results, results["batch_size"]
  fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)
  spread = r["train_throughput_ratio_spread"]
  lines = [
    f"`{r['machine']}` ({r['cpu_model']}); jax {r['versions']['jax']}, torch {r['versions']['torch']}; "
    f"torch {r['torch_threads']} threads, XLA all cores; load average {fmt(r['load_average_start'], '.1f')} at "
    f"start, {fmt(r['load_average_end'], '.1f')} at end. Edge model, T=12 frames of 112 px, K=4, batch {b}; "
    f"one process per framework, {r['rounds']} interleaved rounds of {r['steps_per_round']} steps after an "
    f"untimed one, medians; "
    f"Host malloc: {r['malloc_jax']} (JAX); {r['malloc_torch']} (PyTorch). "
    f"JAX ops form (mer_jax.ops): {r['ops_form_jax']} for training, {r['ops_form_jax_forward']} for the "
    f"forward; FLOPs counted under {r['ops_form_flops']}.",
    "",
    "| | JAX | PyTorch | JAX / PyTorch |",
    "|---|---|---|---|",
    f"| train steps/s, batch {b}, fastest setting of each ({r['best_jax_variant']}, "
    f"{r['best_torch_variant']}) | {fmt(r['train_steps_per_s_' + r['best_jax_variant']])} | "
    f"{fmt(r['train_steps_per_s_' + r['best_torch_variant']])} | **{fmt(r['train_throughput_ratio_jax_over_torch'])}x**"
    f" (rounds {fmt(spread[0])}-{fmt(spread[1])}) |",
    f"| train clips/s, same settings | {fmt(r['train_clips_per_s_' + r['best_jax_variant']], '.1f')} | "
    f"{fmt(r['train_clips_per_s_' + r['best_torch_variant']], '.1f')} | |",
    f"| train steps/s, both on all {r['cpu_count']} cores | {fmt(r['train_steps_per_s_jax'])} | "
    f"{fmt(r['train_steps_per_s_torch'])} | {fmt(r['train_throughput_ratio_jax_over_torch_all_cores'])}x (rounds "
    f"{fmt(r['train_throughput_ratio_all_cores_spread'][0])}-{fmt(r['train_throughput_ratio_all_cores_spread'][1])}) |",
    f"| CPU s per train step, all cores | {fmt(r['train_cpu_s_per_step_jax'])} | "
    f"{fmt(r['train_cpu_s_per_step_torch'])} | {fmt(r['train_cpu_time_ratio_torch_over_jax'])}x |",
  ]
  for n in sorted({1, b}):
    lines.append(
      f"| eval forward, batch {n} (ms) | {fmt(r[f'forward_ms_jax_b{n}'], '.1f')} | "
      f"{fmt(r[f'forward_ms_torch_b{n}'], '.1f')} | {fmt(r[f'forward_latency_ratio_torch_over_jax_b{n}'])}x |"
    )
  for fw in ("jax", "torch"):
    lines.append(
      f"| peak RSS, {'JAX' if fw == 'jax' else 'PyTorch'} worker (MiB) | "
      + (
        f"{fmt(r.get('peak_rss_mb_jax'), '.0f')} | |"
        if fw == "jax"
        else f"| {fmt(r.get('peak_rss_mb_torch'), '.0f')} |"
      )
      + " |"
    )
  flops = r["flops_forward_b1_by_k"]
  lines += [
    "",
    f"Cost vs K: FLOPs of the batch-1 eval forward (XLA cost analysis); eval forward time at batch {b}.",
    "",
    "| K | " + " | ".join(flops) + " |",
    "|---|" + "---|" * len(flops),
    "| MFLOPs | " + " | ".join(fmt(v / 1e6, ".0f") for v in flops.values()) + " |",
  ]
  for fw, name in (("jax", "JAX ms"), ("torch", "PyTorch ms")):
    times = r.get(f"forward_ms_b{b}_by_k_{fw}", {})
    lines.append(f"| {name} | " + " | ".join(fmt(times.get(k), ".0f") for k in flops) + " |")
  lines += [
    "",
    f"FLOPs K=4 / K=12 = {fmt(r['flops_ratio_k4_over_k12'], '.3f')}.",
    "",
    f"Input pipeline (tf.data: augment, log-mel, token lookup, batch {b}): "
    f"{fmt(r['pipeline_batches_per_s'])} batches/s alone, {fmt(r['pipeline_rate_over_train_step_rate'])}x the "
    f"JAX step rate; fed by it, the step runs at {fmt(r['fed_over_fixed_batch_step_rate'])}x its fixed-batch "
    "rate (both share the cores).",
  ]
  variants = [f"PyTorch on all cores over 1 core {fmt(r['train_speedup_torch_cores_over_1core'])}x"]
  if "train_speedup_explicit_over_grouped_depthwise" in r:
    variants += [
      f"JAX on all cores over 1 core {fmt(r['train_speedup_jax_cores_over_1core'])}x",
      f"JAX depthwise convs of the {r['ops_form_jax']} form over XLA grouped convs "
      f"{fmt(r['train_speedup_explicit_over_grouped_depthwise'])}x",
      f"PyTorch channels_last over NCHW {fmt(r['train_speedup_torch_channels_last_over_nchw'])}x",
    ]
  lines += ["", "Train-step speed-ups between settings (per-round medians): " + "; ".join(variants) + "."]
  return "\n".join(lines) + "\n"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="batch 8, few steps, no variants (CI)")
  parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--steps", type=int, help="train steps per timed round")
  parser.add_argument("--repeats", type=int, help="interleaved rounds")
  parser.add_argument("--results-dir", default=RESULTS_DIR)
  parser.add_argument(
    "--malloc",
    choices=host_memory.CHOICES,
    default="auto",
    help="both workers' malloc, as mer_jax.training.host_memory exports it (auto: tcmalloc "
    "if installed, else glibc with huge pages; system: glibc's defaults)",
  )
  args = parser.parse_args(argv)
  quick = args.quick
  args.batch_size = args.batch_size or (8 if quick else 32)
  args.steps = args.steps or (2 if quick else 3)
  # 8 rounds in full mode: the first round after setup ran slower for most settings of both frameworks
  # (up to 30% on the shared 2-core machine), and with 5 rounds one or two slow ones moved the median. An
  # untimed round now comes first as well (`interleaved`).
  args.repeats = args.repeats or (3 if quick else 8)
  args.forward_calls = 2 if quick else 4
  args.pipeline_batches = 3 if quick else 8
  args.time_k = (1, 12) if quick else TOP_K_VALUES
  args.variants = not quick
  return args


def write(results: dict, args) -> None:
  table = markdown(results)
  name = results["machine"] + ("-quick" if args.quick else "")
  os.makedirs(args.results_dir, exist_ok=True)
  with open(os.path.join(args.results_dir, name + ".json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.results_dir, name + ".md"), "w") as f:
    f.write(table)
  print(table)
  if args.json:
    print(json.dumps(results))


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  results = measure(args)
  write(results, args)
  return results


if __name__ == "__main__":
  main()
