"""Benchmark worker processes: one framework each, driven by benchmarks/run.py over stdin/stdout.

Each framework runs in its own process: in one process, XLA's and torch's idle thread pools spin against
each other on a small machine (torch's OpenMP threads slowed down 5-20x next to a JAX thread pool), which
would measure the co-tenancy, not the frameworks. A worker sets its thread count before importing its
framework, builds everything (compiles, warms up), answers `{"ready": ...}` and then runs one timed
operation per request:

    -> {"op": "train", "n": 3}        <- {"wall": seconds per call, "cpu": process CPU seconds per call}

    python -m benchmarks.workers jax|torch SPEC_JSON

stdout carries only these JSON lines; everything else the libraries print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from mer_jax.training import host_memory

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def rss_mb(field: str = "VmRSS") -> float:
  """This process's resident set (VmRSS) or its peak (VmHWM) in MiB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shared inputs


def benchmark_config(batch_size: int, top_k: int | None = None):
  """configs/default.py (the edge model: T=12 frames of 112 px, K=4, 4 s audio, 64 tokens) at this batch."""
  from configs import default

  config = default.get_config()
  config.batch_size = batch_size
  if top_k is not None:
    config.model.top_k = top_k
  return config


def make_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A random numpy batch of the contract (no `id`): varied audio and text lengths, a few missing
  modalities, some labels -1. The same seed gives both frameworks the same batch."""
  import numpy as np

  rng = np.random.default_rng(seed)
  data = config.data
  num_audio = 1 + int((data.max_audio_seconds * data.sample_rate - 400) // 160)  # 25 ms windows, 10 ms hops
  t, s, length = data.num_frames, data.frame_size, data.max_text_length
  audio_len = rng.integers(num_audio // 4, num_audio + 1, batch_size)
  text_len = rng.integers(4, length + 1, batch_size)
  batch = {
    "frames": rng.integers(0, 256, (batch_size, t, s, s, 1), dtype=np.uint8),
    "audio": rng.normal(size=(batch_size, num_audio, data.num_mel_bins)).astype(np.float32),
    "audio_mask": np.arange(num_audio)[None, :] < audio_len[:, None],
    "text_ids": rng.integers(1, config.model.text.compact.vocab_size, (batch_size, length)).astype(np.int32),
    "text_mask": np.arange(length)[None, :] < text_len[:, None],
    "has_video": rng.random(batch_size) > 0.1,
    "has_audio": rng.random(batch_size) > 0.1,
    "example_mask": np.ones(batch_size, bool),
  }
  for task, classes in config.model.tasks.items():
    batch[f"labels/{task}"] = rng.integers(-1, classes, batch_size).astype(np.int32)
  return batch


def model_inputs(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if not k.startswith("labels/")}


# ----------------------------------------------------------------------------- JAX


def cost_flops(lowered) -> float:
  """FLOPs from XLA's HloCostAnalysis of a lowered computation. It counts nothing inside an FFI call, so
  lower the model built with `FLOP_COUNT_OPS` for the model's FLOPs."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
    cost = cost[0]
  # None where the backend only analyses compiled executables (GPU): benchmarks/accelerator.py counts the
  # step lowered for the CPU instead.
  return float(cost["flops"]) if cost else float("nan")


def flop_count_ops():
  """The ops form FLOPs are counted under: the xla form, the cpu_ffi form's math in XLA ops (XLA's cost analysis
  sees into every op of it; it counts nothing inside an FFI call), the same count on every backend."""
  from mer_jax import ops

  return ops.XLA


def chosen_ops(config, mesh=None):
  """The ops form a run of `config` uses, chosen as training chooses it (`config.model.ops` for `mesh`, default
  all devices): what the timings measure."""
  from mer_jax import ops

  if mesh is None:
    return ops.choose(config.model.ops, dtype=config.model.dtype)
  return ops.choose_for_mesh(config.model.ops, mesh, config.model.dtype)


