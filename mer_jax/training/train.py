"""Training and evaluation: `train_and_evaluate(config, workdir)`.

One `Mesh` with a `data` axis over every device of every process: parameters and optimizer state are
replicated, batches are split along `data`. Each process reads its own shard (per-process batch
= global batch / processes) as raw batches (mer_jax/data/raw_batches.py: int16 audio, in memory, in an order
that is a function of the step, so a resume replays nothing); a background thread makes the next batches
global arrays (`jax.make_array_from_process_local_data`) while a step runs, and the steps compute the
log-mel and the augmentation on the device (`device_features.model_batch`). `steps.train_step` and `steps.eval_step`
are pure and compiled once with `jax.jit` (NamedSharding in/out, donated state); the jitted pair is cached
per step config, so later runs in one process reuse it.

The workdir gets: `checkpoints/` (orbax, see mer_jax/training/checkpoint.py; resume is automatic),
TensorBoard events, `eval/step_<N>.json` after each evaluation and `eval/best.json` (best by
`config.best_metric` on `config.eval_split`).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mer_jax import errors
from mer_jax.training import checkpoint as checkpoint_lib
from mer_jax.training import compile_cache
from mer_jax.training import distributed
from mer_jax.data import example_cache
from mer_jax.data import input_pipeline
from mer_jax.data import raw_batches
from mer_jax.training import losses as losses_lib
from mer_jax.training import metrics as metrics_lib
from mer_jax.training import run_config
from mer_jax.training import steps as steps_lib
from mer_jax import ops as ops_lib
from mer_jax.models import emotion_model as model_lib
from mer_jax.training.options import step_options


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global jax arrays split on `data` (host-only `id` dropped). Values that are
  jax arrays already (a batch `prefetch_to_device` made) pass through as they are."""
  sharding = NamedSharding(mesh, P("data"))
  return {
    k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in input_pipeline.model_inputs(batch).items()
  }


def prefetch_to_device(batches, mesh: Mesh, depth: int = 2) -> example_cache.Prefetcher:
  """Numpy batches -> global jax arrays on `mesh`, made in a background thread `depth` batches ahead, so the
  host's gathers and host-to-device copies overlap the running step. close() it when done."""
  return example_cache.Prefetcher(batches, lambda batch: global_batch(batch, mesh), depth)


def replicated_key(seed: int, mesh: Mesh) -> jax.Array:
  """The run's PRNG key as a global (replicated) array, valid in every process."""
  return jax.jit(lambda: jax.random.key(seed), out_shardings=NamedSharding(mesh, P()))()


