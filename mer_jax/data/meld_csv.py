"""MELD-format data (MELD, MESC-format sets, the demo corpus, a corpus of one's own): CSV rows + clips -> examples.

A MELD-format split is a CSV (a text column, dialogue and utterance ids, optionally a speaker, and one column per
label) and, optionally, a folder of clips named after the ids (MELD: `dia{D}_utt{U}.mp4`); which files and columns
those are is a `csv_format.CsvFormat`, filled from config.data. This module reads the rows (text normalised,
labels mapped to ids, bad rows counted under a reason), pairs each row with its clip and turns both into one
prepared example (docs/ARCHITECTURE.md "Prepared example", `example_features`). The TFDS builder
(data/meld_format.py) and the evaluation of a run on any CSV (`mer_jax.tools.evaluate`, `prepare_split`) both go
through it, so a CSV row becomes the same example in training and in evaluation.

Nothing is dropped silently: a row becomes an example or is counted, with its id, under a reason in a
`SplitReport`; a missing or broken clip gives an example marked has_video / has_audio False, its reasons
counted too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from collections.abc import Iterator

import tqdm

from mer_jax import errors
from mer_jax import storage
from mer_jax.data import clip_reader
from mer_jax.data import labels
from mer_jax.data import text_normalize
from mer_jax.data.csv_format import CsvFormat, column_key

REPORT_FILE = "prepare_report.json"


def parse_id(value):
  """'12' / ' 12 ' / '12.0' -> 12; anything else (empty, negative, text) -> None."""
  try:
    number = float(str(value).strip())
  except (TypeError, ValueError):
    return None
  if not number.is_integer() or number < 0 or number > 2**31 - 1:
    return None
  return int(number)


def find_in_source(source, name: str):
  """`source/name`, else `source/*/name` (MELD.Raw's tarballs unpack one folder down), or None."""
  source = os.fspath(source)
  direct = os.path.join(source, name)
  if os.path.exists(direct):
    return direct
  if os.path.isdir(source):
    for sub in sorted(os.listdir(source)):
      nested = os.path.join(source, sub, name)
      if os.path.exists(nested):
        return nested
  return None


class SplitReport:
  """Counts for one split: rows read, examples, and per reason a count and the ids (`data`, JSON-able)."""

  def __init__(self, csv_path, clip_dir, mode: str):
    self.data = {
      "csv": str(csv_path),
      "clip_dir": str(clip_dir) if clip_dir else None,
      "mode": mode,
      "rows_read": 0,
      "examples": 0,
      "with_video": 0,
      "with_audio": 0,
      "frames_with_face": 0.0,
      "rows_skipped": {},
      "clip_problems": {},
      "unlabeled_clips": {"count": 0, "ids": []},
    }

  def add(self, section: str, reason: str, item_id: str):
    entry = self.data[section].setdefault(reason, {"count": 0, "ids": []})
    entry["count"] += 1
    entry["ids"].append(item_id)


# ----------------------------------------------------------------------------- rows


def read_rows(
  csv_path, split: str, fmt: CsvFormat, report: SplitReport, unknown_labels: dict | None = None
) -> list[dict]:
  """The valid rows of a split's CSV as dicts (id, dialogue_id, utterance_id, text, speaker, labels).

  Columns are found by `fmt.columns` and `fmt.label_columns`. Text and speaker are normalised (`text_normalize`);
  labels map to class ids (-1: a value of fmt.no_label_values). Rows with a bad or duplicate id or an unknown
  label are counted in `report`; missing columns raise InvalidInput. With `unknown_labels` (a dict to fill), a
  label outside the class list does not skip its row (prediction: the row is still predicted, without truth): the
  task gets -1 and `unknown_labels[id][task]` the value.
  """
  with open(csv_path, "rb") as f:
    text = text_normalize.decode_csv_bytes(f.read())
  reader = csv.DictReader(io.StringIO(text, newline=""))
  found = {column_key(name): name for name in reader.fieldnames or []}
  wanted = {role: column_key(column) for role, column in fmt.columns}
  wanted.update({f"label:{task}": column_key(column) for task, column in fmt.label_columns})
  missing = [wanted[role] for role in wanted if role != "speaker" and wanted[role] not in found]
  if missing:
    raise errors.InvalidInput(
      f"{csv_path} lacks the columns {missing} (it has {reader.fieldnames}); set config.data.columns and "
      f"config.data.label_columns to the names your CSV uses. {fmt.layout_help()}"
    )
  column = {role: found.get(key) for role, key in wanted.items()}
  classes = fmt.class_names()
  no_label = {labels.label_key(value) for value in fmt.no_label_values}
  rows, seen = [], set()
  for row in reader:
    report.data["rows_read"] += 1
    raw_ids = [row.get(column["dialogue_id"]), row.get(column["utterance_id"])]
    ids = [parse_id(value) for value in raw_ids]
    if None in ids:
      report.add("rows_skipped", "bad_id", f"{split}/line{reader.line_num}:{raw_ids[0]!r},{raw_ids[1]!r}")
      continue
    example_id = f"{split}/dia{ids[0]}_utt{ids[1]}"
    if example_id in seen:
      report.add("rows_skipped", "duplicate_id", example_id)
      continue
    row_labels, unknown = {}, None
    for task in fmt.task_names():
      value = labels.label_key(row.get(column[f"label:{task}"]) or "")
      if value in no_label:
        row_labels[task] = -1
      elif value in classes[task]:
        row_labels[task] = classes[task].index(value)
      elif unknown_labels is not None:
        row_labels[task] = -1
        unknown_labels.setdefault(example_id, {})[task] = value
      else:
        unknown = f"{example_id}:{task}={value!r}"
        break
    if unknown:
      report.add("rows_skipped", "unknown_label", unknown)
      continue
    seen.add(example_id)
    speaker = row.get(column["speaker"]) if column.get("speaker") else ""
    rows.append(
      {
        "id": example_id,
        "dialogue_id": ids[0],
        "utterance_id": ids[1],
        "text": text_normalize.normalize_text(row.get(column["utterance"])),
        "speaker": text_normalize.normalize_text(speaker),
        "labels": row_labels,
      }
    )
  return rows


# ----------------------------------------------------------------------------- examples


def clip_name(pattern: str, row: dict) -> str:
  """A row's clip inside its split's clip folder: `pattern` with the row's ids and split ('/'-separated)."""
  return pattern.format(dialogue_id=row["dialogue_id"], utterance_id=row["utterance_id"], split=row["id"].split("/")[0])


def example(row: dict, clip: clip_reader.ClipData) -> dict:
  """A row of `read_rows` and its clip (or `clip_reader.empty_clip` for text only) -> a prepared example."""
  return {
    **row,
    "frames": clip.frames,
    "frame_times": clip.frame_times,
    "face_found": clip.face_found,
    "audio": clip.audio,
    "has_video": clip.has_video,
    "has_audio": clip.has_audio,
  }


def count_unlabeled_clips(clip_dir: str, pattern: str, labeled: set, report: SplitReport) -> None:
  """Files in the clip folder with the pattern's extension that no CSV row names (`labeled`: lower-case names
  relative to the folder, '/'-separated), counted by name; subfolders are searched when the pattern has them."""
  extension = os.path.splitext(pattern)[1].lower()
  for folder, subfolders, files in os.walk(clip_dir):
    subfolders.sort()
    if "/" not in pattern:
      subfolders.clear()
    for name in sorted(files):
      relative = os.path.relpath(os.path.join(folder, name), clip_dir).replace(os.sep, "/")
      if name.lower().endswith(extension) and relative.lower() not in labeled:
        report.data["unlabeled_clips"]["count"] += 1
        report.data["unlabeled_clips"]["ids"].append(relative)


def examples(rows: list[dict], clip_dir: str | None, fmt: CsvFormat, report: SplitReport) -> Iterator[tuple]:
  """(id, prepared example) for each row, in order; clips (fmt.clip_pattern) read from `clip_dir` (None: text only).

  Clips are read over `fmt.num_workers` processes, with a progress bar (done / total, ETA) on stderr; `report`
  counts examples, modalities, faces and clip problems as they are yielded (complete once the iterator is
  exhausted).
  """
  start = time.time()
  read_config = fmt.clip_read_config()
  if clip_dir is not None:
    names = [clip_name(fmt.clip_pattern, r) for r in rows]
    count_unlabeled_clips(clip_dir, fmt.clip_pattern, {name.lower() for name in names}, report)
    clips = clip_reader.read_clips([os.path.join(clip_dir, name) for name in names], read_config, fmt.num_workers)
  else:
    text_only = clip_reader.empty_clip(read_config, [])
    clips = (text_only for _ in rows)
  split = rows[0]["id"].split("/")[0] if rows else ""
  progress = tqdm.tqdm(
    zip(rows, clips),
    total=len(rows),
    desc=f"prepare {split}",
    unit="clip" if clip_dir is not None else "row",
    mininterval=1.0,  # a clip can take milliseconds: redraw at most once a second
    dynamic_ncols=True,
    disable=None,  # drawn only when stderr is a terminal, as the other commands' bars (mer_jax/tools/progress.py)
  )
  faces = 0
  for row, clip in progress:
    for reason in clip.problems:
      report.add("clip_problems", reason, row["id"])
    report.data["examples"] += 1
    report.data["with_video"] += int(clip.has_video)
    report.data["with_audio"] += int(clip.has_audio)
    faces += int(clip.face_found.sum())
    yield row["id"], example(row, clip)
  progress.close()
  report.data["frames_with_face"] = round(faces / max(1, report.data["with_video"] * read_config.num_frames), 4)
  report.data["seconds"] = round(time.time() - start, 1)


# ----------------------------------------------------------------------------- TFDS


def example_features(fmt: CsvFormat):
  """The TFDS features of a prepared example (docs/ARCHITECTURE.md), as `input_pipeline` reads them."""
  import numpy as np
  import tensorflow_datasets as tfds

  t, s = fmt.num_frames, fmt.frame_size
  # Frames and int16 audio are stored as raw bytes (Encoding.BYTES: one decode_raw, a copy, to read). Encoding.NONE
  # stores each value as an int64 varint and zlib costs an inflate per read: the old zlib frames + varint audio read
  # at 0.4x the rate of raw bytes (docs/INPUT_PIPELINE.md). Text-only data keeps zlib: its frames are all zeros,
  # which then cost nothing on disk. Data prepared before keeps its encoding: TFDS reads it from its features.json.
  frames_encoding = tfds.features.Encoding.ZLIB if fmt.text_only else tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict(
    {
      "id": tfds.features.Text(),
      "text": tfds.features.Text(),
      "speaker": tfds.features.Text(),
      "dialogue_id": tfds.features.Scalar(np.int32),
      "utterance_id": tfds.features.Scalar(np.int32),
      "frames": tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8, encoding=frames_encoding),
      "frame_times": tfds.features.Tensor(shape=(t,), dtype=np.float32),
      "face_found": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
      # A Tensor, not tfds's Audio feature: Audio ignores its encoding for arrays and stores int64 varints.
      "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES),
      "has_video": tfds.features.Scalar(np.bool_),
      "has_audio": tfds.features.Scalar(np.bool_),
      "labels": tfds.features.FeaturesDict({task: tfds.features.Scalar(np.int32) for task in fmt.task_names()}),
    }
  )