def init_train_state(options, mesh, seed: int):
  """mer_jax.training.steps' initial state; its init compiled without backend optimisation (it runs once, so the
  ~3x faster compile matters and the slower code does not)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mer_jax.training import steps as steps_lib

  init_fn = getattr(steps_lib, "_init_fn", None)
  if init_fn is None:
    return steps_lib.create_train_state(options, mesh, seed)
  lowered = jax.jit(init_fn(options, seed), out_shardings=NamedSharding(mesh, P())).lower()
  return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()


class JaxTrainer:
  """The library's jitted train step (`mer_jax.training.steps.compiled_steps`: Mesh, NamedSharding, donated state,
  the ops form training chooses) on a fixed device-resident batch, with no host sync inside the loop.
  `ops_form` names the form that runs."""

  def __init__(self, config, batch, state, *, depthwise: str | None = None):
    import dataclasses
    import functools
    import jax
    from mer_jax.training import train
    from mer_jax.training import steps as steps_lib

    self.mesh = steps_lib.make_mesh()
    self.options = train.step_options(config, ops=chosen_ops(config, self.mesh))
    if depthwise is not None:  # the same step, the backbone's depthwise convs computed another way
      from benchmarks import depthwise_variants

      self.options = dataclasses.replace(
        self.options, ops=depthwise_variants.with_depthwise(self.options.ops, depthwise)
      )
    self.ops_form = self.options.ops.name
    self.state = state
    self.batch = train.global_batch(batch, self.mesh)
    self.rng = train.replicated_key(config.seed, self.mesh)
    step = steps_lib.compiled_steps(self.options, self.mesh)[0]  # exactly what training runs
    start, wall = time.process_time(), time.perf_counter()
    lowered = step.lower(self.state, self.batch, self.rng)
    self.step = lowered.compile()  # one executable for the one static shape: it can never recompile
    counted = jax.jit(
      functools.partial(steps_lib.train_step, options=dataclasses.replace(self.options, ops=flop_count_ops()))
    )
    self.flops_per_step = cost_flops(counted.lower(self.state, self.batch, self.rng))
    self.compile_cpu_s, self.compile_wall_s = time.process_time() - start, time.perf_counter() - wall
    self.status = None

  def run(self, steps: int, batches=None) -> None:
    """`steps` steps back to back, then wait for the last; `batches` (an iterator) feeds fresh ones."""
    import jax
    from mer_jax.training import train

    for _ in range(steps):
      batch = self.batch if batches is None else train.global_batch(next(batches), self.mesh)
      self.state, _, self.status = self.step(self.state, batch, self.rng)
    jax.block_until_ready(self.status["loss"])


def jax_forward(config, variables, batch):
  """Compiled eval forward of EmotionModel(config.model) under `chosen_ops(config)` for this batch's shapes."""
  import jax
  from mer_jax.models import emotion_model as model_lib

  model = model_lib.EmotionModel(config.model, ops=chosen_ops(config))
  return jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(variables, batch).compile()


def forward_flops(config) -> float:
  """Batch-1 eval forward FLOPs under `flop_count_ops()` (lowered only: nothing compiled or initialised)."""
  import jax
  from mer_jax.models import emotion_model as model_lib

  model = model_lib.EmotionModel(config.model, ops=flop_count_ops())
  batch = model_lib.zeros_batch(config, 1)
  variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, batch, train=False))
  return cost_flops(jax.jit(lambda v, b: model.apply(v, b, train=False)).lower(variables, batch))


