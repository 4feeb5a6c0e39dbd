"""Losses of the train step: cross-entropy per task and in sum, the frame-selection loss and the class weights
of `config.class_weights` (modality dropout, corruption and the reliability loss: modality_corruption.py).

Apart from training's loop and optimizer (mer_jax/training/train.py), so the loss math reads on its own and tests
check it without a model. The losses are pure functions of arrays; `steps.train_step` and `steps.eval_step`
compose them. `frame_selection_loss` says how the frame scorer learns from the clip's label alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mer_jax.training import metrics as metrics_lib

if TYPE_CHECKING:
  from mer_jax.training.options import StepOptions


def task_loss(
  logits: jax.Array,
  labels: jax.Array,
  example_mask: jax.Array,
  *,
  label_smoothing: float = 0.0,
  class_weights: tuple | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of one task: logits (B, C), labels (B,) int (-1 = none) -> (loss (), per row (B,)).

  The loss is the weighted mean over counted rows (label >= 0 and example_mask), weights = class
  weight of the row's label (1 without class weights); 0 when no row counts.
  """
  num_classes = logits.shape[-1]
  valid = metrics_lib.valid_rows(labels, example_mask)
  targets = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_row = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights, jnp.float32)[jnp.where(valid, labels, 0)]
  loss = jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1e-9)
  return loss, jnp.where(valid, per_row, 0.0)


def multitask_loss(logits: dict, batch: dict, options: StepOptions) -> tuple[jax.Array, dict]:
  """sum_task task_weight * task_loss -> (total (), {task: loss ()})."""
  total, per_task = jnp.zeros((), jnp.float32), {}
  for (task, _), task_weight, class_weights in zip(options.tasks, options.task_weights, options.class_weights):
    per_task[task], _ = task_loss(
      logits[task],
      batch[f"labels/{task}"],
      batch["example_mask"],
      label_smoothing=options.label_smoothing,
      class_weights=class_weights,
    )
    total = total + task_weight * per_task[task]
  return total, per_task


def _label_log_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """(B, N, C) logits, (B,) labels (any value where invalid) -> (B, N) log p(label) of every row."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, labels[:, None, None], axis=-1)[..., 0]


def frame_selection_loss(
  evidence_logits: jax.Array, relevance_logits: jax.Array, scores: jax.Array, labels: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
  """Teaches the frame scorer and the backbone, from the clip's label alone, which frames matter.

  evidence_logits (B, T, C): every frame's primary-task logits from the cheap trunk (topk.FrameEvidence);
  relevance_logits (B, K, C): the chosen frames' logits from their backbone tokens; scores (B, T): the
  text-guided frame scores; labels (B,) int (-1 = none); valid (B,) bool (counted rows with video).
  Returns {'evidence', 'head', 'scorer'} losses (each a scalar, averaged over valid rows).

  Evidence and head: every frame is asked for the clip's label (multiple-instance style). In a clip whose
  frames show several things, a frame's own answer then tells whether it shows what the label is about.
  Scorer: frame t's reward is its evidence p_t(label); its advantage is the reward minus the batch mean, in
  units of the batch's spread (early on rewards differ by hundredths: their order is what counts). The
  score, centred per clip and read as the logit of "this frame matters", is pulled towards
  sigmoid(2 * advantage) by a binary cross-entropy over all T frames. No label is needed at test time: the
  text query has learnt what the frames that matter look like. The hard top-K's straight-through gradient
  alone reaches the scorer only through pixel values and, on the demo corpus, left it at chance.
  """
  valid = valid & (labels >= 0)
  weights = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  safe_labels = jnp.where(valid, labels, 0)
  evidence = _label_log_probs(evidence_logits, safe_labels)  # (B, T)
  head = _label_log_probs(relevance_logits, safe_labels)  # (B, K)
  reward = jnp.exp(jax.lax.stop_gradient(evidence))
  baseline = jnp.sum(jnp.mean(reward, axis=1) * weights) / count
  spread = jnp.sqrt(jnp.sum(jnp.mean((reward - baseline) ** 2, axis=1) * weights) / count)
  target = jax.nn.sigmoid(2.0 * (reward - baseline) / (spread + 1e-3))
  # Top-K only compares a clip's scores with each other, so the loss sees them centred per clip: a shift
  # of all of a clip's scores, free for the selection, is not asked of the scorer (it doubled the steps
  # the demo's scorer needed to find the key frames).
  scores = scores.astype(jnp.float32)
  centred = scores - jnp.mean(scores, axis=1, keepdims=True)
  bce = optax.sigmoid_binary_cross_entropy(centred, target)
  average = lambda per_row: jnp.sum(per_row * weights) / count
  return {
    "evidence": -average(jnp.mean(evidence, axis=1)),
    "head": -average(jnp.mean(head, axis=1)),
    "scorer": average(jnp.mean(bce, axis=1)),
  }


def audio_relevance_loss(audio_logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Cross-entropy of the audio-only head (EmotionModel's `audio_relevance_logits` (B, C)) against the primary
  task's labels (B,) on `valid` (B,) rows (audio present and not corrupted by the step).

  The fused classifier answers most clips from the frames and the words, so the audio encoder, asked only through
  it, learns little; when the video is gone the model then has little to fall back on. Asking the audio for the
  label on its own keeps it learning, as the frame-relevance heads do for the backbone."""
  loss, _ = task_loss(audio_logits, labels, valid)
  return loss


# ----------------------------------------------------------------------------- class weights


def label_counts(config: ml_collections.ConfigDict, data_dir: str, split: str) -> dict[str, np.ndarray]:
  """{task: (C,) int64 label counts} of a prepared split (reads only the labels)."""
  import tensorflow_datasets as tfds
  from mer_jax.data import input_pipeline

  builder = input_pipeline.load_builder(config, data_dir)
  ds = builder.as_dataset(split=split, decoders=tfds.decode.PartialDecoding({"labels": True}))
  counts = {task: np.zeros(int(n), np.int64) for task, n in config.model.tasks.items()}
  for batch in tfds.as_numpy(ds.map(lambda ex: ex["labels"]).batch(4096)):
    for task, task_counts in counts.items():
      labels = batch[task][batch[task] >= 0]
      np.add.at(task_counts, labels, 1)
  return counts


def class_weights_for(config: ml_collections.ConfigDict, data_dir: str) -> dict | None:
  """config.class_weights: None / '' / 'none' -> None; 'balanced' -> n / (C * n_c) per task (as sklearn)."""
  mode = config.class_weights or "none"
  if mode == "none":
    return None
  if mode != "balanced":
    raise ValueError(f"config.class_weights={mode!r}; use 'none' or 'balanced'.")
  weights = {}
  for task, counts in label_counts(config, data_dir, config.train_split).items():
    safe = np.maximum(counts, 1)  # a class absent from train never meets its weight
    weights[task] = (counts.sum() / (len(counts) * safe)).tolist()
  return weights
