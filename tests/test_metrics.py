"""Eval metrics (mer_jax/training/metrics.py): F1 against values worked out by hand (and sklearn's documented
example), masking of unlabeled and padding rows, clu collections merged over batches."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.training import metrics


def test_sklearn_documented_example():
  # sklearn.metrics.f1_score docs: y_true=[0,1,2,0,1,2], y_pred=[0,2,1,0,0,1]
  # -> per class [0.8, 0, 0], macro 0.2667, weighted 0.2667.
  report = metrics.f1_scores([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], 3)
  f1 = [report["per_class"][str(c)]["f1"] for c in range(3)]
  np.testing.assert_allclose(f1, [0.8, 0.0, 0.0])
  assert report["macro_f1"] == pytest.approx(0.26666667)
  assert report["weighted_f1"] == pytest.approx(0.26666667)
  assert report["accuracy"] == pytest.approx(1 / 3)


def test_weighted_f1_imbalanced_by_hand():
  # class 0: tp 3, support 4, predicted 3 -> F1 6/7; class 1: tp 1, 2, 2 -> 1/2; class 2: tp 1, 1, 2 -> 2/3.
  report = metrics.f1_scores([0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 2, 2], 3)
  assert report["weighted_f1"] == pytest.approx((4 * 6 / 7 + 2 * 0.5 + 1 * 2 / 3) / 7)
  assert report["macro_f1"] == pytest.approx((6 / 7 + 0.5 + 2 / 3) / 3)
  assert report["accuracy"] == pytest.approx(5 / 7)
  assert report["per_class"]["0"] == pytest.approx({"precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4})
  assert report["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_absent_classes_and_unlabeled_rows():
  # 4 classes: class 3 never occurs (no weight, not in macro); class 2 only predicted (F1 0, in macro);
  # rows with label -1 do not count.
  report = metrics.f1_scores([0, 1, 1, -1, -1], [0, 1, 2, 3, 3], 4)
  assert report["num_examples"] == 3
  assert report["per_class"]["3"]["f1"] == 0.0 and report["per_class"]["3"]["support"] == 0
  assert report["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
  assert report["weighted_f1"] == pytest.approx((1 * 1.0 + 2 * 2 / 3) / 3)
  empty = metrics.classification_report(np.zeros((3, 3), int), ["a", "b", "c"])
  assert np.isnan(empty["weighted_f1"]) and empty["num_examples"] == 0


def test_device_confusion_matrix_masks_rows():
  labels = jnp.array([0, 2, -1, 1, 2])
  predictions = jnp.array([0, 1, 2, 1, 2])
  example_mask = jnp.array([True, True, True, True, False])
  cm = metrics.confusion_matrix(labels, predictions, 3, metrics.valid_rows(labels, example_mask))
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])


def _eval_outputs(rng, n, padded):
  logits = {t: rng.normal(size=(n, c)).astype(np.float32) for t, c in (("emotion", 7), ("sentiment", 3))}
  labels = {"emotion": rng.integers(-1, 7, n), "sentiment": rng.integers(0, 3, n)}
  mask = np.ones(n, bool)
  mask[n - padded :] = False
  outputs = {"example_mask": jnp.asarray(mask)}
  for t in logits:
    outputs.update(
      {
        f"logits/{t}": jnp.asarray(logits[t]),
        f"labels/{t}": jnp.asarray(labels[t], jnp.int32),
        f"example_loss/{t}": jnp.asarray(rng.random(n).astype(np.float32)),
      }
    )
  return outputs


def test_eval_collection_merges_batches_like_one_pass():
  rng = np.random.default_rng(0)
  tasks = {"emotion": 7, "sentiment": 3}
  batches = [_eval_outputs(rng, 8, 0), _eval_outputs(rng, 8, 3)]
  collection_cls = metrics.eval_collection(tasks)
  merged = collection_cls.empty()
  for b in batches:
    merged = merged.merge(collection_cls.single_from_model_output(**b))
  computed = merged.compute()
  for task, classes in tasks.items():
    y_true = np.concatenate([np.asarray(b[f"labels/{task}"])[np.asarray(b["example_mask"])] for b in batches])
    y_pred = np.concatenate(
      [np.asarray(b[f"logits/{task}"]).argmax(-1)[np.asarray(b["example_mask"])] for b in batches]
    )
    want = metrics.f1_scores(y_true, y_pred, classes)
    got = metrics.classification_report(np.asarray(computed[f"confusion_{task}"]))
    assert got["confusion_matrix"] == want["confusion_matrix"]
    losses = np.concatenate([np.asarray(b[f"example_loss/{task}"]) for b in batches])
    keep = np.concatenate([(np.asarray(b[f"labels/{task}"]) >= 0) & np.asarray(b["example_mask"]) for b in batches])
    assert float(computed[f"loss_{task}"]) == pytest.approx(losses[keep].mean(), rel=1e-6)
  report = metrics.eval_report(computed, {"emotion": [str(i) for i in range(7)], "sentiment": ["n", "p", "q"]})
  scalars = metrics.eval_scalars(report, "eval/dev")
  assert "eval/dev/emotion_weighted_f1" in scalars and "eval/dev/sentiment_f1/p" in scalars
  assert metrics.format_confusion(report["sentiment"]).splitlines()[1].startswith("n")


def test_train_collection_accuracy_ignores_unlabeled_and_padding():
  outputs = {
    "loss": jnp.float32(2.0),
    "grad_norm": jnp.float32(1.0),
    "loss/emotion": jnp.float32(1.5),
    "logits/emotion": jnp.asarray(np.eye(7, dtype=np.float32)[[0, 1, 2, 3]]),
    "labels/emotion": jnp.array([0, 5, -1, 3]),
    "example_mask": jnp.array([True, True, True, False]),
  }
  collection = metrics.train_collection(["emotion"]).single_from_model_output(**outputs)
  computed = collection.merge(collection).compute()
  assert float(computed["accuracy_emotion"]) == pytest.approx(0.5)  # rows 0 (right) and 1 (wrong)
  assert float(computed["loss"]) == pytest.approx(2.0) and float(computed["loss_emotion"]) == pytest.approx(1.5)


def test_eval_log_keeps_the_best_and_overwrites_best_json(tmp_path):
  log = metrics.EvalLog(str(tmp_path / "eval"), "emotion/weighted_f1")
  for step, value in ((100, 0.4), (200, 0.7), (300, 0.6)):
    log.add(step, "dev", {"emotion": {"weighted_f1": value}})
  best = json.load(open(tmp_path / "eval" / "best.json"))
  assert best["step"] == 200 and best["value"] == 0.7
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
    "best.json",
    "step_100.json",
    "step_200.json",
    "step_300.json",
  ]
