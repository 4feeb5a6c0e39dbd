"""Training and evaluation metrics.

On device, inside the jitted steps (clu metrics; a collection per step is merged across steps):
  train: loss, loss per task, accuracy per task, gradient norm
  eval:  cross-entropy per task and a confusion matrix per task, (C, C) int32 counts
On the host, from a confusion matrix (numpy): accuracy, weighted F1 (MELD's metric; the same numbers as
sklearn's `f1_score(average="weighted")`), macro F1, per-class precision / recall / F1 / support.

Rows that do not count: `labels/<task>` == -1 (no label for this task) and `example_mask` False (padding).

Note: clu metrics do not work with `from __future__ import annotations` (they read the annotations).
"""

import json
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from etils import epath

from mer_jax import storage


def valid_rows(labels: jax.Array, example_mask: jax.Array) -> jax.Array:
  """(B,) bool: rows with a label for the task that are real examples."""
  return (labels >= 0) & example_mask.astype(bool)


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int, mask: jax.Array) -> jax.Array:
  """(B,) int true labels, (B,) int predictions, (B,) bool mask -> (C, C) int32, rows = true class."""
  true_onehot = jax.nn.one_hot(jnp.where(mask, labels, 0), num_classes, dtype=jnp.int32)
  pred_onehot = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
  true_onehot = true_onehot * mask.astype(jnp.int32)[:, None]
  return jnp.einsum("bi,bj->ij", true_onehot, pred_onehot)


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
  """Summed confusion counts (C, C) int32; subclassed per task by `confusion_metric`."""

  counts: jax.Array

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(counts=self.counts + other.counts)

  def compute(self) -> jax.Array:
    return self.counts


def confusion_metric(task: str, num_classes: int):
  """ConfusionMatrix of `task`, read from model outputs `logits/<task>`, `labels/<task>`, `example_mask`."""

  @flax.struct.dataclass
  class TaskConfusion(ConfusionMatrix):
    @classmethod
    def empty(cls):
      return cls(counts=jnp.zeros((num_classes, num_classes), jnp.int32))

    @classmethod
    def from_model_output(cls, **outputs):
      labels = outputs[f"labels/{task}"]
      mask = valid_rows(labels, outputs["example_mask"])
      predictions = jnp.argmax(outputs[f"logits/{task}"], axis=-1)
      return cls(counts=confusion_matrix(labels, predictions, num_classes, mask))

  return TaskConfusion


def _accuracy_fn(task: str):
  def fn(**outputs):
    labels = outputs[f"labels/{task}"]
    correct = jnp.argmax(outputs[f"logits/{task}"], axis=-1) == labels
    return {"values": correct.astype(jnp.float32), "mask": valid_rows(labels, outputs["example_mask"])}

  return fn


def _example_loss_fn(task: str):
  def fn(**outputs):
    labels = outputs[f"labels/{task}"]
    return {"values": outputs[f"example_loss/{task}"], "mask": valid_rows(labels, outputs["example_mask"])}

  return fn


def train_collection(
  tasks: Sequence[str], frame_relevance: bool = False, reliability: bool = False, audio_relevance: bool = False
):
  """clu Collection class for training. Model outputs it reads: `loss` (), `loss/<task>` (),
  `grad_norm` (), `logits/<task>` (B, C), `labels/<task>` (B,), `example_mask` (B,); with `frame_relevance`
  also `loss/frame_evidence`, `loss/frame_head` and `loss/frame_scorer` () (losses.frame_selection_loss); with
  `reliability` also `loss/reliability_video` and `loss/reliability_audio` () (modality_corruption); with
  `audio_relevance` also `loss/audio_relevance` () (losses.audio_relevance_loss)."""
  fields: dict[str, Any] = {
    "loss": clu_metrics.Average.from_output("loss"),
    "grad_norm": clu_metrics.Average.from_output("grad_norm"),
  }
  if frame_relevance:
    for name in ("evidence", "head", "scorer"):
      fields[f"loss_frame_{name}"] = clu_metrics.Average.from_output(f"loss/frame_{name}")
  if reliability:
    for modality in ("video", "audio"):
      fields[f"loss_reliability_{modality}"] = clu_metrics.Average.from_output(f"loss/reliability_{modality}")
  if audio_relevance:
    fields["loss_audio_relevance"] = clu_metrics.Average.from_output("loss/audio_relevance")
  for task in tasks:
    fields[f"loss_{task}"] = clu_metrics.Average.from_output(f"loss/{task}")
    fields[f"accuracy_{task}"] = clu_metrics.Average.from_fun(_accuracy_fn(task))
  return clu_metrics.Collection.create(**fields)