def synthetic_examples(config, count: int, seed: int = 0):
  """`count` prepared examples (the TFDS features of data/meld_format.py) as a tf.data.Dataset."""
  import numpy as np
  import tensorflow as tf

  data = config.data
  rng = np.random.default_rng(seed)
  t, s = data.num_frames, data.frame_size
  samples = int(data.max_audio_seconds * data.sample_rate)
  return tf.data.Dataset.from_tensor_slices(
    {
      "id": np.array([f"train/dia{i // 5}_utt{i % 5}" for i in range(count)]),
      "text": np.array([f"synthetic utterance {i}" for i in range(count)]),
      "speaker": np.array(["Speaker"] * count),
      "dialogue_id": (np.arange(count) // 5).astype(np.int32),
      "utterance_id": (np.arange(count) % 5).astype(np.int32),
      "frames": rng.integers(0, 256, (count, t, s, s, 1), dtype=np.uint8),
      "frame_times": np.tile(((np.arange(t) + 0.5) / t).astype(np.float32), (count, 1)),
      "face_found": np.ones((count, t), bool),
      "audio": rng.integers(-8000, 8000, (count, samples)).astype(np.int16),
      "has_video": np.ones(count, bool),
      "has_audio": np.ones(count, bool),
      "labels": {task: rng.integers(0, n, count).astype(np.int32) for task, n in config.model.tasks.items()},
    }
  )


def stub_tokenize(texts, contexts, max_length):
  """Deterministic stand-in for the HF tokenizer (tokenising is one pass before training, not timed)."""
  import numpy as np

  ids, mask = np.zeros((len(texts), max_length), np.int32), np.zeros((len(texts), max_length), bool)
  for row, text in enumerate(texts):
    words = text.split()[:max_length]
    ids[row, : len(words)] = [1000 + sum(map(ord, w)) % 20000 for w in words]
    mask[row, : len(words)] = True
  return ids, mask


def jax_worker(spec: dict):
  """-> (ops: name -> fn(n), info). Ops: train[, train_<formulation>], forward_b<size>, forward_k<K>,
  pipeline_read, train_fed."""
  import jax
  import jax.numpy as jnp
  from mer_jax.data import input_pipeline
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  size = spec["batch_size"]
  config = benchmark_config(size)
  batch = make_batch(config, size)
  options, mesh = train.step_options(config), steps_lib.make_mesh()
  info, ops = {"flops_forward_b1_by_k": {}}, {}
  start = time.process_time()
  state0 = init_train_state(options, mesh, config.seed)
  info["init_cpu_s"] = time.process_time() - start
  variables = {"params": state0.params, "batch_stats": state0.batch_stats}
  trainer = JaxTrainer(config, batch, jax.tree.map(jnp.copy, state0))
  info.update(
    train_flops_per_step=trainer.flops_per_step,
    train_compile_cpu_s=trainer.compile_cpu_s,
    ops_form=trainer.ops_form,
    forward_ops_form=chosen_ops(config).name,
    flops_ops_form=flop_count_ops().name,
  )
  ops["train"] = trainer.run
  for formulation in spec.get("depthwise", ()):
    variant = JaxTrainer(config, batch, jax.tree.map(jnp.copy, state0), depthwise=formulation)
    ops[f"train_{formulation}"] = variant.run
  for forward_size in spec.get("forward_sizes", ()):
    inputs = jax.device_put(model_inputs({k: v[:forward_size] for k, v in batch.items()}))
    compiled = jax_forward(config, variables, inputs)
    ops[f"forward_b{forward_size}"] = _calls(lambda c=compiled, b=inputs: jax.block_until_ready(c(variables, b)))
  for k in spec.get("flops_k", ()):
    info["flops_forward_b1_by_k"][str(k)] = forward_flops(benchmark_config(1, k))
  inputs = jax.device_put(model_inputs(batch))
  for k in spec.get("time_k", ()):
    compiled = jax_forward(benchmark_config(size, k), variables, inputs)
    ops[f"forward_k{k}"] = _calls(lambda c=compiled: jax.block_until_ready(c(variables, inputs)))
  if spec.get("pipeline"):
    examples = synthetic_examples(config, max(2 * size, 16))
    ds = input_pipeline.dataset_from_examples(examples, config, train=True, batch_size=size, tokenize_fn=stub_tokenize)
    batches = input_pipeline.as_numpy(ds)
    next(batches)  # graph tracing, AUTOTUNE warm-up
    ops["pipeline_read"] = lambda n: read_rate(ds, n)
    ops["train_fed"] = lambda n: trainer.run(n, batches=batches)
  return ops, info


# ----------------------------------------------------------------------------- PyTorch


def torch_worker(spec: dict):
  """-> (ops, info). Ops: train[, train_nchw], forward_b<size>, forward_k<K> (eager: nothing to compile)."""
  import torch
  from benchmarks import torch_reference, torch_train

  size = spec["batch_size"]
  config = benchmark_config(size)
  batch = make_batch(config, size)
  torch_batch = torch_reference.batch_to_torch(batch)
  trainer = torch_train.TorchTrainer(config, channels_last=True)
  ops = {"train": lambda n: [trainer.step(torch_batch) for _ in range(n)]}
  if spec.get("torch_nchw"):
    nchw = torch_train.TorchTrainer(config, channels_last=False)
    ops["train_nchw"] = lambda n: [nchw.step(torch_batch) for _ in range(n)]
  for forward_size in spec.get("forward_sizes", ()):
    inputs = torch_reference.batch_to_torch(model_inputs({k: v[:forward_size] for k, v in batch.items()}))
    ops[f"forward_b{forward_size}"] = _calls(lambda b=inputs: trainer.forward(b))
  model, inputs = trainer.model, torch_reference.batch_to_torch(model_inputs(batch))

  def forward_k(k):
    def call():
      model.top_k = model.frame_selector.k = k
      try:
        trainer.forward(inputs)
      finally:
        model.top_k = model.frame_selector.k = config.model.top_k

    return _calls(call)

  for k in spec.get("time_k", ()):
    ops[f"forward_k{k}"] = forward_k(k)
  info = {
    "torch_threads": torch.get_num_threads(),
    "channels_last": True,
    "params": torch_reference.count_parameters(model),
  }
  return ops, info


def read_rate(ds, n: int) -> dict:
  """n batches from a fresh iterator, timed from its first batch on: a long-lived iterator would hand out
  batches it prefetched while the worker was idle, and look infinitely fast."""
  from mer_jax.data import input_pipeline

  batches = input_pipeline.as_numpy(ds)
  next(batches)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(n):
    next(batches)
  return {"wall": (time.perf_counter() - wall) / n, "cpu": (time.process_time() - cpu) / n}


def _calls(fn):
  return lambda n: [fn() for _ in range(n)]


# ----------------------------------------------------------------------------- protocol


def set_threads(framework: str, threads: int | None) -> None:
  """Before the framework is imported: XLA's intra-op pool, or torch's (os.cpu_count() when None).

  One thread also pins the process to one core: XLA's CPU runtime keeps a pool per core whatever
  its Eigen flags say, so only the affinity really holds it to one.
  """
  threads = threads or os.cpu_count()
  if threads == 1 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  if framework == "jax":
    if threads == 1:
      flags = os.environ.get("XLA_FLAGS", "")
      os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  else:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)


