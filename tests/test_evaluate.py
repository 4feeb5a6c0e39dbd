"""mer_jax.tools.evaluate on a tiny text-only run: a MELD-format CSV in, metrics out, equal to a direct computation."""

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import tiny
from data import meld_format
from data import prepare
from mer_jax.tools import evaluate
from mer_jax.tools import progress
from mer_jax.data import input_pipeline
from mer_jax.models import emotion_model as model_lib
from mer_jax.training import run_config
from mer_jax.training import runs
from mer_jax.training import train

EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
SENTIMENTS = ("neutral", "positive", "negative")
WORDS = ("great", "awful", "really", "what", "no", "yes", "okay", "wow", "hey", "sorry", "fine", "why")


def write_csv(path, num_rows, seed, extra_rows=()):
  """A MELD-format CSV of `num_rows` short utterances in dialogues of 4, plus `extra_rows` as given."""
  rng = np.random.default_rng(seed)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"])
    for i in range(num_rows):
      words = " ".join(rng.choice(WORDS, size=rng.integers(2, 6)))
      writer.writerow(
        [i + 1, words.capitalize() + ".", ("Ross", "Rachel")[i % 2], EMOTIONS[i % 7], SENTIMENTS[i % 3], i // 4, i % 4]
      )
    for row in extra_rows:
      writer.writerow(row)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step tiny run on text-only meld_text data prepared from CSVs this fixture writes."""
  root = tmp_path_factory.mktemp("evaluate")
  source = root / "meld"
  source.mkdir()
  write_csv(source / "train_sent_emo.csv", 24, seed=0)
  # One dev row with a label outside the 7 emotions: skipped by the builder, and reported.
  write_csv(source / "dev_sent_emo.csv", 14, seed=1, extra_rows=[[99, "Hmm.", "Joey", "bored", "neutral", 9, 0]])
  config = tiny.get_config()
  config.data.builder_config = "meld_text_tiny"  # meld_text with the tiny config's 4 frames of 32 px
  config.data.prepare = "meld_text"
  config.data.data_dir = str(root / "tfds")
  config.data.context_turns = 2
  config.data.augment = False
  config.modality_dropout = 0.0
  config.num_train_steps = 2
  config.warmup_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  builder_config = dataclasses.replace(
    {c.name: c for c in meld_format.BUILDER_CONFIGS}["meld_text"],
    name="meld_text_tiny",
    num_frames=config.data.num_frames,
    frame_size=config.data.frame_size,
  )
  prepare.prepare(str(source), config.data.data_dir, builder_config)
  workdir = str(root / "run")
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 2
  return {"workdir": workdir, "source": source, "root": root, "best": result["best"]}


def test_prepared_csv_equals_the_builders_examples(tmp_path):
  """evaluate prepares a CSV with the library the TFDS builder uses (mer_jax.data.meld_csv): the same rows give
  the same examples, the skipped rows are reported, and the input pipeline reads the result."""
  source = tmp_path / "meld"
  source.mkdir()
  write_csv(source / "dev_sent_emo.csv", 6, seed=2, extra_rows=[[99, "Hmm.", "Joey", "bored", "neutral", 9, 0]])
  config = tiny.get_config()
  config.data.builder_config, config.data.prepare, config.data.context_turns = "meld_text_tiny", "meld_text", 2
  data_dir, report = evaluate.prepare_csv(config, str(source / "dev_sent_emo.csv"), None, str(tmp_path / "work"))
  assert report["rows_read"] == 7 and report["examples"] == 6 and report["mode"] == "csv_only"
  assert evaluate.skipped_rows(report) == {"unknown_label": {"count": 1, "ids": ["eval/dia9_utt0:emotion='bored'"]}}
  with pytest.raises(ValueError, match="already holds prepared data"):
    evaluate.prepare_csv(config, str(source / "dev_sent_emo.csv"), None, str(tmp_path / "work"))

  eval_config = config.copy_and_resolve_references()
  eval_config.data.builder_config = evaluate.BUILDER_CONFIG_NAME
  info = input_pipeline.dataset_info(eval_config, data_dir)
  assert info["splits"] == {"eval": 6} and info["classes"] == {"emotion": EMOTIONS, "sentiment": SENTIMENTS}
  batches = list(
    input_pipeline.batch_iterator(eval_config, "eval", train=False, data_dir=data_dir, process_index=0, process_count=1)
  )
  assert sum(int(b["example_mask"].sum()) for b in batches) == 6
  # The progress bar's total (evaluate, report, export's accuracy pass): the eval stream's length is known.
  ds = input_pipeline.make_dataset(
    eval_config, "eval", train=False, data_dir=data_dir, process_index=0, process_count=1
  )
  assert progress.dataset_length(ds) == len(batches)
  assert not any(b["has_video"].any() or b["has_audio"].any() for b in batches)

  builder_config = dataclasses.replace(
    {c.name: c for c in meld_format.BUILDER_CONFIGS}["meld_text"], name="meld_text_tiny", num_frames=4, frame_size=32
  )
  built, _ = prepare.prepare(str(source), str(tmp_path / "built"), builder_config)
  by_builder = {ex["id"].decode(): ex for ex in built.as_dataset(split="dev").as_numpy_iterator()}
  by_evaluate = input_pipeline.load_builder(eval_config, data_dir).as_dataset(split="eval").as_numpy_iterator()
  for ex in by_evaluate:
    expected = by_builder[ex["id"].decode().replace("eval/", "dev/")]
    for key in ("text", "speaker", "dialogue_id", "utterance_id", "has_video", "has_audio", "frames"):
      np.testing.assert_array_equal(ex[key], expected[key], err_msg=key)
    assert ex["labels"] == expected["labels"]


def _f1_by_hand(labels, predictions, num_classes):
  """Weighted F1 and per-class F1 straight from the definitions."""
  per_class, weighted = [], 0.0
  for c in range(num_classes):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    per_class.append(f1)
    weighted += f1 * np.sum(labels == c) / len(labels)
  return weighted, per_class


@pytest.mark.slow
def test_evaluate_json_equals_direct_computation(run, capsys):
  keep = run["root"] / "evaluate_kept"
  code = evaluate.cli(
    [
      "--workdir",
      run["workdir"],
      "--csv",
      str(run["source"] / "dev_sent_emo.csv"),
      "--json",
      "--batch-size",
      "4",
      "--keep-prepared",
      str(keep),
    ]
  )
  captured = capsys.readouterr()
  assert code == 0, captured.err
  result = json.loads(captured.out)

  # The unknown label is reported with its row, never dropped silently.
  assert result["skipped_rows"]["unknown_label"]["count"] == 1
  assert "eval/dia9_utt0" in result["skipped_rows"]["unknown_label"]["ids"][0]
  assert "skipped 1 rows (unknown_label)" in captured.err
  assert result["rows_read"] == 15
  assert result["checkpoint"]["checkpoint_step"] == 2

  # Direct computation: the checkpoint's model applied to the kept prepared data, argmax, F1 by hand.
  loaded = runs.load_run(run["workdir"])
  config, variables = loaded.config, loaded.variables
  assert config.to_dict() == run_config.load_run_config(run["workdir"]).to_dict()
  eval_config = config.copy_and_resolve_references()
  eval_config.data.builder_config = evaluate.BUILDER_CONFIG_NAME
  eval_config.eval_batch_size = 4
  ds = input_pipeline.make_dataset(
    eval_config, evaluate.SPLIT, train=False, data_dir=str(keep / "tfds"), process_index=0, process_count=1
  )
  model = model_lib.EmotionModel(config.model)
  forward = jax.jit(lambda v, b: model.apply(v, b, train=False)[0])
  labels, predictions = {t: [] for t in config.model.tasks}, {t: [] for t in config.model.tasks}
  for batch in input_pipeline.as_numpy(ds):
    logits = forward(variables, input_pipeline.model_inputs(batch))
    real = batch["example_mask"]
    for task in config.model.tasks:
      labels[task].append(batch[f"labels/{task}"][real])
      predictions[task].append(np.argmax(np.asarray(logits[task]), -1)[real])

  for task, classes in (("emotion", EMOTIONS), ("sentiment", SENTIMENTS)):
    y, p = np.concatenate(labels[task]), np.concatenate(predictions[task])
    assert len(y) == 14
    scores = result[task]
    assert set(scores) >= {"accuracy", "weighted_f1", "macro_f1", "per_class_f1", "confusion"}
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["weighted_f1"] <= 1.0
    assert list(scores["per_class_f1"]) == list(classes)
    confusion = np.asarray(scores["confusion"])
    assert confusion.shape == (len(classes), len(classes)) and confusion.sum() == 14
    expected_confusion = np.zeros_like(confusion)
    np.add.at(expected_confusion, (y, p), 1)
    np.testing.assert_array_equal(confusion, expected_confusion)
    weighted, per_class = _f1_by_hand(y, p, len(classes))
    assert scores["accuracy"] == pytest.approx(np.mean(y == p), abs=1e-9)
    assert scores["weighted_f1"] == pytest.approx(weighted, abs=1e-9)
    assert list(scores["per_class_f1"].values()) == pytest.approx(per_class, abs=1e-9)

  # The same checkpoint on the same dev rows gives what training's own evaluation wrote.
  best = run["best"]["tasks"]
  for task in ("emotion", "sentiment"):
    assert result[task]["weighted_f1"] == pytest.approx(best[task]["weighted_f1"], abs=1e-6)
    assert result[task]["confusion"] == best[task]["confusion_matrix"]


@pytest.mark.slow
def test_evaluate_text_report_and_errors(run, capsys, tmp_path):
  csv_path = tmp_path / "other.csv"
  write_csv(csv_path, 6, seed=3)
  assert evaluate.cli(["--workdir", run["workdir"], "--csv", str(csv_path)]) == 0
  out = capsys.readouterr().out
  assert "emotion: 6 examples" in out and "weighted F1" in out and "confusion matrix" in out

  # A CSV without a label column the run needs: one line that names the columns, exit code 2.
  with open(tmp_path / "bad.csv", "w") as f:
    f.write("Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\nHi.,Ross,joy,0,0\n")
  assert evaluate.cli(["--workdir", run["workdir"], "--csv", str(tmp_path / "bad.csv")]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and "lacks the columns" in line

  assert evaluate.cli(["--workdir", run["workdir"], "--csv", str(tmp_path / "missing.csv")]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: --csv ") and "missing.csv is not a file" in line
