"""Evaluate a trained run on any MELD-format CSV: accuracy, weighted F1, per-class F1, confusion matrix.

  python -m mer_jax.tools.evaluate --workdir runs/meld_text --csv ../shared/data/meld/dev_sent_emo.csv
  python -m mer_jax.tools.evaluate --workdir runs/meld --csv test_sent_emo.csv --clips output_repeated_splits_test \
      [--json] [--batch-size 64] [--step N]

The run's config comes from WORKDIR/config.json and its weights from the best checkpoint (else the
latest; --step picks one). The CSV (and the clip folder, when given) is prepared into a temporary folder
by the library that also feeds the project's builder (mer_jax/data/meld_csv.py), with the same clip reading,
frame count and label columns as the run's training data, so evaluation sees what training saw. Without
--clips the examples are text-only (has_video = has_audio = False). Context turns and max_text_length
follow the run.

Rows that cannot be evaluated (unknown label, bad or duplicate ids) are skipped, never silently: their
count and ids are printed (stderr) and listed under "skipped_rows" in the JSON.

--json prints {task: {accuracy, weighted_f1, macro_f1, per_class_f1, confusion, class_names,
num_examples}, "skipped_rows": {reason: {count, ids}}, "checkpoint": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from mer_jax import errors
from mer_jax import storage
from mer_jax import tools

SPLIT = "eval"
BUILDER_CONFIG_NAME = "evaluate_csv"
MAX_LISTED_IDS = 20


def csv_format(config, with_clips: bool):
  """The format that prepares one CSV (+ clips) as the run's training data was prepared.

  The columns, tasks, classes and clip name pattern are config.data's (csv_format.format_from_config); clips are
  read as the preset the run's data was prepared with (config.data.builder_config when it names one, else the one
  config.data.prepare names: 'csv', a corpus of one's own, reads as 'meld'), with config.data's frame settings.
  """
  from mer_jax.data import csv_format as csv_format_lib

  formats, data = csv_format_lib.FORMATS, config.data
  name = data.get("builder_config") or ""
  if name in formats:  # the run read data prepared in this format (frames may be resized later)
    base = formats[name]
    frame_size = base.frame_size
  else:
    base = formats.get(data.get("prepare") or "meld", formats["meld"])
    frame_size = int(data.frame_size)
  if base.text_only and with_clips:  # e.g. a meld_text run evaluated on clips: read them as 'meld' does
    base = dataclasses.replace(formats["meld"], label_columns=base.label_columns, classes=base.classes)
  return dataclasses.replace(
    csv_format_lib.format_from_config(data, base),
    text_only=not with_clips,
    num_frames=int(data.num_frames),
    frame_size=max(frame_size, int(data.frame_size)),
    max_audio_seconds=float(data.get("max_audio_seconds", base.max_audio_seconds)),
  )


def check_inputs(csv_path: str, clips_dir: str | None, keep_dir: str | None = None) -> None:
  """Raises a UserError for a --csv, --clips or --keep-prepared that cannot be used, before the run is loaded.
  --keep-prepared may be a gs:// folder; the CSV and clips must be local (they are decoded here)."""
  storage.require_local(csv_path, "--csv")
  if clips_dir is not None:
    storage.require_local(clips_dir, "--clips")
  if not os.path.isfile(csv_path):
    raise errors.PathNotFound(
      f"--csv {csv_path} is not a file; pass a MELD-format CSV (Utterance, Speaker, "
      "Dialogue_ID, Utterance_ID and one column per label, e.g. Emotion, Sentiment)."
    )
  if clips_dir is not None and not os.path.isdir(clips_dir):
    raise errors.PathNotFound(
      f"--clips {clips_dir} is not a folder; pass the folder of the CSV's clips (named by the run's "
      "config.data.clip_pattern), or leave it out for a text-only evaluation."
    )
  if keep_dir is not None and storage.exists(os.path.join(keep_dir, "tfds")):
    raise errors.InvalidInput(
      f"--keep-prepared {keep_dir} already holds prepared data (tfds/); pass a new or empty "
      "folder, so that nothing prepared from another CSV is read by mistake."
    )
  if keep_dir is not None and storage.is_file(keep_dir):
    raise errors.InvalidInput(f"--keep-prepared {keep_dir} is a file; pass a new or empty folder.")