# ----------------------------------------------------------------------------- data helpers


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.data.data_dir, or `<workdir>/../data` when it is '' (gs://bucket/runs/a -> gs://bucket/runs/data)."""
  from mer_jax import storage

  if config.data.data_dir:
    return storage.absolute_path(config.data.data_dir)
  return os.path.join(storage.parent(workdir), "data")


def check_data_dir_shared(config: ml_collections.ConfigDict, data_dir: str, process_count: int) -> None:
  """Raises InvalidInput when a job of several processes would read a host-local `data_dir`: each host would
  prepare or read its own copy (or find none). A URL (gs://...) is shared; a local path only when
  config.data.data_dir_shared says so (NFS, Filestore, or every process on one machine)."""
  if process_count <= 1 or "://" in str(data_dir) or config.data.get("data_dir_shared", False):
    return
  raise errors.InvalidInput(
    f"The prepared data {data_dir} is a local path and this job runs {process_count} processes, which must all "
    "read the same data. Put it on storage every host reads: --config.data.data_dir=gs://BUCKET/tfds, or a shared "
    "filesystem (NFS, Filestore) with --config.data.data_dir_shared=True (also right when every process runs on "
    "this one machine)."
  )


def _check_setup(config: ml_collections.ConfigDict, info: dict) -> None:
  """Raises InvalidInput when the config does not fit the devices or the prepared data (the message says what
  to set)."""
  devices, processes = jax.device_count(), jax.process_count()
  for name in ("batch_size", "eval_batch_size"):
    size = int(config[name])
    if size % devices or size % processes:
      raise errors.InvalidInput(
        f"config.{name}={size} must be a multiple of the {devices} devices (and of the "
        f"{processes} processes): the global batch is split evenly over the 'data' axis."
      )
  for split in (config.train_split, config.eval_split):
    if split not in info["splits"]:
      raise errors.InvalidInput(
        f"Split {split!r} is not in the prepared data (it has {sorted(info['splits'])}); "
        "set config.train_split / config.eval_split."
      )
  for task, num_classes in config.model.tasks.items():
    names = info["classes"].get(task, ())
    if len(names) != int(num_classes):
      raise errors.InvalidInput(
        f"config.model.tasks.{task}={num_classes} but the prepared data has {len(names)} "
        f"classes for {task!r}: {list(names)}."
      )


# ----------------------------------------------------------------------------- the loop


def evaluate(
  eval_fn, state: steps_lib.TrainState, config: ml_collections.ConfigDict, data_dir: str, mesh: Mesh, classes: dict
) -> dict:
  """One pass over config.eval_split -> {task: metrics.classification_report + loss}."""
  batches = prefetch_to_device(raw_batches.eval_batches(config, config.eval_split, data_dir=data_dir), mesh)
  collection = None
  try:
    for batch in batches:
      batch_metrics = eval_fn(state, batch)
      collection = batch_metrics if collection is None else collection.merge(batch_metrics)
  finally:
    batches.close()
  if collection is None:
    raise ValueError(f"Split {config.eval_split!r} is empty.")
  computed = jax.tree.map(np.asarray, collection.compute())
  return metrics_lib.eval_report(computed, {task: classes[task] for task in config.model.tasks})


def _hparams(config: ml_collections.ConfigDict) -> dict:
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

  walk(config, "")
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, checkpoints.

  Returns {"step": last step, "losses": training loss of each step run here, "state": steps.TrainState,
  "eval": last eval report or None, "best": best eval record or None, "preempted": bool}.
  Raises steps.NonFiniteLossError naming the step when the loss or gradients stop being finite. The heads follow
  config.data (`run_config.resolve_tasks`); config.json records the resolved config.
  """
  config = run_config.resolve_tasks(config)
  workdir = checkpoint_lib.absolute_path(workdir)
  is_main = jax.process_index() == 0
  data_dir = resolve_data_dir(config, workdir)
  check_data_dir_shared(config, data_dir, jax.process_count())
  info = input_pipeline.dataset_info(config, data_dir)
  _check_setup(config, info)
  config = run_config.resolve_steps(config, info["splits"][config.train_split])  # epochs -> steps of this batch
  best_task = config.best_metric.split("/")[0]
  checkpointer = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), config, keep=config.keep_checkpoints, best_metric=config.best_metric
  )
  latest = checkpointer.latest_step()
  if latest is not None:
    try:
      checkpointer.check_compatible(latest)  # before any compile: a wrong config fails in seconds
    except checkpoint_lib.IncompatibleCheckpointError:
      checkpointer.close()
      raise
  mesh = steps_lib.make_mesh()
  ops = ops_lib.choose_for_mesh(config.model.ops, mesh, config.model.dtype)
  logging.info("Ops form (config.model.ops=%r): %s", config.model.ops, ops_lib.describe(ops))
  options = step_options(config, losses_lib.class_weights_for(config, data_dir), ops)
  train_fn, eval_fn = steps_lib.compiled_steps(options, mesh)
  if latest is not None:
    state = checkpointer.restore(latest, steps_lib.abstract_train_state(options, mesh, config.seed))
    logging.info("Resumed from the checkpoint of step %d in %s.", latest, checkpointer.directory)
  else:
    state = steps_lib.create_train_state(options, mesh, config.seed)
  start = int(jax.device_get(state.step))
  end = config.num_train_steps if config.stop_after_steps <= 0 else min(config.num_train_steps, config.stop_after_steps)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if is_main:
    run_config.save_run_config(config, workdir)
  if start == 0:
    writer.write_hparams(_hparams(config))
    logging.info(
      "Model: %d parameters; mesh %s over %d devices in %d processes.",
      model_lib.count_parameters(state.params),
      dict(mesh.shape),
      jax.device_count(),
      jax.process_count(),
    )
  eval_log = metrics_lib.EvalLog(os.path.join(workdir, "eval"), config.best_metric, write=is_main)
  result = {"step": start, "losses": [], "state": state, "eval": None, "preempted": False, "best": eval_log.best}
  if start >= end:
    logging.info("Nothing to train: the checkpoint is at step %d, the run stops at %d.", start, end)
    checkpointer.close()
    writer.flush()
    return result

  rng = jax.jit(lambda: jax.random.fold_in(jax.random.key(config.seed), 1), out_shardings=NamedSharding(mesh, P()))()
  schedule = steps_lib.learning_rate_schedule(options)
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=config.num_train_steps, writer=writer, every_steps=config.log_every_steps, every_secs=None
  )
  losses, pending, train_metrics, lost_peer = result["losses"], None, None, False

  def check_finite(step, status):
    loss, finite = jax.device_get((status["loss"], status["finite"]))
    if not finite:
      good = checkpointer.all_steps()
      raise steps_lib.NonFiniteLossError(
        f"The loss or the gradients became NaN/inf at step {step} (loss={float(loss)}). Training "
        f"stopped; the last good checkpoint is step {max(good) if good else 'none'} in "
        f"{checkpointer.directory}. Lower config.learning_rate or config.grad_clip_norm, or check the "
        "input data for NaN."
      )
    losses.append(float(loss))

  # Before the input's background thread starts: a SIGTERM from now on saves and stops instead of killing.
  preemption = checkpoint_lib.PreemptionWatcher()
  # Raw batches (int16 audio; log-mel and augmentation run in the step), the batch of step `start + 1` first: the
  # checkpoint's step is the input's position, so a resume continues the uninterrupted order without replay.
  train_iter = prefetch_to_device(
    raw_batches.train_batches(config, config.train_split, start_step=start, data_dir=data_dir), mesh
  )
  try:
    for step in range(start + 1, end + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = global_batch(next(train_iter), mesh)
        if step == start + 1:  # compiled ahead and timed: the log says whether the persistent cache served it
          logging.info(compile_cache.compile_timed(train_fn, state, batch, rng)[1].describe("train step"))
        state, step_metrics, status = train_fn(state, batch, rng)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      if pending is not None:  # one step behind: the host never waits for the step it just queued
        check_finite(*pending)
      pending = (step, status)
      report_progress(step)
      last = step == end
      do_eval = step % config.eval_every_steps == 0 or last
      do_save = step % config.checkpoint_every_steps == 0 or do_eval
      stop = preemption.reached(step)
      if step % config.log_every_steps == 0 or last or do_save or stop:
        check_finite(*pending)
        pending = None
        scalars = {f"train/{k}": float(v) for k, v in train_metrics.compute().items()}
        scalars["train/learning_rate"] = float(schedule(step - 1))
        writer.write_scalars(step, scalars)
        train_metrics = None
      ranking = None
      if do_eval:
        with report_progress.timed("eval"):
          eval_report = evaluate(eval_fn, state, config, data_dir, mesh, info["classes"])
        record = eval_log.add(step, config.eval_split, eval_report)
        ranking = {config.best_metric: record["value"]}
        writer.write_scalars(step, metrics_lib.eval_scalars(eval_report, f"eval/{config.eval_split}"))
        logging.info(
          "Eval at step %d on %s: %s=%.4f (best %.4f at step %d). %s confusion matrix (rows = true):\n%s",
          step,
          config.eval_split,
          config.best_metric,
          record["value"],
          eval_log.best["value"],
          eval_log.best["step"],
          best_task,
          metrics_lib.format_confusion(eval_report[best_task]),
        )
        result["eval"], result["best"] = eval_report, eval_log.best
      if do_save or stop:
        checkpointer.save(step, state, ranking)
      result["step"] = step
      if stop:
        logging.warning("Stopped at step %d on SIGTERM; the checkpoint is in %s.", step, checkpointer.directory)
        result["preempted"] = True
        break
    if pending is not None:
      check_finite(*pending)
  except jax.errors.JaxRuntimeError as error:
    if not distributed.is_lost_peer(error):
      raise
    lost_peer = True
    raise distributed.LostPeerError(distributed.lost_peer_message(error)) from error
  finally:
    train_iter.close()
    preemption.close()
    if not lost_peer:  # waiting for the saves would wait at a barrier the lost process never reaches
      checkpointer.close()  # waits for the asynchronous saves
    writer.flush()
  result["state"] = state
  return result