def eval_collection(tasks: dict[str, int]):
  """clu Collection class for evaluation (`tasks`: name -> number of classes). Model outputs it reads:
  `example_loss/<task>` (B,) cross-entropy, `logits/<task>`, `labels/<task>`, `example_mask`."""
  fields: dict[str, Any] = {}
  for task, num_classes in tasks.items():
    fields[f"loss_{task}"] = clu_metrics.Average.from_fun(_example_loss_fn(task))
    fields[f"confusion_{task}"] = confusion_metric(task, num_classes)
  return clu_metrics.Collection.create(**fields)


# ----------------------------------------------------------------------------- host side (numpy)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
  out = np.zeros(np.shape(numerator), np.float64)
  np.divide(numerator, denominator, out=out, where=np.asarray(denominator) != 0)
  return out


def classification_report(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
  """(C, C) counts (rows = true class) -> accuracy, weighted / macro F1, per-class scores.

  Weighted F1 = sum_c support_c * F1_c / sum_c support_c, exactly sklearn's `average="weighted"`;
  macro F1 averages over the classes that occur as a label or a prediction (sklearn's default labels).
  """
  cm = np.asarray(confusion, np.int64)
  num_classes = cm.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix.")
  true_positive = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_divide(true_positive, predicted)
  recall = _safe_divide(true_positive, support)
  f1 = _safe_divide(2 * true_positive, support + predicted)
  total = int(support.sum())
  present = (support + predicted) > 0
  return {
    "num_examples": total,
    "accuracy": float(true_positive.sum() / total) if total else float("nan"),
    "weighted_f1": float((f1 * support).sum() / total) if total else float("nan"),
    "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    "per_class": {
      name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
      for name, p, r, f, s in zip(names, precision, recall, f1, support)
    },
    "class_names": names,
    "confusion_matrix": cm.tolist(),
  }


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
  """Label arrays (N,) int -> `classification_report` (rows with y_true < 0 are ignored)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  keep = y_true >= 0
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (y_true[keep], y_pred[keep]), 1)
  return classification_report(cm)


def eval_report(computed: dict, classes: dict[str, Sequence[str]]) -> dict:
  """`eval_collection(...).compute()` (host arrays) -> {task: classification report + loss}."""
  report = {}
  for task, names in classes.items():
    task_report = classification_report(np.asarray(computed[f"confusion_{task}"]), names)
    task_report["loss"] = float(computed[f"loss_{task}"])
    report[task] = task_report
  return report


def eval_scalars(report: dict, prefix: str) -> dict[str, float]:
  """Flat scalars for a metric writer: `<prefix>/<task>_{accuracy,weighted_f1,macro_f1,loss}` and
  `<prefix>/<task>_f1/<class>`."""
  scalars = {}
  for task, task_report in report.items():
    for key in ("accuracy", "weighted_f1", "macro_f1", "loss"):
      scalars[f"{prefix}/{task}_{key}"] = task_report[key]
    for name, scores in task_report["per_class"].items():
      scalars[f"{prefix}/{task}_f1/{name}"] = scores["f1"]
  return scalars


def format_confusion(task_report: dict) -> str:
  """A confusion matrix as a fixed-width text table (rows = true class, columns = predicted)."""
  names = task_report["class_names"]
  width = max(6, max(len(n) for n in names) + 1)
  lines = [" " * width + "".join(n[: width - 1].rjust(width) for n in names)]
  for name, row in zip(names, task_report["confusion_matrix"]):
    lines.append(name[: width - 1].ljust(width) + "".join(str(v).rjust(width) for v in row))
  return "\n".join(lines)


class EvalLog:
  """`<eval_dir>/step_<N>.json` per evaluation and `best.json`, the best by `best_metric`
  ('<task>/<accuracy|weighted_f1|macro_f1>'); the best survives restarts (read back from best.json).
  Only the process with `write` True writes files; every process tracks the best."""

  def __init__(self, eval_dir: str, best_metric: str, *, write: bool = True):
    self.eval_dir, self.best_metric, self.write = epath.Path(eval_dir), best_metric, write
    self.task, _, self.key = best_metric.partition("/")
    path = self.eval_dir / "best.json"
    self.best = json.loads(path.read_text()) if path.exists() else None

  def add(self, step: int, split: str, report: dict) -> dict:
    """Records one evaluation ({task: report}); returns the record (its "value" is the best_metric)."""
    if self.task not in report or self.key not in report[self.task]:
      raise ValueError(
        f"config.best_metric={self.best_metric!r}: use '<task>/<metric>' with a task of "
        f"{sorted(report)} and a metric of accuracy, weighted_f1, macro_f1."
      )
    value = report[self.task][self.key]
    record = {"step": step, "split": split, "best_metric": self.best_metric, "value": value, "tasks": report}
    self._write(f"step_{step}.json", record)
    if self.best is None or value > self.best["value"]:
      self.best = record
      self._write("best.json", record)
    return record

  def _write(self, name: str, record: dict) -> None:
    if not self.write:
      return
    storage.write_json(os.fspath(self.eval_dir / name), record)  # whole or not at all: never a half-written file