def prepare_csv(config, csv_path: str, clips_dir: str | None, work_dir: str) -> tuple[str, dict]:
  """Prepares `csv_path` (+ `clips_dir`) under `work_dir`/tfds -> (data_dir, the split's report)."""
  from mer_jax.data import meld_csv

  check_inputs(csv_path, clips_dir, work_dir)
  data_dir = os.path.join(work_dir, "tfds")
  storage.make_dirs(data_dir)
  _, report = meld_csv.prepare_split(
    csv_path,
    clips_dir,
    csv_format(config, clips_dir is not None),
    data_dir,
    split=SPLIT,
    name=config.data.get("builder", "meld_format"),
    config_name=BUILDER_CONFIG_NAME,
  )
  return data_dir, report


def skipped_rows(report: dict) -> dict:
  """{reason: {count, ids}} of the CSV rows (a split's report) that could not become examples."""
  return {
    reason: {"count": entry["count"], "ids": entry["ids"]} for reason, entry in report.get("rows_skipped", {}).items()
  }


def predict(config, variables: dict, data_dir: str, batch_size: int) -> dict:
  """Runs the model over the prepared split -> {"id": (N,) bytes, "labels/<task>": (N,) int,
  "predictions/<task>": (N,) int, "logits/<task>": (N, C) float32} (padding rows removed)."""
  import jax
  import numpy as np

  from mer_jax.data import input_pipeline
  from mer_jax.models import emotion_model as model_lib
  from mer_jax.tools import progress

  config = config.copy_and_resolve_references()
  config.data.builder_config = BUILDER_CONFIG_NAME
  config.eval_batch_size = int(batch_size)
  model = model_lib.for_this_host(config.model)
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False)[0])
  ds = input_pipeline.make_dataset(config, SPLIT, train=False, data_dir=data_dir, process_index=0, process_count=1)
  tasks = list(config.model.tasks)
  chunks: dict[str, list] = {"id": []}
  batches = progress.bar(input_pipeline.as_numpy(ds), total=progress.dataset_length(ds), description="evaluate")
  for batch in batches:
    logits = jax.device_get(forward(variables, input_pipeline.model_inputs(batch)))
    keep = np.asarray(batch["example_mask"], bool)
    chunks["id"].append(batch["id"][keep])
    for task in tasks:
      for key, value in (
        (f"labels/{task}", batch[f"labels/{task}"]),
        (f"logits/{task}", np.asarray(logits[task], np.float32)),
        (f"predictions/{task}", np.argmax(logits[task], axis=-1)),
      ):
        chunks.setdefault(key, []).append(np.asarray(value)[keep])
  return {key: np.concatenate(values) for key, values in chunks.items()}


def task_metrics(outputs: dict, classes: dict) -> dict:
  """{task: {accuracy, weighted_f1, macro_f1, per_class_f1, confusion, class_names, num_examples}}.

  Rows with label -1 (no label for the task) are not counted.
  """
  import numpy as np

  from mer_jax.training import metrics as metrics_lib

  result = {}
  for task, names in classes.items():
    labels, predictions = outputs[f"labels/{task}"], outputs[f"predictions/{task}"]
    keep = labels >= 0
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (labels[keep], predictions[keep]), 1)
    report = metrics_lib.classification_report(confusion, names)
    result[task] = {
      "accuracy": report["accuracy"],
      "weighted_f1": report["weighted_f1"],
      "macro_f1": report["macro_f1"],
      "per_class_f1": {name: scores["f1"] for name, scores in report["per_class"].items()},
      "confusion": report["confusion_matrix"],
      "class_names": list(names),
      "num_examples": report["num_examples"],
    }
  return result


