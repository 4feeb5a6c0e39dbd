"""The claims, measured: a trained run over a prepared split -> R/claims.json, R/report.md and PNG plots.

    python -m mer_jax.tools.report --workdir W --out R [--split dev|test] [--max-examples N] [--seed S]

Measured on every dataset: per-class F1 and the confusion matrix per task; where the chosen frames sit in
the clip (histogram + chi-square test against uniform); the gate and the reliabilities; faithfulness, i.e.
the accuracy drop when the K chosen frames are blanked vs when K random other frames are blanked.
With the demo corpus's ground-truth sidecar (`<source_dir>/<split>_ground_truth.jsonl`) also: selection
precision@K against the true key frames, and r_a, r_v and accuracy on clean / audio- / video-corrupted clips.

Blanking protocol: the frames are set to 0 (black) in the model's input, and the scorer's scores of the
blanked frames are replaced by -1e9 (a flax method interceptor) while everything else the scorer sees is
unchanged, so the model re-selects its K frames among the frames that were not blanked. Blanking alone would
let the model pick the black frames again, which tests the backbone's view of black, not the selection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
from etils import epath

from mer_jax import errors
from mer_jax import storage
from mer_jax import tools
from mer_jax.tools import explain
from mer_jax.tools import progress
from mer_jax.training import metrics as metrics_lib
from mer_jax.tools.report_figures import (
  GROUPS,
  _fmt,
  plot_faithfulness,
  plot_modalities,
  plot_selection,
  plot_task,
  write_markdown,
)

EXCLUDED_SCORE = -1e9
# name -> (comparison, threshold, what is measured). The bars come from the issue ("explanation and the claims").
BARS = {
  "selection_precision_at_k": (
    ">=",
    0.9,
    "share of the K chosen frames that show the key (cue) group, on clips whose video is not corrupted",
  ),
  "audio_reliability_drop": (">=", 0.3, "mean r_a on clean clips minus mean r_a on audio-corrupted clips"),
  "video_reliability_drop": (">=", 0.3, "mean r_v on clean clips minus mean r_v on video-corrupted clips"),
  "accuracy_audio_corrupted": (">=", 0.9, "primary-task accuracy on audio-corrupted clips"),
  "faithfulness_gap": (
    ">",
    0.0,
    "accuracy drop when the K chosen frames are blanked minus the drop when K random other frames are blanked",
  ),
}
SIDECAR_CLAIMS = (
  "selection_precision_at_k",
  "audio_reliability_drop",
  "video_reliability_drop",
  "accuracy_audio_corrupted",
)


# ----------------------------------------------------------------------------- running the model


def blanked_predict_fn(config):
  """Jitted (variables, batch, excluded (B, T) bool) -> (logits, explanation): the scorer's scores of the
  excluded frames are -1e9, so the hard top-K (and the soft ablation's softmax) never use them."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mer_jax.models import emotion_model as model_lib
  from mer_jax.models import frame_selector as topk

  model = model_lib.for_this_host(config.model)

  def apply(variables, batch, excluded):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if not (isinstance(context.module, topk.FrameScorer) and context.method_name == "__call__"):
        return out
      return jnp.where(excluded, EXCLUDED_SCORE, out)

    with nn.intercept_methods(interceptor):
      return model.apply(variables, batch, train=False)

  return jax.jit(apply)


def random_other_frames(rng: np.random.Generator, chosen: np.ndarray, num_frames: int) -> np.ndarray:
  """(B, K) chosen indices -> (B, K) sorted random indices. With T - K >= K frames left, K of the frames
  not chosen (no overlap with the chosen set); otherwise a random set other than the chosen one (when
  another set exists), which then shares some frames with it."""
  size, k = chosen.shape
  out = np.empty_like(chosen)
  for row in range(size):
    others = np.setdiff1d(np.arange(num_frames), chosen[row])
    if len(others) >= k:
      out[row] = np.sort(rng.choice(others, k, replace=False))
      continue
    for _ in range(100):
      pick = np.sort(rng.choice(num_frames, k, replace=False))
      if math.comb(num_frames, k) == 1 or set(pick.tolist()) != set(chosen[row].tolist()):
        break
    out[row] = pick
  return out


def _mask(indices: np.ndarray, num_frames: int) -> np.ndarray:
  """(B, K) indices -> (B, T) bool."""
  mask = np.zeros((indices.shape[0], num_frames), bool)
  np.put_along_axis(mask, indices, True, axis=1)
  return mask


def collect(
  config,
  variables,
  data_dir: str,
  split: str,
  *,
  max_examples: int | None = None,
  seed: int = 0,
  faithfulness: bool = True,
) -> dict:
  """Runs the model over `split` (eval order, at most `max_examples`) -> numpy arrays per example:
  ids (N,), labels/<task> (N,), logits/<task> (N, C), frame_scores (N, T), selected (N, K), gate_mean (N,),
  reliability_video/audio (N,), has_video/has_audio (N,), and with `faithfulness`
  blank_chosen/<task>, blank_random/<task> logits (N, C)."""
  import jax
  from mer_jax.data import input_pipeline

  tasks = list(config.model.tasks)
  predict = explain.predict_fn(config)
  blanked = blanked_predict_fn(config) if faithfulness else None
  rng = np.random.default_rng(seed)
  ds = input_pipeline.make_dataset(config, split, train=False, data_dir=data_dir, process_index=0, process_count=1)
  total = progress.dataset_length(ds)
  if max_examples is not None and total is not None:
    total = min(total, math.ceil(max_examples / int(config.get("eval_batch_size", config.batch_size))))
  passes = "model + 2 blanked runs" if faithfulness else "model"
  batches = progress.bar(input_pipeline.as_numpy(ds), total=total, description=f"report on {split} ({passes})")
  parts: dict[str, list] = {}
  count = 0
  for batch in batches:
    keep = batch["example_mask"].astype(bool)
    if max_examples is not None:
      keep &= np.cumsum(keep) <= max_examples - count
    if not keep.any():
      break
    inputs = input_pipeline.model_inputs(batch)
    logits, explanation = jax.device_get(predict(variables, inputs))
    num_frames = inputs["frames"].shape[1]
    row = {
      "ids": np.array([i.decode() for i in batch["id"]], object),
      "frame_scores": explanation["frame_scores"],
      "selected": explanation["selected_indices"],
      "gate_mean": np.asarray(explanation["gate"]).mean(-1),
      "reliability_video": explanation["reliability_video"],
      "reliability_audio": explanation["reliability_audio"],
      "has_video": batch["has_video"].astype(bool),
      "has_audio": batch["has_audio"].astype(bool),
    }
    for task in tasks:
      row[f"labels/{task}"] = batch[f"labels/{task}"]
      row[f"logits/{task}"] = logits[task]
    if faithfulness:
      chosen = np.asarray(explanation["selected_indices"])
      for name, indices in (("blank_chosen", chosen), ("blank_random", random_other_frames(rng, chosen, num_frames))):
        excluded = _mask(indices, num_frames)
        frames = inputs["frames"].copy()
        frames[excluded] = 0  # black
        new_logits, new_explanation = jax.device_get(blanked(variables, {**inputs, "frames": frames}, excluded))
        for task in tasks:
          row[f"{name}/{task}"] = new_logits[task]
        row[f"{name}/selected"] = new_explanation["selected_indices"]
    for key, value in row.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
    count += int(keep.sum())
    if max_examples is not None and count >= max_examples:
      break
  batches.close()
  if not count:
    raise errors.InvalidInput(f"Split {split!r} gave no examples; pass --max-examples >= 1 and a split with some.")
  return {key: np.concatenate(values) for key, values in parts.items()}


# ----------------------------------------------------------------------------- measurements


def _accuracy(labels: np.ndarray, logits: np.ndarray, rows: np.ndarray) -> float | None:
  rows = rows & (labels >= 0)
  return float(np.mean(np.argmax(logits[rows], -1) == labels[rows])) if rows.any() else None


def _mean(values: np.ndarray, rows: np.ndarray) -> float | None:
  return float(np.mean(values[rows])) if rows.any() else None


def _summary(values: np.ndarray) -> dict:
  values = np.asarray(values, np.float64)
  if not values.size:
    return {"n": 0}
  return {
    "n": int(values.size),
    "mean": float(values.mean()),
    "std": float(values.std()),
    "quartiles": [float(q) for q in np.quantile(values, [0.25, 0.5, 0.75])],
  }


def selection_histogram(selected: np.ndarray, rows: np.ndarray, num_frames: int) -> dict:
  """Counts of chosen positions over `rows` (N_rows * K in all) and a chi-square test against uniform."""
  from scipy import stats

  counts = np.bincount(selected[rows].ravel(), minlength=num_frames)
  total = int(counts.sum())
  result = {"counts": counts.tolist(), "num_examples": int(rows.sum()), "total": total, "chi2": None, "p_value": None}
  if total:
    chi2, p_value = stats.chisquare(counts)
    # All counts equal (e.g. K = T) gives chi2 = 0 and p = 1 (scipy may say NaN on 0 / 0).
    result["chi2"] = float(chi2) if np.isfinite(chi2) else 0.0
    result["p_value"] = float(p_value) if np.isfinite(p_value) else 1.0
  return result


def task_metrics(data: dict, classes: dict) -> dict:
  """{task: metrics.classification_report} of the collected predictions."""
  out = {}
  for task, names in classes.items():
    labels, predicted = data[f"labels/{task}"], np.argmax(data[f"logits/{task}"], -1)
    keep = labels >= 0
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (labels[keep], predicted[keep]), 1)
    out[task] = metrics_lib.classification_report(confusion, names)
  return out


