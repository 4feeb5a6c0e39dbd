"""MELD-format data (MELD, MESC-format sets, the demo corpus): CSV rows + clips -> prepared examples.

A MELD-format split is a CSV (columns Utterance, Speaker, Dialogue_ID, Utterance_ID and one column per
label) and, optionally, a folder of clips `dia{D}_utt{U}.mp4`. This module reads the rows (text normalised,
labels mapped to ids, bad rows counted under a reason), pairs each row with its clip and turns both into
one prepared example (docs/ARCHITECTURE.md "Prepared example", `example_features`). The TFDS builder
(data/meld_format.py) and the evaluation of a run on any CSV (`mer_jax.tools.evaluate`, `prepare_split`)
both go through it, so a CSV row becomes the same example in training and in evaluation.

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

from mer_jax.data import clip_reader
from mer_jax.data import labels
from mer_jax.data import text_normalize

REPORT_FILE = "prepare_report.json"
MELD_SPLITS = (  # (split, CSV, clip folder)
  ("train", "train_sent_emo.csv", "train_splits"),
  ("dev", "dev_sent_emo.csv", "dev_splits_complete"),
  ("test", "test_sent_emo.csv", "output_repeated_splits_test"),
)
# ESConv's eight support strategies, the set MESC annotates; a release with other names passes its own.
MESC_STRATEGIES = (
  "question",
  "restatement or paraphrasing",
  "reflection of feelings",
  "self-disclosure",
  "affirmation and reassurance",
  "providing suggestions",
  "information",
  "others",
)

LAYOUT_HELP = (
  "A MELD-format source folder holds one CSV per split -- train_sent_emo.csv, dev_sent_emo.csv, "
  "test_sent_emo.csv (columns Utterance, Speaker, Dialogue_ID, Utterance_ID and one column per "
  "label, e.g. Emotion, Sentiment) -- and, for video and audio, the clip folders train_splits/, "
  "dev_splits_complete/, output_repeated_splits_test/ of dia{Dialogue_ID}_utt{Utterance_ID}.mp4 "
  "(MELD.Raw.tar.gz unpacked). CSVs alone give a text-only dataset."
)


@dataclasses.dataclass(eq=False, kw_only=True)
class CsvFormat:
  """A MELD-format dataset: which label columns, how clips are read, where the files are.

  tasks: (task, CSV column) pairs; task_classes: (task, class names) for tasks that mer_jax/data/labels.py
  does not list (e.g. MESC's strategies). The builder's configs (data/meld_format.py) are CsvFormats.
  """

  tasks: tuple = (("emotion", "Emotion"), ("sentiment", "Sentiment"))
  task_classes: tuple = ()
  num_frames: int = 12
  frame_size: int = 112
  face_crop: bool = True
  sample_rate: int = 16000
  max_audio_seconds: float = 10.0
  max_clip_seconds: float = 60.0
  text_only: bool = False
  splits: tuple = MELD_SPLITS
  # Decoding cost (see ClipReadConfig): real clips take the I/P frame nearest each t_i (at most a few
  # frames off) without H.264 deblocking (about one grey level), cheaper than exact frames.
  exact_frames: bool = False
  skip_loop_filter: bool = True
  num_workers: int | None = None  # clip-decoding processes; None: os.cpu_count()

  def classes(self) -> dict:
    """task -> class names (lower case), in label-id order."""
    table = dict(labels.TASK_CLASSES)
    table.update({task: tuple(names) for task, names in self.task_classes})
    missing = [task for task, _ in self.tasks if task not in table]
    if missing:
      raise ValueError(
        f"Config {getattr(self, 'name', type(self).__name__)!r}: no class list for tasks "
        f"{missing}; pass task_classes=((task, (names...)),) or add them to mer_jax/data/labels.py."
      )
    return {task: tuple(label_key(n) for n in table[task]) for task, _ in self.tasks}

  def clip_read_config(self) -> clip_reader.ClipReadConfig:
    return clip_reader.ClipReadConfig(
      num_frames=self.num_frames,
      frame_size=self.frame_size,
      face_crop=self.face_crop,
      sample_rate=self.sample_rate,
      max_audio_seconds=self.max_audio_seconds,
      max_clip_seconds=self.max_clip_seconds,
      exact_frames=self.exact_frames,
      skip_loop_filter=self.skip_loop_filter,
    )

  def fields(self) -> dict:
    """The CsvFormat fields as keyword arguments (for a subclass such as the builder's config)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(CsvFormat)}


# The known formats; data/meld_format.py registers one builder config per entry.
FORMATS = {
  "meld": CsvFormat(),
  # The demo corpus draws its cues on the frames shown at exactly t_i: read those frames.
  "demo": CsvFormat(face_crop=False, max_audio_seconds=4.0, exact_frames=True, skip_loop_filter=False),
  "meld_text": CsvFormat(text_only=True),
  "mesc": CsvFormat(
    tasks=(("emotion", "Emotion"), ("strategy", "Strategy")), task_classes=(("strategy", MESC_STRATEGIES),)
  ),
}


def label_key(value) -> str:
  """A label as compared with the class lists: stripped, lower case, single spaces."""
  return " ".join(str(value).strip().lower().split())


def column_key(name) -> str:
  """A CSV column name as looked up: 'Dialogue_ID' and 'dialogue id' both -> 'dialogue_id'."""
  return label_key(name).replace(" ", "_")


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


def read_rows(csv_path, split: str, fmt: CsvFormat, report: SplitReport) -> list[dict]:
  """The valid rows of a split's CSV as dicts (id, dialogue_id, utterance_id, text, speaker, labels).

  Text and speaker are normalised (`text_normalize`); labels map to class ids (-1: no label). Rows with a
  bad or duplicate id or an unknown label are counted in `report`; missing columns raise ValueError.
  """
  with open(csv_path, "rb") as f:
    text = text_normalize.decode_csv_bytes(f.read())
  reader = csv.DictReader(io.StringIO(text, newline=""))
  columns = {column_key(name): name for name in reader.fieldnames or []}
  required = ["utterance", "dialogue_id", "utterance_id"] + [column_key(col) for _, col in fmt.tasks]
  missing = [name for name in required if name not in columns]
  if missing:
    raise ValueError(f"{csv_path} lacks the columns {missing} (has {reader.fieldnames}). {LAYOUT_HELP}")
  classes = fmt.classes()
  rows, seen = [], set()
  for row in reader:
    report.data["rows_read"] += 1
    ids = [parse_id(row.get(columns[k])) for k in ("dialogue_id", "utterance_id")]
    if None in ids:
      report.add(
        "rows_skipped",
        "bad_id",
        f"{split}/line{reader.line_num}:{row.get(columns['dialogue_id'])!r},{row.get(columns['utterance_id'])!r}",
      )
      continue
    example_id = f"{split}/dia{ids[0]}_utt{ids[1]}"
    if example_id in seen:
      report.add("rows_skipped", "duplicate_id", example_id)
      continue
    row_labels, unknown = {}, None
    for task, column in fmt.tasks:
      value = label_key(row.get(columns[column_key(column)]) or "")
      if value in labels.NO_LABEL_VALUES:
        row_labels[task] = -1
      elif value in classes[task]:
        row_labels[task] = classes[task].index(value)
      else:
        unknown = f"{example_id}:{task}={value!r}"
        break
    if unknown:
      report.add("rows_skipped", "unknown_label", unknown)
      continue
    seen.add(example_id)
    speaker = row.get(columns["speaker"]) if "speaker" in columns else ""
    rows.append(
      {
        "id": example_id,
        "dialogue_id": ids[0],
        "utterance_id": ids[1],
        "text": text_normalize.normalize_text(row.get(columns["utterance"])),
        "speaker": text_normalize.normalize_text(speaker),
        "labels": row_labels,
      }
    )
  return rows


# ----------------------------------------------------------------------------- examples


def clip_path(clip_dir: str, row: dict) -> str:
  """The clip of a row: CLIP_DIR/dia{D}_utt{U}.mp4."""
  return os.path.join(clip_dir, f"dia{row['dialogue_id']}_utt{row['utterance_id']}.mp4")


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


def count_unlabeled_clips(clip_dir: str, labeled: set, report: SplitReport) -> None:
  """Clips in the folder that no CSV row names (lower-case file names not in `labeled`): counted by name."""
  for name in sorted(os.listdir(clip_dir)):
    if name.lower().endswith(".mp4") and name.lower() not in labeled:
      report.data["unlabeled_clips"]["count"] += 1
      report.data["unlabeled_clips"]["ids"].append(name)


def examples(rows: list[dict], clip_dir: str | None, fmt: CsvFormat, report: SplitReport) -> Iterator[tuple]:
  """(id, prepared example) for each row, in order; clips read from `clip_dir` (None: text only).

  Clips are read over `fmt.num_workers` processes; `report` counts examples, modalities, faces and clip
  problems as they are yielded (complete once the iterator is exhausted).
  """
  start = time.time()
  read_config = fmt.clip_read_config()
  if clip_dir is not None:
    paths = [clip_path(clip_dir, r) for r in rows]
    count_unlabeled_clips(clip_dir, {os.path.basename(p).lower() for p in paths}, report)
    clips = clip_reader.read_clips(paths, read_config, fmt.num_workers)
  else:
    text_only = clip_reader.empty_clip(read_config, [])
    clips = (text_only for _ in rows)
  faces = 0
  for row, clip in zip(rows, clips):
    for reason in clip.problems:
      report.add("clip_problems", reason, row["id"])
    report.data["examples"] += 1
    report.data["with_video"] += int(clip.has_video)
    report.data["with_audio"] += int(clip.has_audio)
    faces += int(clip.face_found.sum())
    yield row["id"], example(row, clip)
  report.data["frames_with_face"] = round(faces / max(1, report.data["with_video"] * read_config.num_frames), 4)
  report.data["seconds"] = round(time.time() - start, 1)


# ----------------------------------------------------------------------------- TFDS


def example_features(fmt: CsvFormat):
  """The TFDS features of a prepared example (docs/ARCHITECTURE.md), as `input_pipeline` reads them."""
  import numpy as np
  import tensorflow_datasets as tfds

  t, s = fmt.num_frames, fmt.frame_size
  return tfds.features.FeaturesDict(
    {
      "id": tfds.features.Text(),
      "text": tfds.features.Text(),
      "speaker": tfds.features.Text(),
      "dialogue_id": tfds.features.Scalar(np.int32),
      "utterance_id": tfds.features.Scalar(np.int32),
      # zlib: text-only and broken clips are all-zero frames, which then cost nothing.
      "frames": tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
      "frame_times": tfds.features.Tensor(shape=(t,), dtype=np.float32),
      "face_found": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
      "audio": tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=fmt.sample_rate),
      "has_video": tfds.features.Scalar(np.bool_),
      "has_audio": tfds.features.Scalar(np.bool_),
      "labels": tfds.features.FeaturesDict({task: tfds.features.Scalar(np.int32) for task, _ in fmt.tasks}),
    }
  )


def dataset_metadata(fmt: CsvFormat) -> dict:
  """What the prepared data records about itself: class names per task in label-id order, the label
  columns, and how clips were read (so that prediction on a raw clip reads it the same way)."""
  return {
    "classes": {task: list(names) for task, names in fmt.classes().items()},
    "label_columns": dict(fmt.tasks),
    "clip_read_config": dataclasses.asdict(fmt.clip_read_config()),
  }


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
  Raises ValueError when no row of the CSV can be read (the report says why).
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
    raise ValueError(
      f"No row of {csv_path} could be read: {json.dumps(report.data['rows_skipped'])[:2000]}. {LAYOUT_HELP}"
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
  with open(os.path.join(builder.data_dir, REPORT_FILE), "w") as f:
    json.dump(summary, f, indent=1)
  return builder, report.data
