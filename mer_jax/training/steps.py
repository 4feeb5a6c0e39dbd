"""The pure steps of training and what they act on: `TrainState`, the optimizer and its schedule, the state
created already sharded on a `Mesh` (pretrained text weights put in), `train_step(state, batch, rng)` and
`eval_step(state, batch)`, and `compiled_steps`, the pair jitted with NamedShardings (donated state), cached per
StepOptions. The loop that feeds them, evaluates and checkpoints is mer_jax/training/train.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mer_jax.data import device_features
from mer_jax.models import emotion_model as model_lib
from mer_jax.models import text_encoder
from mer_jax.training import losses as losses_lib
from mer_jax.training import metrics as metrics_lib
from mer_jax.training import modality_corruption
from mer_jax.training.options import StepOptions


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

  Pretrained text weights (text_encoder.pretrained_text_params: MiniLM for the base model, MiniLM's projected
  word embeddings for a compact encoder that asks) replace the random ones; AdamW's moments start at zero either
  way, so the optimizer state stays valid.
  """
  replicated = NamedSharding(mesh, P())
  state = _jitted_init(options, mesh, seed)()
  current = state.params.get("text_encoder")
  pretrained = current and text_encoder.pretrained_text_params(options.model.text, current)
  if pretrained is not current:

    def place(new, old):
      new = np.asarray(new, old.dtype)
      if new.shape != old.shape:
        raise ValueError(f"Pretrained text weight of shape {new.shape} does not fit {old.shape}.")
      return jax.make_array_from_callback(new.shape, replicated, lambda index: new[index])

    state = state.replace(params={**state.params, "text_encoder": jax.tree.map(place, pretrained, current)})
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
      # Each modality's own head, where the model has one, says how much a row left alone counts as clean: for
      # video the chosen frames' tokens (what the fusion sees), for audio the audio-only head.
      own_logits = {
        "video": explanation.get("frame_relevance_logits"),
        "audio": explanation.get("audio_relevance_logits"),
      }
      for modality, corrupted in (("video", events.corrupt_video), ("audio", events.corrupt_audio)):
        labels = batch[f"labels/{options.model.primary_task}"]
        confidence = None
        if own_logits[modality] is not None:
          confidence = modality_corruption.label_confidence(own_logits[modality], labels)
        per_task[f"reliability_{modality}"] = modality_corruption.reliability_loss(
          explanation[f"reliability_{modality}"],
          batch[f"has_{modality}"],
          corrupted,
          batch["example_mask"],
          confidence,
          confidence_target=modality in options.reliability_confidence_target,
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
