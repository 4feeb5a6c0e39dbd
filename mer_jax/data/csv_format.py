"""The layout of a MELD-format dataset (`CsvFormat`), its presets, and its values from and against a config.

Every name in a MELD-format source folder -- the CSV and clip folder of each split, the clip name pattern, the
columns, the tasks with their label columns and class lists -- is a field of `CsvFormat`, so a corpus of one's own
needs a config, not a code edit (docs/OWN_DATA.md). `FORMATS` holds MELD's, the demo corpus's and MESC's values;
`config_fields` turns one into config.data values (configs/default.py), `format_from_config` turns config.data
back into a format (launch.py, evaluation), and `prepared_differences` says where a config disagrees with what
prepared data records of itself, so that data prepared from other files or with other classes is never reused by
mistake. Light on purpose (no clip reader, no TensorFlow): the input pipeline imports it for that check.
"""

from __future__ import annotations

import dataclasses
import string

from mer_jax import errors
from mer_jax.data import labels

# MELD's layout, the defaults of CsvFormat and of config.data: (split, CSV), (split, clip folder), (role, column).
MELD_CSV_FILES = (("train", "train_sent_emo.csv"), ("dev", "dev_sent_emo.csv"), ("test", "test_sent_emo.csv"))
MELD_CLIP_FOLDERS = (("train", "train_splits"), ("dev", "dev_splits_complete"), ("test", "output_repeated_splits_test"))
MELD_CLIP_PATTERN = "dia{dialogue_id}_utt{utterance_id}.mp4"
MELD_COLUMNS = (
  ("utterance", "Utterance"),
  ("speaker", "Speaker"),
  ("dialogue_id", "Dialogue_ID"),
  ("utterance_id", "Utterance_ID"),
)
REQUIRED_COLUMNS = ("utterance", "dialogue_id", "utterance_id")  # speaker is optional ('' when absent)
CLIP_PATTERN_FIELDS = ("dialogue_id", "utterance_id", "split")
# The config.data fields that describe a source folder (besides data.tasks); dataset_metadata records them.
SOURCE_FIELDS = ("csv_files", "clip_folders", "clip_pattern", "columns", "no_label_values")


def _pairs(mapping) -> tuple:
  """A mapping (dict, ConfigDict) or (key, value) pairs -> ((key, value), ...), tuples for sequence values."""
  items = mapping.items() if hasattr(mapping, "items") else mapping
  return tuple((str(key), tuple(value) if isinstance(value, (list, tuple)) else value) for key, value in items)


