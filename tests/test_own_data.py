"""A corpus of one's own, through configuration alone (docs/OWN_DATA.md): other CSV and clip folder names, another
clip name pattern, other columns, tasks, classes and "no label" values than MELD's.

The corpus is the demo generator's clips and transcripts, moved and relabelled: valence (low, high) from the
emotion, arousal (calm, medium, excited) from the sentiment. The end-to-end test prepares it and trains 2 steps
with `python launch.py --config configs/tiny.py` and `--config.data.*` overrides alone, then evaluates the run on
a CSV of that layout; the other tests check the pieces quickly (the layout from config.data, the refusal of data
prepared with other classes, launch.py's one-line user errors, the config file in docs/OWN_DATA.md).
"""

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds

import launch
from configs import tiny
from data import make_demo_corpus
from mer_jax import errors
from mer_jax.data import csv_format
from mer_jax.data import input_pipeline
from mer_jax.data import meld_csv
from mer_jax.tools import evaluate
from mer_jax.training import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0"
VALENCE = {"joy": "High", "surprise": "high", "neutral": "N/A"}  # any other emotion: 'low'; N/A: no label
AROUSAL = {"positive": "excited", "negative": "Medium", "neutral": "calm"}
HEADER = ["Transcript", "Person", "Session", "Turn", "Valence", "Arousal Level"]
SPLITS = {"train": ("train_labels.csv", "videos_train"), "valid": ("valid_labels.csv", "videos_valid")}
PATTERN = "session{dialogue_id:02d}/turn{utterance_id}.mp4"
# The layout as config.data overrides: what a user with this corpus passes to launch.py.
OVERRIDES = [
  "--config.data.prepare=csv",
  "--config.data.builder_config=my_corpus",
  """--config.data.csv_files={"train": "train_labels.csv", "valid": "valid_labels.csv"}""",
  "--config.data.clip_folders.train=videos_train",  # a key of the mapping at a time works too
  "--config.data.clip_folders.valid=videos_valid",
  f"--config.data.clip_pattern={PATTERN}",
  (
    """--config.data.columns={"utterance": "Transcript", "speaker": "Person", "dialogue_id": "Session", """
    """"utterance_id": "Turn"}"""
  ),
  """--config.data.tasks=("valence", "arousal")""",
  """--config.data.classes={"valence": ("low", "high"), "arousal": ("calm", "medium", "excited")}""",
  "--config.data.label_columns.arousal=Arousal Level",  # valence: the column named like the task
  """--config.data.no_label_values=("", "n/a")""",
  "--config.eval_split=valid",
]


