"""TFDS builder for MELD-format data: MELD itself, MESC-format sets and the demo corpus.

The manual dir holds, per split, a CSV and (optionally) a folder of clips `dia{D}_utt{U}.mp4`:

    train_sent_emo.csv   train_splits/
    dev_sent_emo.csv     dev_splits_complete/
    test_sent_emo.csv    output_repeated_splits_test/

(MELD.Raw's layout; the files may also sit one folder down, as MELD.Raw's tarballs unpack). A split
exists when its CSV does. With no clip folder (or the 'meld_text' config) examples are text-only:
has_video = has_audio = False. Each example follows docs/ARCHITECTURE.md "Prepared example".

Nothing is dropped silently: a CSV row becomes an example or is counted, with its id, under a
reason in `prepare_report.json` (in the builder's data_dir, beside the prepared files); a clip that
is missing or broken gives an example marked has_video / has_audio False, its reasons counted too.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import time

import numpy as np
import tensorflow_datasets as tfds

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
MESC_STRATEGIES = ("question", "restatement or paraphrasing", "reflection of feelings",
                   "self-disclosure", "affirmation and reassurance", "providing suggestions",
                   "information", "others")
CLIP_NAME = re.compile(r"^dia(\d+)_utt(\d+)\.mp4$", re.IGNORECASE)

LAYOUT_HELP = (
    "A MELD-format source folder holds one CSV per split -- train_sent_emo.csv, dev_sent_emo.csv, "
    "test_sent_emo.csv (columns Utterance, Speaker, Dialogue_ID, Utterance_ID and one column per "
    "label, e.g. Emotion, Sentiment) -- and, for video and audio, the clip folders train_splits/, "
    "dev_splits_complete/, output_repeated_splits_test/ of dia{Dialogue_ID}_utt{Utterance_ID}.mp4 "
    "(MELD.Raw.tar.gz unpacked). CSVs alone give a text-only dataset.")


@dataclasses.dataclass(eq=False)
class MeldFormatConfig(tfds.core.BuilderConfig):
    """A MELD-format dataset: which label columns, how clips are read, where the files are.

    tasks: (task, CSV column) pairs; task_classes: (task, class names) for tasks that
    mer_jax/data/labels.py does not list (e.g. MESC's strategies).
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
    # Decoding cost (see ClipReadConfig): real clips take the I/P frame nearest each t_i (<= ~2
    # frames off) without H.264 deblocking (~1 grey level), 1.6x cheaper than exact frames.
    exact_frames: bool = False
    skip_loop_filter: bool = True
    num_workers: int | None = None  # clip-decoding processes; None: os.cpu_count()

    def classes(self) -> dict:
        """task -> class names (lower case), in label-id order."""
        table = dict(labels.TASK_CLASSES)
        table.update({task: tuple(names) for task, names in self.task_classes})
        missing = [task for task, _ in self.tasks if task not in table]
        if missing:
            raise ValueError(f"Config {self.name!r}: no class list for tasks {missing}; pass "
                             "task_classes=((task, (names...)),) or add them to mer_jax/data/labels.py.")
        return {task: tuple(_label_key(n) for n in table[task]) for task, _ in self.tasks}

    def clip_read_config(self) -> clip_reader.ClipReadConfig:
        return clip_reader.ClipReadConfig(
            num_frames=self.num_frames, frame_size=self.frame_size, face_crop=self.face_crop,
            sample_rate=self.sample_rate, max_audio_seconds=self.max_audio_seconds,
            max_clip_seconds=self.max_clip_seconds, exact_frames=self.exact_frames,
            skip_loop_filter=self.skip_loop_filter)


def _label_key(value) -> str:
    return " ".join(str(value).strip().lower().split())


def _column_key(name) -> str:
    return _label_key(name).replace(" ", "_")


_VERSION = tfds.core.Version("1.0.0")
BUILDER_CONFIGS = [
    MeldFormatConfig(name="meld", version=_VERSION,
                     description="MELD: emotion (7) + sentiment (3); 12 face-cropped 112 px frames "
                                 "(the I/P frame nearest each t_i, no deblocking), 16 kHz audio up "
                                 "to 10 s."),
    # The demo corpus draws its cues on the frames shown at exactly t_i: read those frames.
    MeldFormatConfig(name="demo", version=_VERSION, face_crop=False, max_audio_seconds=4.0,
                     exact_frames=True, skip_loop_filter=False,
                     description="The generated demo corpus: as 'meld' with centre crops, audio <= 4 s, "
                                 "exact frames."),
    MeldFormatConfig(name="meld_text", version=_VERSION, text_only=True,
                     description="MELD CSVs only: text examples (no clips read), same feature spec."),
    MeldFormatConfig(name="mesc", version=_VERSION,
                     tasks=(("emotion", "Emotion"), ("strategy", "Strategy")),
                     task_classes=(("strategy", MESC_STRATEGIES),),
                     description="MESC-format: emotion (7) + support strategy; 'undefined' -> -1."),
]


class _SplitReport:
    """Counts for one split: rows read, examples, and per reason a count and the ids."""

    def __init__(self, csv_path, clip_dir, mode):
        self.data = {"csv": str(csv_path), "clip_dir": str(clip_dir) if clip_dir else None,
                     "mode": mode, "rows_read": 0, "examples": 0, "with_video": 0,
                     "with_audio": 0, "frames_with_face": 0.0, "rows_skipped": {},
                     "clip_problems": {}, "unlabeled_clips": {"count": 0, "ids": []}}

    def add(self, section: str, reason: str, item_id: str):
        entry = self.data[section].setdefault(reason, {"count": 0, "ids": []})
        entry["count"] += 1
        entry["ids"].append(item_id)


class MeldFormat(tfds.core.GeneratorBasedBuilder):
    """MELD-format clips + CSVs -> prepared examples (see module docstring)."""

    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = BUILDER_CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        t, s = c.num_frames, c.frame_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "text": tfds.features.Text(),
                "speaker": tfds.features.Text(),
                "dialogue_id": tfds.features.Scalar(np.int32),
                "utterance_id": tfds.features.Scalar(np.int32),
                # zlib: text-only and broken clips are all-zero frames, which then cost nothing.
                "frames": tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.ZLIB),
                "frame_times": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                "face_found": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
                "audio": tfds.features.Audio(shape=(None,), dtype=np.int16,
                                             sample_rate=c.sample_rate),
                "has_video": tfds.features.Scalar(np.bool_),
                "has_audio": tfds.features.Scalar(np.bool_),
                "labels": tfds.features.FeaturesDict(
                    {task: tfds.features.Scalar(np.int32) for task, _ in c.tasks}),
            }),
            # Class names per task in label-id order, for whoever reads the prepared data, and how
            # clips were read, so that prediction on a raw clip reads it the same way.
            metadata=tfds.core.MetadataDict(
                classes={task: list(names) for task, names in c.classes().items()},
                label_columns=dict(c.tasks),
                clip_read_config=dataclasses.asdict(c.clip_read_config())),
            homepage="https://affective-meld.github.io/",
            citation="Poria et al., MELD: A Multimodal Multi-Party Dataset for Emotion Recognition "
                     "in Conversations, ACL 2019.",
        )

    # ------------------------------------------------------------------------------- splits

    def _split_generators(self, dl_manager):
        source = dl_manager.manual_dir
        config = self.builder_config
        self._report = {"builder": self.name, "config": config.name, "version": str(self.version),
                        "source": str(source),
                        "clip_read_config": dataclasses.asdict(config.clip_read_config()),
                        "splits": {}}
        generators = {}
        for split, csv_name, folder in config.splits:
            csv_path = find_in_source(source, csv_name)
            if csv_path is None:
                continue
            clip_dir = None if config.text_only else find_in_source(source, folder)
            report = _SplitReport(csv_path, clip_dir, "clips" if clip_dir else "csv_only")
            self._report["splits"][split] = report.data
            rows = self._read_rows(split, csv_path, report)
            if rows:  # TFDS refuses an empty split; the report still says why it is absent
                generators[split] = self._generate_examples(split, rows, clip_dir, report)
            else:
                report.data["omitted"] = "no valid rows"
        if not self._report["splits"]:
            raise FileNotFoundError(f"No split CSV found in {source}. {LAYOUT_HELP}")
        if not generators:
            self._write_report()
            raise ValueError(f"No CSV row in {source} could be read; see "
                             f"{os.path.join(self.data_dir, REPORT_FILE)}. {LAYOUT_HELP}")
        return generators

    def _write_report(self):
        path = os.path.join(self.data_dir, REPORT_FILE)  # the incomplete dir while preparing
        with open(path, "w") as f:
            json.dump(self._report, f, indent=1)

    # ------------------------------------------------------------------------------- rows

    def _read_rows(self, split: str, csv_path, report: _SplitReport):
        """Valid CSV rows as dicts (id, dialogue_id, utterance_id, text, speaker, labels)."""
        with open(csv_path, "rb") as f:
            text = text_normalize.decode_csv_bytes(f.read())
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = {_column_key(name): name for name in reader.fieldnames or []}
        required = ["utterance", "dialogue_id", "utterance_id"] + [
            _column_key(col) for _, col in self.builder_config.tasks]
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(f"{csv_path} lacks the columns {missing} (has {reader.fieldnames}). "
                             f"{LAYOUT_HELP}")
        classes = self.builder_config.classes()
        rows, seen = [], set()
        for row in reader:
            report.data["rows_read"] += 1
            ids = [_parse_id(row.get(columns[k])) for k in ("dialogue_id", "utterance_id")]
            if None in ids:
                report.add("rows_skipped", "bad_id", f"{split}/line{reader.line_num}:"
                           f"{row.get(columns['dialogue_id'])!r},{row.get(columns['utterance_id'])!r}")
                continue
            example_id = f"{split}/dia{ids[0]}_utt{ids[1]}"
            if example_id in seen:
                report.add("rows_skipped", "duplicate_id", example_id)
                continue
            row_labels, unknown = {}, None
            for task, column in self.builder_config.tasks:
                value = _label_key(row.get(columns[_column_key(column)]) or "")
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
            rows.append({"id": example_id, "dialogue_id": ids[0], "utterance_id": ids[1],
                         "text": text_normalize.normalize_text(row.get(columns["utterance"])),
                         "speaker": text_normalize.normalize_text(speaker), "labels": row_labels})
        return rows

    # ------------------------------------------------------------------------------- examples

    def _generate_examples(self, split: str, rows: list, clip_dir, report: _SplitReport):
        start = time.time()
        read_config = self.builder_config.clip_read_config()
        if clip_dir is not None:
            paths = [os.path.join(clip_dir, f"dia{r['dialogue_id']}_utt{r['utterance_id']}.mp4")
                     for r in rows]
            self._count_unlabeled(clip_dir, {os.path.basename(p).lower() for p in paths}, report)
            clips = clip_reader.read_clips(paths, read_config, self.builder_config.num_workers)
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
            yield row["id"], {
                **row,
                "frames": clip.frames, "frame_times": clip.frame_times,
                "face_found": clip.face_found, "audio": clip.audio,
                "has_video": clip.has_video, "has_audio": clip.has_audio,
            }
        report.data["frames_with_face"] = round(
            faces / max(1, report.data["with_video"] * read_config.num_frames), 4)
        report.data["seconds"] = round(time.time() - start, 1)
        self._write_report()

    @staticmethod
    def _count_unlabeled(clip_dir, labeled: set, report: _SplitReport):
        """Clips in the folder that no CSV row names: skipped, but counted with their names."""
        for name in sorted(os.listdir(clip_dir)):
            if name.lower().endswith(".mp4") and name.lower() not in labeled:
                report.data["unlabeled_clips"]["count"] += 1
                report.data["unlabeled_clips"]["ids"].append(name)


def _parse_id(value):
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
