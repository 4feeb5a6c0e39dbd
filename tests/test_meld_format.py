"""data/meld_format.py and data/prepare.py on tiny MELD-format folders written here: every CSV row
becomes an example or a counted reason, labels follow mer_jax/data/labels.py, frames are real pictures."""

import csv
import json
import os

import numpy as np
import pytest

from benchmarks.data_throughput import write_clip
from data import meld_format, prepare
from mer_jax.data import labels

HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]


def write_csv(path, rows, header=HEADER, encoding="utf-8"):
  with open(path, "w", newline="", encoding=encoding) as f:
    writer = csv.writer(f, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)


def tiny_config(name, **kwargs):
  kwargs = {"num_frames": 4, "frame_size": 32, "face_crop": False, "num_workers": 1, **kwargs}
  return meld_format.MeldFormatConfig(name=name, version="1.0.0", **kwargs)


def examples_of(builder, split):
  return {ex["id"].decode(): ex for ex in builder.as_dataset(split=split).as_numpy_iterator()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  src = tmp_path_factory.mktemp("meld_like")
  clip = lambda folder, name, **kw: write_clip(  # noqa: E731
    src / folder / name, seconds=1.0, width=160, height=120, fps=10, **kw
  )
  for folder in ("train_splits", "dev_splits_complete"):
    (src / folder).mkdir()
  clip("train_splits", "dia0_utt0.mp4")
  clip("train_splits", "dia0_utt1.mp4", content="noise", seed=1)
  clip("train_splits", "dia0_utt3.mp4", seed=2)  # Utterance_ID gaps are normal in MELD
  clip("train_splits", "dia7_utt7.mp4")  # no CSV row names it
  clip("dev_splits_complete", "dia0_utt0.mp4", seed=3)
  clip("dev_splits_complete", "dia1_utt0.mp4", seed=4)
  write_csv(
    src / "train_sent_emo.csv",
    [
      [1, "He’s here.", "Ross", "joy", "positive", 0, 0],
      [2, "Oh…  no", "Rachel", "Sadness ", "negative", 0, 1],
      [3, "What?", "Joey", "surprise", "", 0, 3],  # no sentiment label -> -1
      [4, "Where is it?", "Monica", "fear", "negative", 1, 0],  # its clip is missing
      [5, "Bad label", "Ross", "happy", "positive", 2, 0],  # not an emotion -> skipped
      [6, "Bad id", "Ross", "joy", "positive", "x", 1],  # -> skipped
    ],
    encoding="cp1252",
  )
  write_csv(
    src / "dev_sent_emo.csv",
    [
      [1, "Hi", "Ross", "neutral", "neutral", 0, 0],
      [2, "Go away!", "Ross", "anger", "negative", 1, 0],
    ],
  )
  write_csv(src / "test_sent_emo.csv", [[1, "Text only", "Phoebe", "disgust", "negative", 5, 2]])
  return src


def test_every_row_is_an_example_or_a_counted_reason(source, tmp_path):
  builder, report_path = prepare.prepare(source, tmp_path, tiny_config("tiny", num_workers=2))
  assert report_path == os.path.join(builder.data_dir, "prepare_report.json")
  report = json.load(open(report_path))["splits"]
  assert set(builder.info.splits) == {"train", "dev", "test"}
  for split, r in report.items():
    skipped = sum(v["count"] for v in r["rows_skipped"].values())
    assert r["rows_read"] == r["examples"] + skipped == {"train": 6, "dev": 2, "test": 1}[split]
    assert builder.info.splits[split].num_examples == r["examples"]
  train = report["train"]
  assert train["rows_skipped"]["unknown_label"]["ids"] == ["train/dia2_utt0:emotion='happy'"]
  assert train["rows_skipped"]["bad_id"]["count"] == 1
  assert train["clip_problems"] == {"missing_file": {"count": 1, "ids": ["train/dia1_utt0"]}}
  assert train["unlabeled_clips"] == {"count": 1, "ids": ["dia7_utt7.mp4"]}
  assert (train["mode"], report["test"]["mode"]) == ("clips", "csv_only")
  assert train["with_video"] == train["with_audio"] == 3

  ex = examples_of(builder, "train")
  assert sorted(ex) == ["train/dia0_utt0", "train/dia0_utt1", "train/dia0_utt3", "train/dia1_utt0"]
  emotion = lambda name: labels.EMOTIONS.index(name)  # noqa: E731
  sentiment = lambda name: labels.SENTIMENTS.index(name)  # noqa: E731
  assert ex["train/dia0_utt0"]["labels"] == {"emotion": emotion("joy"), "sentiment": sentiment("positive")}
  assert ex["train/dia0_utt1"]["labels"] == {"emotion": emotion("sadness"), "sentiment": sentiment("negative")}
  assert ex["train/dia0_utt3"]["labels"]["sentiment"] == -1
  assert ex["train/dia0_utt0"]["text"].decode() == "He’s here."  # cp1252 file, read right
  assert ex["train/dia0_utt1"]["text"].decode() == "Oh… no"
  assert ex["train/dia0_utt0"]["speaker"] == b"Ross"
  assert (ex["train/dia0_utt3"]["dialogue_id"], ex["train/dia0_utt3"]["utterance_id"]) == (0, 3)
  good = ex["train/dia0_utt0"]
  assert good["has_video"] and good["has_audio"]
  assert good["frames"].shape == (4, 32, 32, 1) and good["frames"].std() > 10
  assert np.abs(np.diff(good["frames"].astype(int), axis=0)).mean() > 0.5  # not one frame x4
  np.testing.assert_allclose(good["frame_times"], (np.arange(4) + 0.5) / 4, atol=1e-3)
  assert good["audio"].dtype == np.int16 and abs(good["audio"].size - 16000) < 1100
  missing = ex["train/dia1_utt0"]
  assert not missing["has_video"] and not missing["has_audio"] and not missing["frames"].any()
  assert missing["audio"].size == 0 and missing["text"] == b"Where is it?"
  test = examples_of(builder, "test")["test/dia5_utt2"]
  assert not test["has_video"] and test["labels"]["emotion"] == emotion("disgust")


def test_text_only_config_has_the_same_features(source, tmp_path):
  assert repr(meld_format.MeldFormat(config="meld_text", data_dir=str(tmp_path)).info.features) == repr(
    meld_format.MeldFormat(config="meld", data_dir=str(tmp_path)).info.features
  )
  builder, report_path = prepare.prepare(source, tmp_path, tiny_config("tiny_text", text_only=True))
  examples = [ex for split in ("train", "dev", "test") for ex in examples_of(builder, split).values()]
  assert len(examples) == 4 + 2 + 1
  assert not any(ex["has_video"] or ex["has_audio"] for ex in examples)
  assert {r["mode"] for r in json.load(open(report_path))["splits"].values()} == {"csv_only"}


def test_mesc_strategy_labels(tmp_path):
  src = tmp_path / "mesc"
  src.mkdir()
  header = ["Utterance", "Speaker", "Emotion", "Strategy", "Dialogue_ID", "Utterance_ID"]
  write_csv(
    src / "train_sent_emo.csv",
    [
      ["I feel awful.", "Client", "sadness", "undefined", 0, 0],
      ["Why do you think so?", "Therapist", "neutral", "Question", 0, 1],
      ["That sounds hard.", "Therapist", "neutral", "Reflection of  feelings", 0, 2],
      ["Try this.", "Therapist", "neutral", "Hypnosis", 0, 3],  # not a strategy -> skipped
    ],
    header=header,
  )
  mesc = {c.name: c for c in meld_format.BUILDER_CONFIGS}["mesc"]
  config = tiny_config("tiny_mesc", text_only=True, label_columns=mesc.label_columns, classes=mesc.classes)
  builder, report_path = prepare.prepare(src, tmp_path / "out", config)
  ex = examples_of(builder, "train")
  strategies = labels.MESC_STRATEGIES
  assert ex["train/dia0_utt0"]["labels"] == {"emotion": labels.EMOTIONS.index("sadness"), "strategy": -1}
  assert ex["train/dia0_utt1"]["labels"]["strategy"] == strategies.index("question")
  assert ex["train/dia0_utt2"]["labels"]["strategy"] == strategies.index("reflection of feelings")
  report = json.load(open(report_path))
  assert report["splits"]["train"]["rows_skipped"]["unknown_label"]["count"] == 1
  assert builder.info.metadata["classes"]["strategy"] == list(strategies)


def test_prepare_cli_says_what_the_layout_is(tmp_path, capsys):
  assert prepare.main(["--source", str(tmp_path), "--data_dir", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "train_sent_emo.csv" in err and "train_splits" in err and "dia{dialogue_id}_utt{utterance_id}.mp4" in err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
  with pytest.raises(FileNotFoundError, match="not a folder"):
    prepare.check_source(tmp_path / "nope")


def test_prepare_cli_prints_data_and_report(source, tmp_path, capsys):
  # --num_workers with a registered config: TFDS refuses a copy of it under its name, so the builder takes it apart.
  argv = ["--source", str(source), "--data_dir", str(tmp_path), "--builder_config", "meld_text", "--num_workers", "1"]
  code = prepare.main(argv)
  out = capsys.readouterr().out
  assert code == 0
  assert f"prepared data: {tmp_path}/meld_format/meld_text/1.0.0" in out
  assert "prepare_report.json" in out and "unknown_label" in out


@pytest.mark.slow
def test_demo_corpus_prepares_with_its_ground_truth(tmp_path):
  make_demo_corpus = pytest.importorskip("data.make_demo_corpus")
  make_demo_corpus.make_corpus(tmp_path / "demo", 6, 2, 2, seed=0, resolution=(160, 120))
  builder, report_path = prepare.prepare(tmp_path / "demo", tmp_path / "out", "demo")
  report = json.load(open(report_path))["splits"]
  for split in ("train", "dev", "test"):
    truth = [json.loads(line) for line in open(tmp_path / "demo" / f"{split}_ground_truth.jsonl")]
    ex = examples_of(builder, split)
    assert sorted(ex) == sorted(t["id"] for t in truth)
    assert report[split]["clip_problems"] == {} and report[split]["rows_skipped"] == {}
    for t in truth:
      e = ex[t["id"]]
      assert e["labels"]["emotion"] == labels.EMOTIONS.index(t["emotion"])
      assert e["labels"]["sentiment"] == labels.SENTIMENTS.index(t["sentiment"])
      assert e["has_video"] and e["frames"].shape == (12, 112, 112, 1)
      np.testing.assert_allclose(e["frame_times"], [(i + 0.5) * t["duration"] / 12 for i in range(12)], atol=2e-3)
      if t["corrupted"] is None:
        # The reader samples the frames the generator drew: a group's frames look alike.
        f = e["frames"][..., 0].astype(np.float32)
        key = t["key_frame_indices"]
        other = [i for d in t["decoys"] for i in d["frame_indices"]]
        within = np.mean([np.abs(f[a] - f[b]).mean() for a in key for b in key if a < b])
        across = np.mean([np.abs(f[a] - f[b]).mean() for a in key for b in other])
        assert within < across, t["id"]


@pytest.mark.parametrize("use_ftfy", [True, False])
def test_text_normalize_repairs_meld_damage(use_ftfy, monkeypatch):
  from mer_jax.data import text_normalize

  if not use_ftfy:
    monkeypatch.setattr(text_normalize, "ftfy", None)
  else:
    assert text_normalize.ftfy is not None, "ftfy is pinned in requirements.txt and must import"
  cases = {
    "He\x92s lost it.": "He’s lost it.",  # cp1252 control character
    "\x93Hi\x94 \x85": "“Hi” …",
    "He\u00e2\u20ac\u2122s here": "He’s here",  # UTF-8 read as cp1252 (mojibake)
    "caf\u00c3\u00a9": "café",
    "\u00e2\u20ac\u0153quote\u00e2\u20ac\x9d": "“quote”",
    "  Oh,\t my\r\n God!\u00a0 ": "Oh, my God!",  # stray whitespace
    "naïve — fine…": "naïve — fine…",  # clean text stays as it is
    None: "",
  }
  for raw, clean in cases.items():
    assert text_normalize.normalize_text(raw) == clean, raw


def test_csv_bytes_utf8_or_cp1252_per_line():
  from mer_jax.data import text_normalize

  data = "a,b\r\n".encode() + "He’s,x\r\n".encode("cp1252") + "Ok ’ é\r\n".encode("utf-8")
  assert text_normalize.decode_csv_bytes(data) == "a,b\r\nHe’s,x\r\nOk ’ é\r\n"
  assert text_normalize.decode_csv_bytes("\ufeffSr No.,x".encode("utf-8")) == "Sr No.,x"
