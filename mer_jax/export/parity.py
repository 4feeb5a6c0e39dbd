"""Does an export reproduce the JAX model? The inputs it is checked on, the comparison, the accuracy report.

Parity runs on N real examples of the run's eval split when its prepared data is found (else random
inputs of the batch contract; parity.json says which). `compare` measures one export's outputs against
JAX's on them; `accuracy_report` scores JAX and every export on a whole prepared split. The exports and
JAX are given as runners, fn(inputs dict) -> {output name: array}, so this module neither traces nor
loads a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from mer_jax.export import contract
from mer_jax.tools import progress

FP32_TOLERANCE = 1e-4  # max |delta| of an fp32 export against JAX (probabilities; frame scores relative)

Runner = Callable[[dict], dict]


class ParityError(RuntimeError):
  """An fp32 export does not reproduce the JAX model (too large a delta or a different predicted class)."""


def compare(config, reference: dict, outputs: dict) -> dict:
  """Max |delta| of the probabilities (and of each output), agreement of predicted classes and frames."""
  report = {"per_output": {}, "class_agreement": {}}
  for name, expected in reference.items():
    got = np.asarray(outputs[name])
    if got.shape != expected.shape:
      raise ParityError(f"Output {name}: shape {got.shape} from the export, {expected.shape} from JAX.")
    report["per_output"][name] = float(np.max(np.abs(got.astype(np.float64) - expected)))
  tasks = tuple(config.model.tasks)
  report["max_abs_delta"] = max(report["per_output"][f"probs_{t}"] for t in tasks)
  for task in tasks:
    agree = np.argmax(outputs[f"probs_{task}"], -1) == np.argmax(reference[f"probs_{task}"], -1)
    report["class_agreement"][task] = float(np.mean(agree))
  report["selected_indices_agreement"] = float(
    np.mean(np.all(outputs["selected_indices"] == reference["selected_indices"], axis=-1))
  )
  score_scale = max(1.0, float(np.max(np.abs(reference["frame_scores"]))))
  report["passed_fp32_bar"] = bool(
    report["max_abs_delta"] <= FP32_TOLERANCE
    and report["per_output"]["frame_scores"] <= FP32_TOLERANCE * score_scale
    and all(v == 1.0 for v in report["class_agreement"].values())
    and report["selected_indices_agreement"] == 1.0
  )
  return report


def accuracy_report(config, jax_runner: Runner, runners: dict[str, Runner], split: str, batches: list) -> dict:
  """Accuracy and weighted F1 per task of JAX (`jax_runner`) and of each export on `batches`, and each
  export's change against JAX."""
  from mer_jax.training import metrics

  tasks = dict(config.model.tasks)
  predictions = {"jax": {t: [] for t in tasks}, **{key: {t: [] for t in tasks} for key in runners}}
  labels = {t: [] for t in tasks}
  description = f"accuracy on {split} (JAX + {len(runners)} exports)"
  for batch in progress.bar(batches, total=len(batches), description=description):
    keep = np.asarray(batch["example_mask"], bool)
    inputs = {name: batch[name] for name in contract.INPUT_NAMES}
    for key, run in [("jax", jax_runner), *runners.items()]:
      outputs = run(inputs)
      for task in tasks:
        predictions[key][task].append(np.argmax(outputs[f"probs_{task}"], -1)[keep])
    for task in tasks:
      labels[task].append(np.asarray(batch[f"labels/{task}"])[keep])
  labels = {t: np.concatenate(v) for t, v in labels.items()}
  report = {"split": split, "examples": len(next(iter(labels.values()))), "jax": {}, "formats": {}}
  for key, per_task in predictions.items():
    entry = {}
    for task, parts in per_task.items():
      predicted = np.concatenate(parts)
      scores = metrics.f1_scores(labels[task], predicted, tasks[task])
      entry[task] = {"accuracy": round(scores["accuracy"], 5), "weighted_f1": round(scores["weighted_f1"], 5)}
      if key != "jax":
        reference = report["jax"][task]
        jax_predicted = np.concatenate(predictions["jax"][task])
        entry[task].update(
          accuracy_change=round(entry[task]["accuracy"] - reference["accuracy"], 5),
          weighted_f1_change=round(entry[task]["weighted_f1"] - reference["weighted_f1"], 5),
          agreement_with_jax=round(float(np.mean(predicted == jax_predicted)), 5),
        )
    if key == "jax":
      report["jax"] = entry
    else:
      report["formats"][key] = entry
  return report


