"""Predict the emotion (and every other task) of raw clips + transcripts: one clip, or a folder of clips.

    python -m mer_jax.predict --model RUN_DIR --video clip.mp4 --text "Oh my god!" [--json] [--explain out.png]
        [--context "Joey: Hi."]... [--next-context "Ross: Hey."]... [--config configs/demo.py] [--step N]
    python -m mer_jax.predict --model EXPORT/model.onnx --folder CLIPS --out OUT [--csv dev_sent_emo.csv]
        [--explain-pngs] [--workers N] [--batch-size N]

--model is a training workdir (JAX, its best checkpoint), an export folder or an exported model.onnx /
model*.tflite (onnxruntime / LiteRT, no JAX); the clip goes through the training data's own code (mer_jax.inference.runners).

--folder predicts every clip in CLIPS (video and audio files by extension; other files are listed, not
predicted). Transcripts come from --csv (a MELD-format CSV: Utterance, Dialogue_ID, Utterance_ID, Speaker, label
columns optional; a row's clip is named by the model's clip pattern, MELD's dia{D}_utt{U}.mp4; clips no row names
are listed, not predicted), else from CLIP.txt beside each clip, else there is none. It writes
OUT/predictions.jsonl (one line of strict JSON per clip, in order; a clip that cannot be read gets its `error` and
a prediction from what could be read, text at least), OUT/gallery.html (one self-contained page: open it in a
browser), OUT/summary.json and, with --explain-pngs, OUT/explanations/<id>.png ('/' in an id becomes '_').
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from mer_jax.inference import api
from mer_jax.inference import runners
from mer_jax import errors
from mer_jax import tools
from mer_jax.export import runtimes

# Files --folder predicts: containers FFmpeg reads (video first; audio-only files are predicted without video).
CLIP_EXTENSIONS = (
  *(".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".flv", ".wmv"),
  *(".asf", ".3gp", ".3g2", ".ogv", ".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus"),
)
TRANSCRIPT_EXTENSION = ".txt"
MAX_LISTED = 10


# ----------------------------------------------------------------------------- one clip


def explain_png(prediction: api.Prediction, class_names: dict, out_png: str, labels: dict | None = None) -> dict:
  """The explanation PNG (+ JSON beside it) of a prediction made with return_frames=True (tools/explain.py)."""
  from mer_jax.tools import explain as explain_lib

  with np.errstate(divide="ignore"):  # log(0) = -inf: softmax of the log gives the probabilities back
    logits = {task: np.log(list(entry.probabilities.values())) for task, entry in prediction.tasks.items()}
  signals = {
    "frame_scores": np.asarray(prediction.frame_scores),
    "selected_indices": np.asarray([frame.index for frame in prediction.chosen_frames]),
    "reliability_video": prediction.reliability_video,
    "reliability_audio": prediction.reliability_audio,
    "gate": prediction.gate if prediction.gate is not None else np.full(1, np.nan),  # exports before the gate
  }
  # Without video the frames were blank and none was chosen (api.Prediction): the PNG shows no frame row.
  frames = prediction.frames if prediction.has_video else prediction.frames[:0]
  return explain_lib.show_prediction_sample(
    prediction.id,
    prediction.text,
    frames[..., None],
    logits,
    signals,
    class_names,
    out_png,
    labels=labels,
    frame_times=prediction.frame_times,
  )


def format_result(record: dict) -> str:
  """A prediction's JSON record (Prediction.to_json + model, runtime) as a few lines for a person."""
  lines = [f"{record['clip']} ({record['duration_seconds']:.2f} s) with {record['runtime']}: \"{record['text']}\""]
  for task, probabilities in record["probs"].items():
    top = ", ".join(f"{name} {p:.3f}" for name, p in sorted(probabilities.items(), key=lambda item: -item[1]))
    lines.append(f"  {task:10s} {record['label'][task]:10s} ({top})")
  chosen = ", ".join(f"#{f['index']} at {f['time_seconds']:.2f} s" for f in record["chosen_frames"])
  lines.append(f"  chosen frames: {chosen or 'none (no video read)'}")
  lines.append(
    f"  reliability: video {record['reliability_video']:.3f}, audio {record['reliability_audio']:.3f}"
    f"  (has_video {record['has_video']}, has_audio {record['has_audio']})"
  )
  if record["error"]:
    lines.append(f"  error: {record['error']}")
  elif record["problems"]:
    lines.append(f"  clip problems: {', '.join(record['problems'])}")
  return "\n".join(lines)


