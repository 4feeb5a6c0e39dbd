"""The train step of mer_jax/training/train.py in PyTorch, on benchmarks/torch_reference.py's model.

Benchmark-only (requirements-bench.txt): benchmarks/run.py races it against the JAX train step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import TorchEmotionModel
from mer_jax.data.features import LOG_OFFSET
from mer_jax.training import run_config


def _label_log_probs(logits, labels):
  log_probs = F.log_softmax(logits, -1)
  return log_probs.gather(-1, labels[:, None, None].expand(-1, log_probs.shape[1], 1))[..., 0]


def label_confidence(logits, labels):
  """`modality_corruption.label_confidence`: p(label) of a modality's own head (mean over chosen frames), 1 where
  unlabeled."""
  probabilities = torch.softmax(logits.detach().float(), -1)
  if probabilities.ndim == 3:
    probabilities = probabilities.mean(1)
  confidence = probabilities.gather(-1, labels.clamp(0, probabilities.shape[-1] - 1)[:, None])[:, 0]
  return torch.where(labels >= 0, confidence, torch.ones_like(confidence))


def reliability_loss(reliability, rows, corrupted, clean_confidence, confidence_target=False):
  """`modality_corruption.reliability_loss` (rows = present & example_mask)."""
  probability = reliability.float().clamp(1e-6, 1 - 1e-6)
  confidence = torch.ones_like(probability) if clean_confidence is None else clean_confidence
  target, clean_weight = (confidence, torch.ones_like(probability)) if confidence_target else (1.0, confidence)
  target = torch.where(corrupted, torch.zeros_like(probability), target * torch.ones_like(probability))
  per_row = F.binary_cross_entropy(probability, target, reduction="none")
  weights = rows.float() * torch.where(corrupted, torch.ones_like(probability), clean_weight)
  return (per_row * weights).sum() / weights.sum().clamp_min(1e-9)


def frame_selection_loss(evidence_logits, relevance_logits, scores, labels, valid):
  """`mer_jax.training.losses.frame_selection_loss`: {'evidence', 'head', 'scorer'} losses."""
  valid = valid & (labels >= 0)
  weights = valid.float()
  count = weights.sum().clamp_min(1.0)
  safe_labels = labels.clamp_min(0)
  evidence = _label_log_probs(evidence_logits, safe_labels)
  head = _label_log_probs(relevance_logits, safe_labels)
  reward = evidence.detach().exp()
  baseline = (reward.mean(1) * weights).sum() / count
  spread = (((reward - baseline) ** 2).mean(1) * weights).sum().div(count).sqrt()
  target = torch.sigmoid(2.0 * (reward - baseline) / (spread + 1e-3))
  bce = F.binary_cross_entropy_with_logits(scores - scores.mean(1, keepdim=True), target, reduction="none")
  average = lambda per_row: (per_row * weights).sum() / count
  return {"evidence": -average(evidence.mean(1)), "head": -average(head.mean(1)), "scorer": average(bce.mean(1))}


def warmup_cosine(step: int, peak: float, warmup: int, decay_steps: int, end: float) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, decay_steps, end) at `step`."""
  if step < warmup:
    return peak * step / max(warmup, 1)
  progress = min(max(step - warmup, 0) / max(decay_steps - warmup, 1), 1.0)
  return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchTrainer:
  """The train step of mer_jax/training/train.py in PyTorch, for `config` (a full config: model, data, training).

  Same recipe: modality dropout, task-weighted masked cross-entropy (labels -1 and padding rows ignored),
  the frame selection loss, SGD with momentum for the scorer's word table (unclipped),
  global-norm clipping, AdamW without weight decay on biases and norm scales (ndim < 2), linear warmup +
  cosine decay, BatchNorm statistics updated, and a step whose loss or gradient norm is not finite is
  skipped. `channels_last` keeps the backbone in torch's faster CPU layout for convolutions.
  """

  def __init__(self, config: Any, *, channels_last: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    self.config = config
    self.model = TorchEmotionModel(config.model, config.data.num_mel_bins)
    self.channels_last = channels_last
    if channels_last:
      self.model.backbone.use_channels_last()
    # As mer_jax.training.steps.make_optimizer: the scorer's word table takes SGD with momentum, unclipped.
    word_params = list(self.model.scorer_words.parameters()) if hasattr(self.model, "scorer_words") else []
    word_ids = {id(p) for p in word_params}
    params = [p for p in self.model.parameters() if id(p) not in word_ids]
    self.clipped_params = params
    self.word_optimizer = torch.optim.SGD(word_params, lr=0.0, momentum=0.9) if word_params else None
    word_rate = float(config.get("scorer_word_learning_rate", 10.0))
    groups = [
      {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    try:  # the fused CPU kernel (torch >= 2.4) is torch's fastest AdamW
      self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)
    except (RuntimeError, TypeError):
      self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    if not run_config.steps_resolved(config):  # a config in epochs: the steps JAX's StepOptions would take
      config = run_config.resolve_steps(config, run_config.DEFAULT_TRAIN_EXAMPLES)
    warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
    decay = max(config.num_train_steps, warmup + 1)
    end = config.learning_rate * config.get("end_learning_rate_fraction", 0.01)
    self.schedule = lambda step: warmup_cosine(step, config.learning_rate, warmup, decay, end)
    self.word_schedule = lambda step: warmup_cosine(
      step, word_rate, warmup, decay, end / config.learning_rate * word_rate
    )
    self.task_weights = {task: float((config.get("task_weights") or {}).get(task, 1.0)) for task in config.model.tasks}
    self.frame_relevance_weight = float(config.get("frame_relevance_weight", 0.0))
    self.modality_dropout = float(config.get("modality_dropout", 0.0))
    modalities = set(config.model.get("modalities", ("video", "audio", "text")))
    both = {"video", "audio"} <= modalities
    self.modality_corruption = float(config.get("modality_corruption", 0.0)) if both else 0.0
    self.reliability_loss_weight = (
      float(config.get("reliability_loss_weight", 0.0)) if config.model.use_reliability else 0.0
    )
    self.reliability_confidence_target = tuple(config.get("reliability_confidence_target", ()))
    self.audio_relevance_weight = float(config.get("audio_relevance_weight", 0.0))
    self.step_count = 0
    self.generator = torch.Generator().manual_seed(seed)

  def _modality_events(self, batch):
    """`modality_corruption.draw_events` + `corrupt` (host-feature batches: frames, and silence for audio) +
    `mark_missing` -> (batch, corrupt_video, corrupt_audio). The video noise is per-pixel only, where JAX's also has
    smooth and blocky kinds: the same kinds of events and losses, a cheaper noise."""
    has_video, has_audio = batch["has_video"].bool(), batch["has_audio"].bool()
    u = torch.rand(has_video.shape, generator=self.generator)
    both = has_video & has_audio
    d, c = self.modality_dropout, self.modality_corruption
    between = lambda lo, hi: both & (u >= lo) & (u < hi)
    drop_video, drop_audio = between(0.0, d), between(d, 2 * d)
    corrupt_video, corrupt_audio = between(2 * d, 2 * d + c), between(2 * d + c, 2 * d + 2 * c)
    if c > 0:
      frames = batch["frames"]
      size = frames.shape[0]
      level = torch.randint(0, 256, (size,), generator=self.generator)
      level = torch.where(torch.rand(size, generator=self.generator) < 0.5, 0, level).to(torch.uint8)
      noise = torch.randint(0, 256, frames.shape, generator=self.generator, dtype=torch.uint8)
      use_constant = (torch.rand(size, generator=self.generator) < 0.5)[:, None, None, None, None]
      replacement = torch.where(use_constant, level[:, None, None, None, None].expand_as(frames), noise)
      frames = torch.where(corrupt_video[:, None, None, None, None], replacement, frames)
      mask = batch["audio_mask"].bool()
      silence = torch.where(mask[..., None], float(np.log(LOG_OFFSET)), 0.0)
      audio = torch.where(corrupt_audio[:, None, None], silence, batch["audio"].float())
      batch = {**batch, "frames": frames, "audio": audio}
    batch = {**batch, "has_video": has_video & ~drop_video, "has_audio": has_audio & ~drop_audio}
    return batch, corrupt_video, corrupt_audio

  def loss(self, logits, batch):
    total, accuracy = torch.zeros(()), {}
    for task, weight in self.task_weights.items():
      labels = batch[f"labels/{task}"].long()
      valid = (labels >= 0) & batch["example_mask"].bool()
      per_row = F.cross_entropy(logits[task], labels.clamp_min(0), reduction="none")
      weights = valid.float()
      total = total + weight * (per_row * weights).sum() / weights.sum().clamp_min(1e-9)
      accuracy[task] = ((logits[task].argmax(-1) == labels).float() * weights).sum() / weights.sum().clamp_min(1)
    return total, accuracy

  def step(self, batch: Mapping[str, torch.Tensor]) -> dict:
    """One optimizer step on a batch of torch tensors -> {'loss', 'finite', 'accuracy/<task>'}."""
    self.model.train()
    batch, corrupt_video, corrupt_audio = self._modality_events(batch)
    for group in self.optimizer.param_groups:
      group["lr"] = self.schedule(self.step_count)
    if self.word_optimizer is not None:
      for group in self.word_optimizer.param_groups:
        group["lr"] = self.word_schedule(self.step_count)
    logits, explanation = self.model(batch)
    loss, accuracy = self.loss(logits, batch)
    if self.frame_relevance_weight > 0 and "frame_relevance_logits" in explanation:
      primary = next(iter(self.task_weights))
      losses = frame_selection_loss(
        explanation["frame_evidence_logits"],
        explanation["frame_relevance_logits"],
        explanation["frame_scores"],
        batch[f"labels/{primary}"].long(),
        batch["example_mask"].bool() & batch["has_video"].bool() & ~corrupt_video,
      )
      loss = loss + self.frame_relevance_weight * sum(losses.values())
    primary = next(iter(self.task_weights))
    labels = batch[f"labels/{primary}"].long()
    if self.audio_relevance_weight > 0 and "audio_relevance_logits" in explanation:
      valid = (labels >= 0) & batch["example_mask"].bool() & batch["has_audio"].bool() & ~corrupt_audio
      per_row = F.cross_entropy(explanation["audio_relevance_logits"], labels.clamp_min(0), reduction="none")
      loss = loss + self.audio_relevance_weight * (per_row * valid).sum() / valid.sum().clamp_min(1e-9)
    if self.modality_corruption > 0 and self.reliability_loss_weight > 0:
      own = {"video": explanation.get("frame_relevance_logits"), "audio": explanation.get("audio_relevance_logits")}
      for modality, corrupted in (("video", corrupt_video), ("audio", corrupt_audio)):
        loss = loss + self.reliability_loss_weight * reliability_loss(
          explanation[f"reliability_{modality}"],
          batch[f"has_{modality}"].bool() & batch["example_mask"].bool(),
          corrupted,
          None if own[modality] is None else label_confidence(own[modality], labels),
          modality in self.reliability_confidence_target,
        )
    optimizers = [self.optimizer] + ([self.word_optimizer] if self.word_optimizer is not None else [])
    for optimizer in optimizers:
      optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(self.clipped_params, self.config.grad_clip_norm)
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if finite:  # as the JAX step: a non-finite step leaves the state unchanged
      for optimizer in optimizers:
        optimizer.step()
    self.step_count += 1
    return {"loss": loss.detach(), "finite": finite, **{f"accuracy/{t}": a for t, a in accuracy.items()}}

  @torch.inference_mode()
  def forward(self, batch: Mapping[str, torch.Tensor]):
    """Eval-mode forward pass (no dropout, running BatchNorm statistics) -> (logits, explanation)."""
    self.model.eval()
    return self.model(batch)