def serve(framework: str, spec: dict) -> None:
  protocol = sys.stdout
  sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
  reply = lambda message: (protocol.write(json.dumps(message) + "\n"), protocol.flush())
  try:
    set_threads(framework, spec.get("threads"))
    start = time.perf_counter()
    ops, info = (jax_worker if framework == "jax" else torch_worker)(spec)
    for name, op in ops.items():
      op(1)  # warm-up: first calls allocate, fill caches, trace tf.data
    info.update(
      setup_wall_s=time.perf_counter() - start,
      rss_mb_after_setup=rss_mb(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      ops=sorted(ops),
      malloc=host_memory.describe(),
    )
    reply({"ready": True, "info": info})
    for line in sys.stdin:
      request = json.loads(line)
      if request["op"] == "quit":
        reply({"peak_rss_mb": rss_mb("VmHWM"), "rss_mb": rss_mb()})
        return
      n = int(request.get("n", 1))
      wall, cpu = time.perf_counter(), time.process_time()
      timing = ops[request["op"]](n)  # an op may time itself (a dict), else the whole call counts
      if not isinstance(timing, dict):
        timing = {"wall": (time.perf_counter() - wall) / n, "cpu": (time.process_time() - cpu) / n}
      reply(timing)
  except Exception:  # the parent shows it and stops
    reply({"error": traceback.format_exc()})


if __name__ == "__main__":
  serve(sys.argv[1], json.loads(sys.argv[2]))
