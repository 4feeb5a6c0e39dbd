"""StepOptions: everything the compiled train and eval steps depend on, taken from a config once."""

from __future__ import annotations

import dataclasses

import ml_collections

from mer_jax import ops as ops_lib
from mer_jax.training import run_config

# The config.data fields that decide input shapes (all that the model's init reads).
SHAPE_DATA_FIELDS = ("num_frames", "frame_size", "sample_rate", "max_audio_seconds", "num_mel_bins", "max_text_length")
# Optional config.data fields of the log-mel (features._mel_params), which the step computes from raw batches.
FEATURE_DATA_FIELDS = ("mel_frame_length", "mel_frame_step", "fft_length", "mel_lower_hz", "mel_upper_hz")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything the compiled steps depend on (hashable: the key of the compiled-step cache)."""

  model: ml_collections.FrozenConfigDict
  data: ml_collections.FrozenConfigDict
  tasks: tuple  # ((name, num_classes), ...)
  task_weights: tuple  # (float, ...) per task
  class_weights: tuple  # (None | (float, ...) per class, ...) per task
  label_smoothing: float
  modality_dropout: float
  learning_rate: float
  warmup_steps: int
  num_train_steps: int
  end_learning_rate_fraction: float
  weight_decay: float
  grad_clip_norm: float
  frame_relevance_weight: float
  scorer_word_learning_rate: float
  ops: ops_lib.Ops = ops_lib.REFERENCE  # the ops form the run chose (mer_jax.ops.choose)
  augment: bool = False  # config.data.augment: the train step jitters raw batches (device_features.augment)
  modality_corruption: float = 0.0  # per modality: P(corrupted in the step) (training/modality_corruption.py)
  reliability_loss_weight: float = 0.0  # weight of modality_corruption.reliability_loss per modality
  # Modalities whose untouched rows take their own head's confidence as the reliability target (not 1, weighted by
  # it): modality_corruption.reliability_loss's `confidence_target`.
  reliability_confidence_target: tuple = ()
  audio_relevance_weight: float = 0.0  # weight of losses.audio_relevance_loss


def step_options(
  config: ml_collections.ConfigDict, class_weights: dict | None = None, ops: ops_lib.Ops | None = None
) -> StepOptions:
  """StepOptions of a full config; `class_weights` from `losses.class_weights_for`, `ops` from `ops.choose` (by
  default the form `config.model.ops` picks for JAX's default backend and all its devices). The schedule's steps
  are the config's; a config still in epochs (training resolves it against its train split first) is read at
  run_config.DEFAULT_TRAIN_EXAMPLES, the demo corpus's size."""
  if not run_config.steps_resolved(config):
    config = run_config.resolve_steps(config, run_config.DEFAULT_TRAIN_EXAMPLES)
  if ops is None:
    ops = ops_lib.choose(config.model.ops, dtype=config.model.dtype)
  tasks = tuple((task, int(n)) for task, n in config.model.tasks.items())
  task_weights = config.task_weights or {}
  class_weights = class_weights or {}
  return StepOptions(
    model=ml_collections.FrozenConfigDict(config.model),
    data=ml_collections.FrozenConfigDict(
      {k: config.data[k] for k in SHAPE_DATA_FIELDS}
      | {k: config.data[k] for k in FEATURE_DATA_FIELDS if k in config.data}
    ),
    tasks=tasks,
    task_weights=tuple(float(task_weights.get(task, 1.0)) for task, _ in tasks),
    class_weights=tuple(
      None if class_weights.get(task) is None else tuple(float(w) for w in class_weights[task]) for task, _ in tasks
    ),
    label_smoothing=float(config.label_smoothing),
    modality_dropout=float(config.modality_dropout),
    learning_rate=float(config.learning_rate),
    warmup_steps=int(config.warmup_steps),
    num_train_steps=int(config.num_train_steps),
    end_learning_rate_fraction=float(config.end_learning_rate_fraction),
    weight_decay=float(config.weight_decay),
    grad_clip_norm=float(config.grad_clip_norm),
    frame_relevance_weight=float(config.frame_relevance_weight),
    scorer_word_learning_rate=float(config.scorer_word_learning_rate),
    ops=ops,
    augment=bool(config.data.get("augment", False)),
    modality_corruption=float(config.get("modality_corruption", 0.0)),
    reliability_loss_weight=float(config.get("reliability_loss_weight", 0.0)),
    reliability_confidence_target=tuple(config.get("reliability_confidence_target", ())),
    audio_relevance_weight=float(config.get("audio_relevance_weight", 0.0)),
  )