# ----------------------------------------------------------------------------- the inputs it runs on


def split_batches(config, data_dir: str, split: str, limit: int | None = None, *, show_progress=False) -> list[dict]:
  """Eval batches of a prepared split (padding rows have example_mask False), at most `limit` real rows.
  `show_progress`: a bar while the split is read (a whole split takes minutes; N parity examples do not)."""
  from mer_jax.data import input_pipeline

  batches, rows = [], 0
  ds = input_pipeline.make_dataset(config, split, train=False, data_dir=data_dir, process_index=0, process_count=1)
  read = input_pipeline.as_numpy(ds)
  if show_progress:
    read = progress.bar(read, total=progress.dataset_length(ds), description=f"read {split}")
  for batch in read:
    batches.append(input_pipeline.model_inputs(batch))
    rows += int(np.sum(batch["example_mask"]))
    if limit is not None and rows >= limit:
      break
  return batches


def make_examples(config, num: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
  """`num` random inputs of the batch contract; row 1 has no video and row 2 no audio (when num > 2)."""
  from mer_jax.models import emotion_model as model_lib

  rng = np.random.default_rng(seed)
  spec = model_lib.input_spec(config, num)
  frames = rng.integers(0, 256, spec["frames"].shape, dtype=np.uint8)
  audio = rng.uniform(-14.0, 2.0, spec["audio"].shape).astype(np.float32)  # log-mel range
  num_audio, length = spec["audio"].shape[1], spec["text_ids"].shape[1]
  audio_mask = np.arange(num_audio)[None] < rng.integers(num_audio // 4, num_audio + 1, (num, 1))
  text_mask = np.arange(length)[None] < rng.integers(2, length + 1, (num, 1))
  vocab = int(config.model.text.compact.vocab_size) if config.model.text.kind == "compact" else 30522
  text_ids = np.where(text_mask, rng.integers(1000, vocab, (num, length)), 0).astype(np.int32)
  has_video, has_audio = np.ones(num, bool), np.ones(num, bool)
  if num > 2:
    has_video[1], has_audio[2] = False, False
    frames[1], audio[2], audio_mask[2] = 0, 0.0, False
  return {
    "frames": frames,
    "audio": audio * audio_mask[..., None],
    "audio_mask": audio_mask,
    "text_ids": text_ids,
    "text_mask": text_mask,
    "has_video": has_video,
    "has_audio": has_audio,
  }


def parity_examples(config, data_dir: str, num: int) -> tuple[dict, str]:
  """(`num` real examples of config.eval_split, 'where from'), else random ones when there is no data."""
  split = config.get("eval_split", "dev")
  try:
    batches = split_batches(config, data_dir, split, num)
  except (FileNotFoundError, KeyError, ValueError) as error:
    warnings.warn(f"Parity check on random inputs: no prepared {split!r} split ({error}).")
    return make_examples(config, num), f"random inputs (make_examples): no prepared {split!r} split"
  keep = np.concatenate([np.asarray(b["example_mask"], bool) for b in batches])
  examples = {
    name: np.concatenate([b[name] for b in batches])[keep][:num]
    for name in batches[0]
    if name != "example_mask" and not name.startswith("labels/")
  }
  return examples, f"first {len(examples['frames'])} examples of the {split!r} split in {data_dir}"