def _check_video_arguments(args) -> None:
  """Raises a user error for an unusable --video / --text, before the model loads (a typo costs no wait)."""
  if not (args.text or "").strip():
    raise errors.InvalidInput('--text is empty; pass the utterance\'s transcript, e.g. --text "Oh my God!".')
  try:
    runners.check_clip_path(args.video)
  except errors.PathNotFound as error:
    raise errors.PathNotFound(f"--video {error}") from error
  if args.csv or args.out or args.explain_pngs:
    raise errors.InvalidInput("--csv, --out and --explain-pngs go with --folder; with --video, use --explain PNG.")
  if args.explain:  # as explain.check_output does for its --out, with this command's flag in the message
    if os.path.isdir(args.explain):
      raise errors.InvalidInput(
        f"--explain {args.explain} is a folder; pass the PNG's path, e.g. {os.path.join(args.explain, 'clip.png')}."
      )
    tools.check_output_folder(os.path.dirname(os.path.abspath(args.explain)), "--explain")


def predict_one(model: api.Model, args) -> dict:
  """--video: one clip. A file that holds neither video nor audio is a user error (exit 2)."""
  prediction = model.predict(
    args.video, args.text, args.context, next_context=args.next_context, return_frames=bool(args.explain)
  )
  if not prediction.has_video and not prediction.has_audio:
    reasons = ", ".join(prediction.problems)
    raise errors.InvalidInput(
      f"--video {args.video} is not a clip FFmpeg can read ({reasons}); pass an mp4 or another video file."
    )
  record = {"model": model.path, "runtime": model.runtime, **prediction.to_json()}
  if args.explain:
    explain_png(prediction, model.class_names, args.explain)
    record["explanation_png"] = args.explain
  print(json.dumps(record, allow_nan=False) if args.json else format_result(record))
  return record


# ----------------------------------------------------------------------------- a folder


def csv_layout(model: api.Model, header: Sequence[str]):
  """The csv_format.CsvFormat that reads a CSV for `model`: the columns and clip name pattern of the model's training
  data (MELD's where the model does not record them), the label columns the CSV has (labels are optional) with the
  model's classes. Raises InvalidInput when an id or text column is missing."""
  from mer_jax.data import csv_format

  layout, found = model.data_layout, {csv_format.column_key(name): name for name in header}
  base = csv_format.FORMATS["meld"]
  columns = dict(layout.get("columns") or dict(base.columns))
  missing = [columns[role] for role in csv_format.REQUIRED_COLUMNS if csv_format.column_key(columns[role]) not in found]
  if missing:
    raise errors.InvalidInput(
      f"--csv lacks the columns {missing} (it has {list(header)}); pass a MELD-format CSV with the model's text and "
      f"id columns ({', '.join(columns.values())}); label columns are optional."
    )
  label_columns = {task: (layout.get("label_columns") or {}).get(task, task) for task in model.class_names}
  present = {
    task: found[csv_format.column_key(c)] for task, c in label_columns.items() if csv_format.column_key(c) in found
  }
  fmt = dataclasses.replace(
    base,
    label_columns=tuple(present.items()),  # labels are optional: the label columns the CSV has
    classes=tuple((task, tuple(model.class_names[task])) for task in present),
    columns=tuple(columns.items()),
    csv_files=tuple(dict(layout.get("csv_files") or dict(base.csv_files)).items()),
    clip_pattern=str(layout.get("clip_pattern") or base.clip_pattern),
    no_label_values=tuple(layout.get("no_label_values") or base.no_label_values),
  )
  return fmt