def dataset_metadata(fmt: CsvFormat) -> dict:
  """What the prepared data records about itself: class names per task in label-id order, the label columns, the
  source layout it was read with (`source_record`: data prepared from other files or with other classes is then
  refused, not silently reused: `prepared_differences`), and how clips were read (so that prediction on a raw
  clip reads it the same way)."""
  return {**fmt.record(), "clip_read_config": dataclasses.asdict(fmt.clip_read_config())}


def prepare_split(
  csv_path: str,
  clip_dir: str | None,
  fmt: CsvFormat,
  data_dir: str,
  *,
  split: str,
  name: str,
  config_name: str,
  version: str = "1.0.0",
) -> tuple[object, dict]:
  """One CSV (+ clip folder) as prepared TFDS data `name/config_name/version` under `data_dir`.

  Returns (builder, split report); the report (`REPORT_FILE`) is also written beside the prepared files.
  Raises InvalidInput when no row of the CSV can be read (the report says why).
  """
  import tensorflow_datasets as tfds

  class _Prepared(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=self._description,
        features=self._feature_spec,
        metadata=tfds.core.MetadataDict(dataset_metadata(fmt)),
      )

  report = SplitReport(csv_path, clip_dir, "clips" if clip_dir else "csv_only")
  rows = read_rows(csv_path, split, fmt, report)
  if not rows:
    raise errors.InvalidInput(
      f"No row of {csv_path} could be read: {json.dumps(report.data['rows_skipped'])[:2000]}. {fmt.layout_help()}"
    )
  builder = _Prepared(
    name=name,
    version=version,
    config=config_name,
    features=example_features(fmt),
    split_datasets={split: examples(rows, clip_dir, fmt, report)},
    data_dir=os.fspath(data_dir),
    description=f"{csv_path} prepared as MELD-format data.",
  )
  builder.download_and_prepare()
  summary = {
    "builder": name,
    "config": config_name,
    "version": version,
    "source": str(csv_path),
    "clip_read_config": dataclasses.asdict(fmt.clip_read_config()),
    "splits": {split: report.data},
  }
  storage.write_json(os.path.join(builder.data_dir, REPORT_FILE), summary)  # data_dir may be gs://
  return builder, report.data