def faithfulness_metrics(data: dict, task: str, rows: np.ndarray) -> dict:
  """Accuracy on `rows` as run, with the chosen frames blanked, with K random other frames blanked."""
  labels = data[f"labels/{task}"]
  clean = _accuracy(labels, data[f"logits/{task}"], rows)
  chosen = _accuracy(labels, data[f"blank_chosen/{task}"], rows)
  random = _accuracy(labels, data[f"blank_random/{task}"], rows)
  drop = lambda after: None if clean is None or after is None else clean - after
  return {
    "task": task,
    "num_examples": int((rows & (labels >= 0)).sum()),
    "accuracy": clean,
    "accuracy_blank_chosen": chosen,
    "accuracy_blank_random": random,
    "drop_blank_chosen": drop(chosen),
    "drop_blank_random": drop(random),
  }


# ----------------------------------------------------------------------------- the ground-truth sidecar


def load_sidecar(config, split: str) -> tuple[dict | None, str]:
  """({id: record} or None, a line saying where it came from or why there is none)."""
  source = config.data.get("source_dir") or ""
  if not source:
    return None, "config.data.source_dir is empty, so there is no ground-truth sidecar (real data such as MELD)."
  path = os.path.join(os.path.expanduser(source), f"{split}_ground_truth.jsonl")  # a local folder or gs://
  if not storage.is_file(path):
    return None, (
      f"{path} does not exist: the dataset has no ground truth for frames or corruptions "
      "(only the generated demo corpus has one)."
    )
  records = [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
  return {r["id"]: r for r in records}, f"ground truth read from {path}"


def key_frames(record: dict, num_frames: int) -> set[int]:
  """The model's frame indices (of T uniform samples) that show the key group of a sidecar record.

  The sidecar's key_frame_indices index P canonical positions (P = key + decoy frames, 12 in the demo);
  with T == P they are the model's indices. Otherwise sample j at t = (j + 0.5) * duration / T shows video
  frame floor(t * fps), whose group is that of the position nearest its midpoint (make_demo_corpus's rule).
  """
  key = [int(i) for i in record["key_frame_indices"]]
  positions = len(key) + sum(len(d["frame_indices"]) for d in record.get("decoys", []))
  if num_frames == positions:
    return set(key)
  out = set()
  for j in range(num_frames):
    t = (j + 0.5) * float(record["duration"]) / num_frames
    video_frame = min(int(t * float(record["fps"])), int(record["num_frames"]) - 1)
    position = min(int((video_frame + 0.5) / int(record["num_frames"]) * positions), positions - 1)
    if position in key:
      out.add(j)
  return out


def sidecar_metrics(data: dict, sidecar: dict, task: str, top_k: int) -> dict:
  """Selection precision@K vs the key frames, and r_a, r_v, accuracy per corruption group."""
  ids = data["ids"]
  known = np.array([i in sidecar for i in ids])
  group = np.array([(sidecar[i].get("corrupted") or "clean") if i in sidecar else "" for i in ids], object)
  num_frames = data["frame_scores"].shape[1]
  precision_rows = known & data["has_video"] & (group != "video")
  precisions, ceilings = [], []
  for row in np.flatnonzero(precision_rows):
    key = key_frames(sidecar[ids[row]], num_frames)
    precisions.append(len(key & set(data["selected"][row].tolist())) / top_k)
    ceilings.append(min(len(key), top_k) / top_k)
  groups = {}
  for name in GROUPS:
    rows = known & (group == name)
    groups[name] = {
      "num_examples": int(rows.sum()),
      "reliability_audio": _mean(data["reliability_audio"], rows),
      "reliability_video": _mean(data["reliability_video"], rows),
      "accuracy": _accuracy(data[f"labels/{task}"], data[f"logits/{task}"], rows),
    }
  return {
    "num_examples_with_ground_truth": int(known.sum()),
    "num_examples_without": int((~known).sum()),
    "precision_at_k": float(np.mean(precisions)) if precisions else None,
    "precision_at_k_ceiling": float(np.mean(ceilings)) if ceilings else None,
    "precision_num_examples": len(precisions),
    "groups": groups,
    "task": task,
  }


# ----------------------------------------------------------------------------- claims


def claim(name: str, value: float | None) -> dict:
  comparison, threshold, what = BARS[name]
  met = value is not None and (value >= threshold if comparison == ">=" else value > threshold)
  return {"value": value, "bar": f"{comparison} {threshold}", "met": bool(met), "what": what}


def _difference(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def primary_task(config) -> str:
  task = str(config.get("best_metric", "")).split("/")[0]
  return task if task in config.model.tasks else config.model.primary_task


def measure(config, data: dict, classes: dict, split: str) -> dict:
  """The measurements and the claims (claims.json without run metadata) from `collect`'s arrays."""
  task = primary_task(config)
  num_frames = data["frame_scores"].shape[1]
  sidecar, sidecar_note = load_sidecar(config, split)
  result: dict[str, Any] = {
    "num_examples": int(data["ids"].size),
    "primary_task": task,
    "top_k": int(config.model.top_k),
    "num_frames": int(num_frames),
    "tasks": task_metrics(data, classes),
    "selection_histogram": selection_histogram(data["selected"], data["has_video"], num_frames),
    "gate_mean": _summary(data["gate_mean"]),
    "reliability_video": _summary(data["reliability_video"]),
    "reliability_audio": _summary(data["reliability_audio"]),
    "sidecar_note": sidecar_note,
    "sidecar": None,
    "faithfulness": None,
  }
  claims = {}
  if sidecar is not None:
    side = sidecar_metrics(data, sidecar, task, int(config.model.top_k))
    result["sidecar"] = side
    groups = side["groups"]
    claims["selection_precision_at_k"] = claim("selection_precision_at_k", side["precision_at_k"])
    claims["audio_reliability_drop"] = claim(
      "audio_reliability_drop", _difference(groups["clean"]["reliability_audio"], groups["audio"]["reliability_audio"])
    )
    claims["video_reliability_drop"] = claim(
      "video_reliability_drop", _difference(groups["clean"]["reliability_video"], groups["video"]["reliability_video"])
    )
    claims["accuracy_audio_corrupted"] = claim("accuracy_audio_corrupted", groups["audio"]["accuracy"])
  if f"blank_chosen/{task}" in data:
    rows = data["has_video"].copy()
    if sidecar is not None:  # blanking frames of a black or noise clip says nothing about the selection
      rows &= np.array([(sidecar.get(i) or {}).get("corrupted") != "video" for i in data["ids"]])
    faith = faithfulness_metrics(data, task, rows)
    faith["rows"] = "has_video" + (" and video not corrupted (sidecar)" if sidecar is not None else "")
    result["faithfulness"] = faith
    claims["faithfulness_gap"] = claim(
      "faithfulness_gap", _difference(faith["drop_blank_chosen"], faith["drop_blank_random"])
    )
  result["claims"] = claims
  return result


# ----------------------------------------------------------------------------- writing the report


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def write_report(result: dict, data: dict, config, out_dir: str) -> dict:
  """claims.json, report.md and the PNGs into `out_dir` (a folder or gs://...); returns the names of the plots."""
  sidecar, _ = load_sidecar(config, result["split"])
  with storage.local_output_dir(out_dir) as folder:  # matplotlib writes local files: uploaded at the end
    plots = {
      "selection": plot_selection(
        result["selection_histogram"], result["top_k"], os.path.join(folder, "selection_positions.png")
      ),
      "modalities": plot_modalities(data, sidecar, os.path.join(folder, "modalities.png")),
    }
    for task, report in result["tasks"].items():
      plots[f"task_{task}"] = plot_task(task, report, os.path.join(folder, f"task_{task}.png"))
    if result["faithfulness"] is not None:
      plots["faithfulness"] = plot_faithfulness(result["faithfulness"], os.path.join(folder, "faithfulness.png"))
    result["plots"] = plots
    with open(os.path.join(folder, "claims.json"), "w") as f:
      json.dump(_jsonable(result), f, indent=1)
    write_markdown(result, plots, os.path.join(folder, "report.md"))
  return plots


def report_run(
  workdir: str,
  out_dir: str | None,
  *,
  split: str = "dev",
  max_examples: int | None = None,
  seed: int = 0,
  config_path: str | None = None,
  step: int | None = None,
  faithfulness: bool = True,
) -> dict:
  """Loads the run, measures `split`, and (with `out_dir`) writes the report. Returns the claims.json dict."""
  from mer_jax.export import contract
  from mer_jax.export import metadata as export_metadata
  from mer_jax.training import runs

  if out_dir:
    tools.check_output_folder(out_dir)
  run = runs.load_run(workdir, config_path, step)
  config = contract.export_config(run.config)  # float32 compute: the claims are measured, not trained
  runs.split_size(config, run.data_dir(), split)  # the prepared data is there and has the split
  data = collect(
    config, run.variables, run.data_dir(), split, max_examples=max_examples, seed=seed, faithfulness=faithfulness
  )
  result = {"workdir": storage.absolute_path(workdir), "split": split, "seed": seed, "checkpoint": run.source}
  result.update(measure(config, data, export_metadata.class_names(config, run.best), split))
  if out_dir:
    write_report(result, data, config, out_dir)
  return _jsonable(result)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m mer_jax.tools.report", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
  parser.add_argument("--out", required=True, help="report folder (claims.json, report.md, PNGs)")
  parser.add_argument("--split", default="dev", help="prepared split to measure (dev or test)")
  parser.add_argument("--max-examples", type=int, default=None, help="first N examples of the split only")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random frames blanked for comparison")
  parser.add_argument("--config", default=None, help="config file, for workdirs without config.json")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--no-faithfulness", action="store_true", help="skip the blanking runs (3x faster)")
  args = parser.parse_args(argv)
  result = report_run(
    args.workdir,
    args.out,
    split=args.split,
    max_examples=args.max_examples,
    seed=args.seed,
    config_path=args.config,
    step=args.step,
    faithfulness=not args.no_faithfulness,
  )
  for name, entry in result["claims"].items():
    print(f"{name}: {_fmt(entry['value'])} (bar {entry['bar']}) -> {'met' if entry['met'] else 'NOT met'}")
  print(f"Wrote {os.path.join(args.out, 'claims.json')} and report.md")
  return result


def cli(argv: Sequence[str] | None = None) -> int:
  """Entry point of `mer-jax-report` and `python -m mer_jax.tools.report`: exit status 0 when `main` returns,
  2 with one line on stderr for a path or value the user can fix."""
  return tools.run_command(main, argv)


if __name__ == "__main__":
  sys.exit(cli())