def _csv_items(folder: str, csv_path: str, model: api.Model) -> tuple[list, dict, dict]:
  """(items, true labels by id, notes) of a MELD-format CSV; label columns optional, context per row. Notes: the
  rows skipped (bad or duplicate ids), the labels the model does not know (no truth for them) and the clips in
  the folder that no row names (not predicted)."""
  import csv
  import io

  from mer_jax.data import meld_csv
  from mer_jax.data import text_normalize

  with open(csv_path, "rb") as f:
    csv_text = text_normalize.decode_csv_bytes(f.read())
  fmt = csv_layout(model, next(csv.reader(io.StringIO(csv_text)), []))
  split = os.path.splitext(os.path.basename(csv_path))[0]
  split = {name: key for key, name in fmt.csv_files}.get(os.path.basename(csv_path), split)  # dev_sent_emo: dev
  report = meld_csv.SplitReport(csv_path, folder, "clips")
  unknown_by_id: dict = {}  # a label the model does not know: the row is still predicted, without truth
  rows = meld_csv.read_rows(csv_path, split, fmt, report, unknown_labels=unknown_by_id)
  if not rows:
    raise errors.InvalidInput(f"No row of --csv {csv_path} could be read: {json.dumps(report.data['rows_skipped'])}.")
  classes = dict(fmt.classes)
  truth = (
    {
      row["id"]: {task: classes[task][label] if label >= 0 else None for task, label in row["labels"].items()}
      for row in rows
    }
    if classes
    else {}
  )
  unknown: dict = {}
  for values in unknown_by_id.values():
    for task, value in values.items():
      unknown.setdefault(task, collections.Counter())[value] += 1
  unknown = {task: dict(counts) for task, counts in unknown.items()}
  names = [meld_csv.clip_name(fmt.clip_pattern, row) for row in rows]
  meld_csv.count_unlabeled_clips(folder, fmt.clip_pattern, {name.lower() for name in names}, report)
  neighbours = runners.dialogue_neighbours(rows)
  items = [
    {
      "id": row["id"],
      "video": os.path.join(folder, name),
      "text": row["text"],
      "context": neighbours[row["id"]][0],
      "next_context": neighbours[row["id"]][1],
    }
    for row, name in zip(rows, names)
  ]
  notes = {
    "rows_skipped": report.data["rows_skipped"],
    "labels_unknown_to_the_model": unknown,
    "clips_not_in_csv": report.data["unlabeled_clips"]["ids"],
  }
  return items, truth, notes


def _folder_items(folder: str) -> tuple[list, list]:
  """(items, files that are not clips) of a folder: clip files by extension, transcripts from CLIP.txt."""
  names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
  files = [name for name in names if os.path.isfile(os.path.join(folder, name))]
  clips = [name for name in files if os.path.splitext(name)[1].lower() in CLIP_EXTENSIONS]
  stems = [os.path.splitext(name)[0] for name in clips]
  transcripts, counts = {stem + TRANSCRIPT_EXTENSION for stem in stems}, collections.Counter(stems)
  others = [name for name in files if name not in clips and name not in transcripts]
  items = []
  for name, stem in zip(clips, stems):
    sidecar = os.path.join(folder, stem + TRANSCRIPT_EXTENSION)
    text = (
      pathlib.Path(sidecar).read_text(encoding="utf-8", errors="replace").strip() if os.path.isfile(sidecar) else ""
    )
    unique = stem if counts[stem] == 1 else name  # a.mp4 and a.wav: ids by file name
    items.append({"id": unique, "video": os.path.join(folder, name), "text": text})
  return items, others


def _check_folder_arguments(args) -> tuple | None:
  """Raises a user error for unusable --folder arguments, before the model loads (a wrong folder costs no
  wait); returns `_folder_items` of the folder, or None with --csv."""
  if not os.path.exists(args.folder):
    raise errors.PathNotFound(f"--folder {args.folder} not found; pass the folder that holds the clips.")
  if not os.path.isdir(args.folder):
    raise errors.PathNotFound(f"--folder {args.folder} is a file; pass its folder, or predict one clip with --video.")
  if not args.out:
    raise errors.InvalidInput("--folder needs --out OUT, the folder for predictions.jsonl and gallery.html.")
  tools.check_output_folder(args.out)
  if args.text or args.context or args.next_context:
    raise errors.InvalidInput(
      "--text, --context and --next-context go with --video; with --folder, pass --csv or CLIP.txt files."
    )
  if args.explain or args.json:
    raise errors.InvalidInput("--explain and --json go with --video; with --folder, use --explain-pngs.")
  if args.csv:
    if not os.path.isfile(args.csv):
      raise errors.PathNotFound(f"--csv {args.csv} not found; pass a MELD-format CSV (Utterance, Dialogue_ID, ...).")
    return None
  listing = _folder_items(args.folder)
  if not listing[0]:
    raise errors.InvalidInput(
      f"--folder {args.folder} holds no clip files ({', '.join(CLIP_EXTENSIONS[:6])}, ...); pass the folder "
      "of the clips, or a MELD-format CSV with --csv."
    )
  return listing