def evaluate_csv(
  workdir: str,
  csv_path: str,
  clips_dir: str | None = None,
  batch_size: int | None = None,
  step: int | None = None,
  keep_dir: str | None = None,
  config_path: str | None = None,
) -> dict:
  """The whole job; returns the JSON report (see module docstring). `keep_dir`: prepare there and keep
  the prepared data (default: a temporary folder, removed afterwards). `config_path`: the config file the
  run was trained with, for workdirs without config.json."""
  from mer_jax.data import input_pipeline
  from mer_jax.training import runs

  check_inputs(csv_path, clips_dir, keep_dir)  # before the run loads: a typo costs seconds, not minutes
  run = runs.load_run(workdir, config_path, step)
  config = run.config
  work_dir = keep_dir or tempfile.mkdtemp(prefix="mer_jax_evaluate_")
  try:
    data_dir, split_report = prepare_csv(config, csv_path, clips_dir, work_dir)
    eval_config = config.copy_and_resolve_references()
    eval_config.data.builder_config = BUILDER_CONFIG_NAME
    classes = input_pipeline.dataset_info(eval_config, data_dir)["classes"]
    outputs = predict(
      config, run.variables, data_dir, batch_size or int(config.get("eval_batch_size", config.batch_size))
    )
  finally:
    if keep_dir is None:
      shutil.rmtree(work_dir, ignore_errors=True)
  result: dict[str, Any] = task_metrics(outputs, {task: classes[task] for task in config.model.tasks})
  result["skipped_rows"] = skipped_rows(split_report)
  result["clip_problems"] = {reason: entry["count"] for reason, entry in split_report.get("clip_problems", {}).items()}
  result["checkpoint"] = run.source
  result["csv"] = os.path.abspath(csv_path)
  result["rows_read"] = split_report.get("rows_read")
  return result


def format_report(result: dict) -> str:
  """Human-readable summary: per task accuracy, weighted F1, per-class F1 and the confusion matrix."""
  from mer_jax.training import metrics as metrics_lib

  checkpoint = result["checkpoint"]
  lines = [
    f"{result['csv']}: {result['rows_read']} rows; checkpoint step {checkpoint['checkpoint_step']} "
    f"({checkpoint['chosen_as']}) of {checkpoint['workdir']}"
  ]
  for task, scores in result.items():
    if not isinstance(scores, dict) or "weighted_f1" not in scores:
      continue
    lines.append(
      f"\n{task}: {scores['num_examples']} examples, accuracy {scores['accuracy']:.4f}, "
      f"weighted F1 {scores['weighted_f1']:.4f}, macro F1 {scores['macro_f1']:.4f}"
    )
    lines.append("  per-class F1: " + ", ".join(f"{n} {f:.3f}" for n, f in scores["per_class_f1"].items()))
    lines.append("  confusion matrix (rows = true, columns = predicted):")
    table = metrics_lib.format_confusion(
      {"class_names": scores["class_names"], "confusion_matrix": scores["confusion"]}
    )
    lines.extend("  " + row for row in table.splitlines())
  return "\n".join(lines)


def _report_skipped(result: dict) -> None:
  for reason, entry in result["skipped_rows"].items():
    ids = entry["ids"][:MAX_LISTED_IDS]
    more = f" (+{entry['count'] - len(ids)} more)" if entry["count"] > len(ids) else ""
    print(f"skipped {entry['count']} rows ({reason}): {', '.join(ids)}{more}", file=sys.stderr)
  for reason, count in result["clip_problems"].items():
    print(f"{count} clips with problems ({reason}): evaluated with that modality marked missing", file=sys.stderr)


def main(argv=None) -> dict:
  """Evaluates, prints the report (stdout) and the skipped rows (stderr); returns the JSON report."""
  parser = argparse.ArgumentParser(prog="python -m mer_jax.tools.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a training workdir (config.json + checkpoints/)")
  parser.add_argument("--csv", required=True, help="MELD-format CSV to evaluate on")
  parser.add_argument(
    "--clips",
    default=None,
    help="the CSV's clip folder (clips named by the run's config.data.clip_pattern); omit: text only",
  )
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--config", default=None, help="config file, for workdirs without config.json")
  parser.add_argument(
    "--keep-prepared",
    default=None,
    metavar="DIR",
    help="prepare the CSV into DIR and keep it (default: a temporary folder)",
  )
  args = parser.parse_args(argv)
  # stdout carries the report alone (TFDS prints "Downloading and preparing dataset ..." there).
  with contextlib.redirect_stdout(sys.stderr):
    result = evaluate_csv(
      args.workdir, args.csv, args.clips, args.batch_size, args.step, args.keep_prepared, args.config
    )
  _report_skipped(result)
  print(json.dumps(result, indent=1) if args.json else format_report(result))
  return result


def cli(argv=None) -> int:
  """Entry point of `mer-jax-evaluate` and `python -m mer_jax.tools.evaluate`: exit status 0 when `main` returns,
  2 with one line on stderr for a path or value the user can fix."""
  return tools.run_command(main, argv)


if __name__ == "__main__":
  sys.exit(cli())