def own_corpus(root) -> dict:
  """Writes the corpus under `root`/corpus; returns {split: {example id: (valence id, arousal id)}} expected."""
  demo = root / "demo"
  make_demo_corpus.make_corpus(demo, num_train=6, num_dev=3, num_test=0, seed=0, resolution=(64, 64), workers=1)
  source = root / "corpus"
  expected = {}
  for (split, (csv_name, folder)), demo_split in zip(SPLITS.items(), ("train", "dev")):
    demo_csv = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv"}[demo_split]
    demo_folder = {"train": "train_splits", "dev": "dev_splits_complete"}[demo_split]
    rows, expected[split] = [], {}
    with open(demo / demo_csv, newline="") as f:
      for row in csv.DictReader(f):
        dialogue, turn = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        clip = source / folder / PATTERN.format(dialogue_id=dialogue, utterance_id=turn)
        clip.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / demo_folder / f"dia{dialogue}_utt{turn}.mp4", clip)
        valence = VALENCE.get(row["Emotion"], "low")
        arousal = AROUSAL[row["Sentiment"]]
        rows.append([row["Utterance"], row["Speaker"], dialogue, turn, valence, arousal])
        valence_id = -1 if valence == "N/A" else ("low", "high").index(valence.lower())
        expected[split][f"{split}/dia{dialogue}_utt{turn}"] = (
          valence_id,
          ("calm", "medium", "excited").index(arousal.lower()),
        )
    if split == "train":
      rows.append(["Unknown label.", "Ann", 40, 0, "ecstatic", "calm"])  # not a valence class: skipped, counted
      extra = source / folder / PATTERN.format(dialogue_id=41, utterance_id=0)
      extra.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(clip, extra)  # a clip no row names: counted as unlabeled
    with open(source / csv_name, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(HEADER)
      writer.writerows(rows)
  return expected


def own_config(root) -> ml_collections.ConfigDict:
  """configs/tiny.py with OVERRIDES applied, as launch.py's flags apply them."""
  config = tiny.get_config()
  config.data.prepare = "csv"
  config.data.builder_config = "my_corpus"
  config.data.source_dir = str(root / "corpus")
  config.data.data_dir = str(root / "tfds")
  config.data.csv_files = {"train": "train_labels.csv", "valid": "valid_labels.csv"}
  config.data.clip_folders = {"train": "videos_train", "valid": "videos_valid"}
  config.data.clip_pattern = PATTERN
  config.data.columns = {
    "utterance": "Transcript",
    "speaker": "Person",
    "dialogue_id": "Session",
    "utterance_id": "Turn",
  }
  config.data.tasks = ("valence", "arousal")
  config.data.classes = {"valence": ("low", "high"), "arousal": ("calm", "medium", "excited")}
  config.data.label_columns.arousal = "Arousal Level"
  config.data.no_label_values = ("", "n/a")
  config.eval_split = "valid"
  return config


def launch_command(*args) -> subprocess.CompletedProcess:
  # XLA's backend optimisations off: compiling the tiny model's steps then takes a fraction of the time (as in
  # tests/test_train.py's subprocesses); what this file tests is the data's way through, not the step's speed.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "XLA_FLAGS": FAST_COMPILE}
  return subprocess.run(
    [sys.executable, "launch.py", "--config", "configs/tiny.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


# ----------------------------------------------------------------------------- the pieces


def test_the_layout_comes_from_config_data(tmp_path):
  config = own_config(tmp_path)
  fmt = csv_format.format_from_config(config.data)
  assert fmt.label_columns == (("valence", "valence"), ("arousal", "Arousal Level"))
  assert fmt.class_names() == {"valence": ("low", "high"), "arousal": ("calm", "medium", "excited")}
  assert fmt.splits() == (("train", "train_labels.csv", "videos_train"), ("valid", "valid_labels.csv", "videos_valid"))
  assert meld_csv.clip_name(fmt.clip_pattern, {"id": "train/dia3_utt7", "dialogue_id": 3, "utterance_id": 7}) == (
    "session03/turn7.mp4"
  )
  # MELD's presets are config.data's defaults, and round-trip.
  assert csv_format.format_from_config(tiny.get_config().data).record() == csv_format.FORMATS["meld"].record()
  for field, value, message in (
    ("clip_pattern", "clip_{speaker}.mp4", "clip_pattern"),
    ("clip_pattern", "all.mp4", "clip_pattern"),
    ("columns", {"utterance": "Text"}, r"lacks \['dialogue_id', 'utterance_id'\]"),
  ):
    broken = own_config(tmp_path)
    broken.data[field] = value
    with pytest.raises(errors.InvalidInput, match=message):
      csv_format.format_from_config(broken.data)


def test_rows_are_read_by_the_configured_columns(tmp_path):
  expected = own_corpus(tmp_path)
  fmt = csv_format.format_from_config(own_config(tmp_path).data)
  report = meld_csv.SplitReport("train_labels.csv", None, "csv_only")
  rows = meld_csv.read_rows(tmp_path / "corpus" / "train_labels.csv", "train", fmt, report)
  assert {r["id"]: (r["labels"]["valence"], r["labels"]["arousal"]) for r in rows} == expected["train"]
  assert report.data["rows_skipped"] == {"unknown_label": {"count": 1, "ids": ["train/dia40_utt0:valence='ecstatic'"]}}
  bad = dict(fmt.fields(), columns=(("utterance", "Text"), ("dialogue_id", "Session"), ("utterance_id", "Turn")))
  with pytest.raises(errors.InvalidInput, match=r"lacks the columns \['text'\].*config.data.columns"):
    meld_csv.read_rows(tmp_path / "corpus" / "train_labels.csv", "train", csv_format.CsvFormat(**bad), report)


def test_prepared_data_with_other_classes_is_refused(tmp_path):
  """Text-only preparation (quick): data prepared under a name is never reused with other classes or files."""
  own_corpus(tmp_path)
  config = own_config(tmp_path)
  config.data.clip_folders = {}  # CSVs alone: text-only examples
  launch.prepare_data_if_missing(config, str(tmp_path / "work"))
  info = input_pipeline.dataset_info(config)
  assert info["classes"] == {"valence": ("low", "high"), "arousal": ("calm", "medium", "excited")}
  assert info["splits"] == {"train": 6, "valid": 3}
  for field, value in (
    ("classes", {"valence": ("negative", "positive"), "arousal": ("calm", "medium", "excited")}),
    ("label_columns", {"valence": "Pleasure", "arousal": "Arousal Level"}),
    ("csv_files", {"train": "other.csv", "valid": "valid_labels.csv"}),
  ):
    changed = config.copy_and_resolve_references()
    changed.data[field] = value
    with pytest.raises(errors.InvalidInput, match=rf"config.data.{field}.*--config.data.builder_config to a new name"):
      input_pipeline.dataset_info(changed)
  # A registered preset's name with another layout: refused before anything is prepared.
  preset = own_config(tmp_path)
  preset.data.builder_config = "demo"
  preset.data.num_frames, preset.data.frame_size = 12, 64
  with pytest.raises(errors.InvalidInput, match=r"'demo' is a preset.*task 'valence': not prepared.*name of your own"):
    launch._builder_config(preset)


def assert_one_line_error(args, tmp_path, message):
  done = launch_command("--workdir", str(tmp_path / "work"), f"--config.data.data_dir={tmp_path}/tfds", *args)
  assert done.returncode == 2, (args, done.stderr[-3000:])
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), (args, last)
  assert "Traceback" not in done.stderr


def test_launch_config_errors_are_one_line(tmp_path):
  """Mistakes in the config overrides: said before JAX and TensorFlow load (a few seconds each)."""
  for args, message in (
    (["--config.data.nonexistent=1"], r"config.data has no field 'nonexistent'"),
    (["--config.data.clases.valence=x"], r"did you mean --config.data.classes\?"),
    (["""--config.data.tasks=("valence",)"""], r"no class list for the tasks \['valence'\]"),
    (["""--config.data.classes.emotion=("joy",)"""], r"config.data.classes.emotion .* fewer than 2 classes"),
  ):
    assert_one_line_error(args, tmp_path, message)


@pytest.mark.slow
def test_launch_source_errors_are_one_line(tmp_path):
  for args, message in (
    (["--config.data.prepare=csv", "--config.data.builder_config=mine"], r"config.data.source_dir is empty"),
    (
      ["--config.data.prepare=csv", "--config.data.builder_config=mine", f"--config.data.source_dir={tmp_path}"],
      r"holds no train_sent_emo.csv \(config.data.csv_files.train\)",
    ),
  ):
    assert_one_line_error(args, tmp_path, message)


def test_the_config_file_in_docs_gives_the_same_config_data(tmp_path):
  """docs/OWN_DATA.md's config file, with its paths pointed here, sets config.data as OVERRIDES do."""
  with open(os.path.join(REPO, "docs", "OWN_DATA.md")) as f:
    text = re.search(r"```python\n(# my_corpus\.py.*?)```", f.read(), re.DOTALL).group(1)
  text = text.replace("/data/my_corpus", str(tmp_path / "corpus")).replace(
    "~/.cache/mer_jax/tfds", str(tmp_path / "tfds")
  )
  (tmp_path / "my_corpus.py").write_text(text)
  spec = importlib.util.spec_from_file_location("my_corpus", tmp_path / "my_corpus.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  documented, expected = module.get_config(), own_config(tmp_path)
  for field in ("prepare", "builder_config", "source_dir", "data_dir", "tasks", "no_label_values", "clip_pattern"):
    assert documented.data[field] == expected.data[field], field
  for field in ("csv_files", "clip_folders", "columns", "classes"):
    assert documented.data[field].to_dict() == expected.data[field].to_dict(), field
  assert documented.data.label_columns.arousal == "Arousal Level" and documented.eval_split == "valid"
  assert documented.model.size == "edge"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_prepare_train_and_evaluate_through_overrides_alone(tmp_path, capsys):
  expected = own_corpus(tmp_path)
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  done = launch_command(
    "--workdir",
    str(workdir),
    *OVERRIDES,
    f"--config.data.source_dir={tmp_path / 'corpus'}",
    f"--config.data.data_dir={data_dir}",
    "--config.data.prepare_workers=1",
    "--config.num_train_steps=2",
    "--config.warmup_steps=1",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    "--config.model.ops=reference",  # the plain lax form: no C++ kernels to build in a fresh process
  )
  assert done.returncode == 0, done.stderr[-5000:]

  # The prepared data: the configured tasks and classes, every row an example or a counted reason.
  builder = tfds.builder_from_directory(str(data_dir / "meld_format" / "my_corpus" / "1.0.0"))
  assert builder.info.metadata["classes"] == {"valence": ["low", "high"], "arousal": ["calm", "medium", "excited"]}
  for split in ("train", "valid"):
    prepared = {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    labels = {i: (int(ex["labels"]["valence"]), int(ex["labels"]["arousal"])) for i, ex in prepared.items()}
    assert labels == expected[split], split
    assert all(ex["has_video"] and ex["frames"].shape == (4, 32, 32, 1) for ex in prepared.values())
  report = json.loads((data_dir / "meld_format" / "my_corpus" / "1.0.0" / meld_csv.REPORT_FILE).read_text())
  train = report["splits"]["train"]
  assert train["rows_skipped"]["unknown_label"]["ids"] == ["train/dia40_utt0:valence='ecstatic'"]
  assert train["unlabeled_clips"] == {"count": 1, "ids": ["session41/turn0.mp4"]}
  assert train["clip_problems"] == {} and train["with_video"] == train["examples"] == 6

  # The run: heads from config.data.classes, recorded in config.json; eval on 'valid' with the class names.
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["tasks"] == {"valence": 2, "arousal": 3}
  assert config["best_metric"] == "valence/weighted_f1"
  best = json.loads((workdir / "eval" / "best.json").read_text())
  assert best["step"] == 2 and best["split"] == "valid"
  assert best["tasks"]["valence"]["class_names"] == ["low", "high"]
  assert best["tasks"]["arousal"]["class_names"] == ["calm", "medium", "excited"]

  # Evaluating the run on a CSV of the same layout reads its columns, classes and clip names from config.json.
  result = evaluate.main(
    [
      "--workdir",
      str(workdir),
      "--csv",
      str(tmp_path / "corpus" / "valid_labels.csv"),
      "--clips",
      str(tmp_path / "corpus" / "videos_valid"),
      "--json",
    ]
  )
  capsys.readouterr()
  assert result["valence"]["class_names"] == ["low", "high"] and result["arousal"]["num_examples"] == 3

  # The tools that read the run's own prepared data (report, explain, export's accuracy pass) accept it: the
  # config read back from config.json keeps the corpus's own splits and columns (no MELD defaults merged in).
  run = runs.load_run(str(workdir))
  assert dict(run.config.data.csv_files) == {"train": "train_labels.csv", "valid": "valid_labels.csv"}
  assert runs.split_size(run.config, run.data_dir(), "valid") == 3