def _print_notes(items: list, notes: dict) -> None:
  """What was not predicted, or predicted with less, on stderr: nothing is left out silently."""
  for reason, entry in notes.get("rows_skipped", {}).items():
    listed = ", ".join(entry["ids"][:MAX_LISTED])
    print(f"note: {entry['count']} CSV rows skipped ({reason}), not predicted: {listed}", file=sys.stderr)
  for task, values in notes.get("labels_unknown_to_the_model", {}).items():
    listed = ", ".join(f"{value!r} ({count})" for value, count in list(values.items())[:MAX_LISTED])
    print(f"note: {task} labels the model does not know (no truth for those rows): {listed}", file=sys.stderr)
  for key, what in (
    ("files_not_clips", "files are not clips (by extension)"),
    ("clips_not_in_csv", "clips in --folder are named by no --csv row"),
  ):
    if notes.get(key):
      names = notes[key]
      listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
      print(f"note: {len(names)} {what}, not predicted: {listed}", file=sys.stderr)
  untranscribed = sum(1 for item in items if not item["text"])
  if untranscribed:
    print(
      f"note: {untranscribed} clips have no transcript (no --csv, no CLIP.txt): predicted from video and audio",
      file=sys.stderr,
    )


def predict_folder(model: api.Model, args, listing: tuple | None) -> dict:
  """--folder: every clip (or every CSV row) -> predictions.jsonl, gallery.html, summary.json; returns the summary.

  listing: `_folder_items` of the folder (None with --csv), made before the model was loaded.
  """
  from mer_jax.tools import gallery
  from mer_jax.tools import progress

  if args.csv:
    items, truth, notes = _csv_items(args.folder, args.csv, model)
  else:
    (items, not_clips), truth = listing, {}
    notes = {"files_not_clips": not_clips}
  _print_notes(items, notes)
  os.makedirs(args.out, exist_ok=True)
  explanations = os.path.join(args.out, "explanations")
  correct = {task: [] for task in model.class_names}
  errors_count, start = 0, time.time()
  jsonl_path = os.path.join(args.out, "predictions.jsonl")
  stream = model.iter_predict(items, workers=args.workers, batch_size=args.batch_size, return_frames=True)
  with gallery.GalleryWriter(os.path.join(args.out, "gallery.html")) as writer:  # no side file left on a failure
    with open(jsonl_path, "w") as jsonl, progress.bar(total=len(items), description="predict", unit="clip") as bar:
      for prediction in stream:
        record = prediction.to_json()
        if prediction.id in truth:
          record["true_label"] = truth[prediction.id]
          record["correct"] = {t: record["label"][t] == v for t, v in truth[prediction.id].items() if v is not None}
          for task, right in record["correct"].items():
            correct[task].append(right)
        href = None
        if args.explain_pngs:
          href = os.path.join("explanations", prediction.id.replace("/", "_") + ".png")
          names = model.class_names
          labels = {t: names[t].index(v) for t, v in record.get("true_label", {}).items() if v is not None}
          explain_png(prediction, names, os.path.join(args.out, href), labels)
          record["explanation_png"] = href
        errors_count += prediction.error is not None
        jsonl.write(json.dumps(record, allow_nan=False) + "\n")  # to_json made it finite: strict JSON
        writer.add(record, prediction.frames, href)
        bar.update()
    seconds = time.time() - start
    summary = {
      "model": model.path,
      "runtime": model.runtime,
      "folder": args.folder,
      "csv": args.csv,
      "clips": len(items),
      "errors": errors_count,
      "accuracy": {t: {"accuracy": float(np.mean(v)), "labelled": len(v)} for t, v in correct.items() if v},
      **notes,
      "seconds": round(seconds, 1),
      "predictions": jsonl_path,
      "gallery": writer.path,
      "explanations": explanations if args.explain_pngs else None,
    }
    writer.close(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, allow_nan=False)
  print(
    f"Predicted {len(items)} clips with {model.runtime} in {seconds:.1f} s ({len(items) / max(seconds, 1e-9):.1f} "
    f"clips/s); {errors_count} could not be read (their `error` says why; predicted from what could be read)."
  )
  for task, entry in summary["accuracy"].items():
    print(f"  {task} accuracy {entry['accuracy']:.3f} over {entry['labelled']} labelled clips")
  print(f"  {jsonl_path}\n  {summary['gallery']}  (open it in a browser)")
  return summary


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
  arguments = argparse.ArgumentParser(prog="python -m mer_jax.predict", description=__doc__.split("\n")[0])
  arguments.add_argument(
    "--model", required=True, help="training workdir (JAX), export folder, or exported model.onnx / model*.tflite"
  )
  what = arguments.add_mutually_exclusive_group(required=True)
  what.add_argument("--video", help="one clip (mp4 or anything FFmpeg reads)")
  what.add_argument("--folder", help="a folder of clips (with --csv: the clips of its rows)")
  arguments.add_argument("--text", help="--video: the utterance's transcript")
  arguments.add_argument(
    "--context",
    action="append",
    default=None,
    help="--video: an earlier utterance of the dialogue ('Speaker: text'), oldest first; repeat. "
    "Used when the model was trained with config.data.context_turns > 0",
  )
  arguments.add_argument(
    "--next-context",
    action="append",
    default=None,
    help="--video: a later utterance of the dialogue ('Speaker: text'), in dialogue order; repeat. "
    "Used when the model was trained with config.data.context_future_turns > 0",
  )
  arguments.add_argument("--json", action="store_true", help="--video: print one JSON object")
  arguments.add_argument("--explain", default=None, help="--video: write the explanation PNG (and JSON) here")
  arguments.add_argument("--csv", default=None, help="--folder: a MELD-format CSV whose rows give ids, text, labels")
  arguments.add_argument("--out", default=None, help="--folder: where predictions.jsonl and gallery.html go")
  arguments.add_argument("--explain-pngs", action="store_true", help="--folder: an explanation PNG per clip")
  arguments.add_argument("--workers", type=int, default=None, help="--folder: clip-decoding processes (default: cores)")
  arguments.add_argument("--batch-size", type=int, default=8, help="--folder: clips per model call")
  arguments.add_argument("--config", default=None, help="workdir only: override WORKDIR/config.json")
  arguments.add_argument("--step", type=int, default=None, help="workdir only: checkpoint step (default best)")
  arguments.add_argument("--threads", type=int, default=None, help="ONNX/TFLite CPU threads")
  return arguments


def main(argv: Sequence[str] | None = None) -> dict:
  args = parser().parse_args(argv)
  listing = _check_folder_arguments(args) if args.folder is not None else _check_video_arguments(args)
  try:
    model = api.load(args.model, config=args.config, step=args.step, threads=args.threads)
  except errors.UserError as error:
    message = str(error)
    message = f"--model {message}" if message.startswith(args.model) else f"--model {args.model}: {message}"
    raise type(error)(message) from error
  return predict_folder(model, args, listing) if args.folder is not None else predict_one(model, args)


def cli() -> int:
  """Entry point of `mer-jax-predict`, `python -m mer_jax.predict` and `python -m mer_jax.tools.predict`: exit
  status 0, or 2 with one line on stderr for a user error."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up warnings would bury a one-line error
  runtimes.import_tensorflow_without_jax()  # a plain `import tensorflow` pulls JAX in, which ONNX / TFLite need not
  return tools.run_command(main)


if __name__ == "__main__":
  sys.exit(cli())