@dataclasses.dataclass(eq=False, kw_only=True)
class CsvFormat:
  """A MELD-format dataset: where its files are, which columns hold what, which tasks and classes, how clips are read.

  The mapping fields are (key, value) pairs (hashable, as TFDS builder configs are): label_columns (task, CSV column)
  in task order, classes (task, class names in label-id order), csv_files and clip_folders (split, name under the
  source folder; a split without a clip folder is text-only, a clip folder of a split without a CSV is ignored),
  columns (role, CSV column) for the roles utterance, speaker, dialogue_id, utterance_id. clip_pattern names a row's
  clip inside its folder, from {dialogue_id}, {utterance_id} and {split} (format specs such as {utterance_id:04d}
  work). Column names match case-insensitively ('Dialogue_ID' = 'dialogue id'). The builder's configs
  (data/meld_format.py) are CsvFormats.
  """

  label_columns: tuple = (("emotion", "Emotion"), ("sentiment", "Sentiment"))
  classes: tuple = (("emotion", labels.EMOTIONS), ("sentiment", labels.SENTIMENTS))
  no_label_values: tuple = labels.NO_LABEL_VALUES
  csv_files: tuple = MELD_CSV_FILES
  clip_folders: tuple = MELD_CLIP_FOLDERS
  clip_pattern: str = MELD_CLIP_PATTERN
  columns: tuple = MELD_COLUMNS
  num_frames: int = 12
  frame_size: int = 112
  face_crop: bool = True
  sample_rate: int = 16000
  max_audio_seconds: float = 10.0
  max_clip_seconds: float = 60.0
  text_only: bool = False
  # Decoding cost (see ClipReadConfig): real clips take the I/P frame nearest each t_i (at most a few
  # frames off) without H.264 deblocking (about one grey level), cheaper than exact frames.
  exact_frames: bool = False
  skip_loop_filter: bool = True
  num_workers: int | None = None  # clip-decoding processes; None: os.cpu_count()

  def task_names(self) -> tuple:
    return tuple(task for task, _ in self.label_columns)

  def class_names(self) -> dict:
    """task -> class names (normalised: `labels.label_key`), in label-id order; InvalidInput if a task has none."""
    table = dict(self.classes)
    missing = [task for task in self.task_names() if task not in table]
    if missing:
      raise errors.InvalidInput(
        f"No class list for the tasks {missing}; add one per task to config.data.classes, e.g. "
        f"--config.data.classes.{missing[0]}='(\"low\", \"high\")'."
      )
    return {task: labels.check_class_names(task, table[task], self.no_label_values) for task in self.task_names()}

  def splits(self) -> tuple:
    """((split, CSV name, clip folder name or None), ...) in csv_files order."""
    folders = dict(self.clip_folders)
    return tuple((split, csv_name, folders.get(split)) for split, csv_name in self.csv_files)

  def check(self) -> None:
    """Raises InvalidInput, naming the config.data field to fix, when the layout cannot be read."""
    self.class_names()
    names = {role for role, _ in self.columns}
    if missing := [role for role in REQUIRED_COLUMNS if role not in names]:
      raise errors.InvalidInput(
        f"config.data.columns lacks {missing}: it maps each of {list(REQUIRED_COLUMNS)} (and optionally "
        "'speaker') to your CSV's column name."
      )
    if not self.csv_files:
      raise errors.InvalidInput("config.data.csv_files is empty: name each split's CSV, e.g. {'train': 'train.csv'}.")
    fields = {field for _, field, _, _ in string.Formatter().parse(self.clip_pattern) if field is not None}
    try:
      self.clip_pattern.format(dialogue_id=0, utterance_id=0, split="train")
    except (KeyError, IndexError, ValueError) as error:
      fields.add(f"<{error}>")
    if fields - set(CLIP_PATTERN_FIELDS) or not fields & {"dialogue_id", "utterance_id"}:
      raise errors.InvalidInput(
        f"config.data.clip_pattern = {self.clip_pattern!r}: name a row's clip with {{dialogue_id}} and/or "
        "{utterance_id} (optionally {split}), e.g. 'dia{dialogue_id}_utt{utterance_id}.mp4'."
      )

  def layout_help(self) -> str:
    """The source folder this format reads, in words (for messages about a folder that does not fit)."""
    csvs = ", ".join(f"{split}: {name}" for split, name in self.csv_files)
    folders = ", ".join(f"{split}: {name}/" for split, name in self.clip_folders) or "none"
    roles = ", ".join(f"{role} {column!r}" for role, column in self.columns)
    label_columns = ", ".join(f"{task} {column!r}" for task, column in self.label_columns)
    meld = " (MELD.Raw.tar.gz unpacked)" if _pairs(self.csv_files) == MELD_CSV_FILES else ""
    return (
      f"The source folder{meld} holds one CSV per split ({csvs}; config.data.csv_files) with the columns "
      f"{roles} (config.data.columns) and one label column per task ({label_columns}; config.data.label_columns), "
      f"and, for video and audio, clip folders ({folders}; config.data.clip_folders) of clips named "
      f"{self.clip_pattern} (config.data.clip_pattern). The files may also sit one folder down. CSVs alone give "
      "a text-only dataset. See docs/OWN_DATA.md."
    )

  def clip_read_config(self):
    from mer_jax.data import clip_reader  # here: the format checks need no PyAV or OpenCV

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

  def record(self) -> dict:
    """What prepared data records of its format (meld_csv.dataset_metadata), as `prepared_differences` reads it."""
    return {
      "classes": {task: list(names) for task, names in self.class_names().items()},
      "label_columns": dict(self.label_columns),
      "source_format": self.source_record(),
    }

  def source_record(self) -> dict:
    """The SOURCE_FIELDS as compared with a config (columns by `column_key`, no-label values by `label_key`)."""
    return {
      "csv_files": dict(self.csv_files),
      "clip_folders": dict(self.clip_folders),
      "clip_pattern": self.clip_pattern,
      "columns": {role: column_key(column) for role, column in self.columns},
      "no_label_values": sorted({labels.label_key(value) for value in self.no_label_values}),
    }

  def fields(self) -> dict:
    """The CsvFormat fields as keyword arguments (for a subclass such as the builder's config)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(CsvFormat)}


LAYOUT_HELP = CsvFormat().layout_help()

# The presets; data/meld_format.py registers one builder config per entry, launch.py reads clips as the entry that
# config.data.prepare names ('csv', a corpus of one's own: as 'meld').
FORMATS = {
  "meld": CsvFormat(),
  # The demo corpus draws its cues on the frames shown at exactly t_i: read those frames.
  "demo": CsvFormat(face_crop=False, max_audio_seconds=4.0, exact_frames=True, skip_loop_filter=False),
  "meld_text": CsvFormat(text_only=True),
  "mesc": CsvFormat(
    label_columns=(("emotion", "Emotion"), ("strategy", "Strategy")),
    classes=(("emotion", labels.EMOTIONS), ("strategy", labels.MESC_STRATEGIES)),
  ),
}


def config_fields(fmt: CsvFormat) -> dict:
  """The config.data values of a format (tasks, classes, label_columns and SOURCE_FIELDS): the presets of configs,
  e.g. `config.data.update(csv_format.config_fields(csv_format.FORMATS['mesc']))`."""
  return {
    "tasks": fmt.task_names(),
    "classes": {task: tuple(names) for task, names in fmt.classes},
    "label_columns": dict(fmt.label_columns),
    "csv_files": dict(fmt.csv_files),
    "clip_folders": dict(fmt.clip_folders),
    "clip_pattern": fmt.clip_pattern,
    "columns": dict(fmt.columns),
    "no_label_values": tuple(fmt.no_label_values),
  }


def _source_values(data) -> dict:
  """The SOURCE_FIELDS config.data sets, as CsvFormat field values (pairs for mappings, tuples, strings)."""
  values = {}
  for field in SOURCE_FIELDS:
    value = data.get(field)
    if value is None:
      continue
    if field == "clip_pattern":
      values[field] = str(value)
    elif field == "no_label_values":
      values[field] = tuple(str(item) for item in value)
    else:
      values[field] = tuple((key, str(name)) for key, name in _pairs(value))
  return values


def format_from_config(data, base: CsvFormat | None = None) -> CsvFormat:
  """`base` (how clips are read; default MELD's) with the layout, tasks and classes config.data gives.

  The tasks are config.data.tasks; a task's class list and label column come from config.data.classes /
  config.data.label_columns, else from `base` (a preset that knows the task), and a label column defaults to the
  task's name. Raises InvalidInput (naming the field) when the result cannot be read.
  """
  base = base or FORMATS["meld"]
  tasks = tuple(data.tasks)
  classes = {**dict(base.classes), **dict(_pairs(data.get("classes") or {}))}
  label_columns = {**dict(base.label_columns), **dict(_pairs(data.get("label_columns") or {}))}
  fmt = dataclasses.replace(
    base,
    label_columns=tuple((task, str(label_columns.get(task, task))) for task in tasks),
    classes=tuple((task, tuple(classes[task])) for task in tasks if task in classes),
    **_source_values(data),
  )
  fmt.check()
  return fmt


def prepared_differences(metadata: dict, data) -> list[str]:
  """Where config.data disagrees with prepared data's record of itself (`dataset_metadata`), one line each.

  Only what both sides state is compared: a task config.data.classes does not list takes the prepared data's
  names, and data prepared before the record held a field is not held to it.
  """
  recorded_classes = metadata.get("classes") or {}
  recorded_columns = metadata.get("label_columns") or {}
  configured_classes = dict(_pairs(data.get("classes") or {}))
  configured_columns = dict(_pairs(data.get("label_columns") or {}))
  lines = []
  for task in data.tasks:
    if recorded_classes and task not in recorded_classes:
      lines.append(f"task {task!r}: not prepared (the prepared tasks are {sorted(recorded_classes)})")
      continue
    if task in configured_classes and task in recorded_classes:
      configured = [labels.label_key(name) for name in configured_classes[task]]
      if configured != list(recorded_classes[task]):
        lines.append(f"config.data.classes.{task}: prepared {list(recorded_classes[task])}, configured {configured}")
    column, recorded_column = configured_columns.get(task), recorded_columns.get(task)
    if column is not None and recorded_column is not None and column_key(column) != column_key(recorded_column):
      lines.append(f"config.data.label_columns.{task}: prepared {recorded_column!r}, configured {column!r}")
  recorded_source = metadata.get("source_format") or {}
  if recorded_source:
    configured_source = dataclasses.replace(FORMATS["meld"], **_source_values(data)).source_record()
    for field, recorded in recorded_source.items():
      if field in data and configured_source[field] != recorded:
        lines.append(f"config.data.{field}: prepared {recorded!r}, configured {configured_source[field]!r}")
  return lines


def column_key(name) -> str:
  """A CSV column name as looked up: 'Dialogue_ID' and 'dialogue id' both -> 'dialogue_id'."""
  return labels.label_key(name).replace(" ", "_")
