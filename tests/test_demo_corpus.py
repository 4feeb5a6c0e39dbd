"""Tests of the demo corpus generator (data/make_demo_corpus.py) on tiny corpora it writes itself."""

import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from data import demo_audio, demo_faces
from data import make_demo_corpus as mdc

HEADER = b"Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\r\n"
FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_a")
  summary = mdc.make_corpus(out, num_train=12, num_dev=6, num_test=6, seed=3, workers=1)
  return out, summary


def _sidecar(root: Path, split: str) -> list[dict]:
  return [json.loads(line) for line in (root / f"{split}_ground_truth.jsonl").read_text().splitlines()]


def _rows(root: Path, split: str) -> list[dict]:
  with open(root / f"{split}_sent_emo.csv", encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def _clip_path(root: Path, clip_id: str) -> Path:
  split, name = clip_id.split("/")
  return root / FOLDERS[split] / f"{name}.mp4"


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Grey frames (N, H, W) uint8, their pts in seconds (N,), mono audio (S,) float32."""
  with av.open(str(path)) as container:
    frames, pts = [], []
    for frame in container.decode(video=0):
      frames.append(frame.to_ndarray(format="gray"))
      pts.append(float(frame.pts * frame.time_base))
  with av.open(str(path)) as container:
    audio = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
  return np.stack(frames), np.array(pts), audio


def _frame_at(frames: np.ndarray, pts: np.ndarray, t: float) -> np.ndarray:
  """The frame on screen at time t."""
  return frames[max(0, int(np.searchsorted(pts, t, side="right")) - 1)].astype(np.float32)


def test_csv_header_crlf_and_fields(corpus):
  root, _ = corpus
  for split in FOLDERS:
    raw = (root / f"{split}_sent_emo.csv").read_bytes()
    assert raw.startswith(HEADER)
    assert raw.count(b"\n") == raw.count(b"\r\n") == len(_rows(root, split)) + 1
    raw.decode("utf-8")
    for row in _rows(root, split):
      assert row["Emotion"] in mdc.EMOTIONS
      assert re.fullmatch(r"\d\d:\d\d:\d\d,\d\d\d", row["StartTime"])
      assert re.fullmatch(r"\d\d:\d\d:\d\d,\d\d\d", row["EndTime"])
      assert row["StartTime"] < row["EndTime"]
      expected = {"neutral": {"neutral"}, "joy": {"positive"}, "surprise": {"positive", "negative"}}.get(
        row["Emotion"], {"negative"}
      )
      assert row["Sentiment"] in expected


def test_rows_clips_and_sidecar_match(corpus):
  root, summary = corpus
  for split, folder in FOLDERS.items():
    rows, truth = _rows(root, split), _sidecar(root, split)
    ids = [f"{split}/dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}" for r in rows]
    assert ids == [t["id"] for t in truth]
    assert len(set(ids)) == len(ids) == summary["splits"][split]["clips"]
    on_disk = sorted(f"{split}/{p.stem}" for p in (root / folder).glob("*.mp4"))
    assert on_disk == sorted(ids)
    assert [r["Emotion"] for r in rows] == [t["emotion"] for t in truth]
    sizes = {}
    for r in rows:
      sizes.setdefault(r["Dialogue_ID"], []).append(int(r["Utterance_ID"]))
    assert all(u == list(range(len(u))) and 1 <= len(u) <= 8 for u in sizes.values())


def test_sidecar_ground_truth_is_consistent(corpus):
  root, _ = corpus
  for split in FOLDERS:
    for row, t in zip(_rows(root, split), _sidecar(root, split)):
      groups = [t["key_frame_indices"]] + [d["frame_indices"] for d in t["decoys"]]
      assert sorted(i for g in groups for i in g) == list(range(12))
      shown = [t["emotion"]] + [d["emotion"] for d in t["decoys"]]
      cues = [t["cue"]] + [d["cue"] for d in t["decoys"]]
      assert len(set(shown)) == 3 and len(set(cues)) == 3
      expected_times = [(i + 0.5) * t["duration"] / 12 for i in t["key_frame_indices"]]
      assert t["key_frame_times"] == pytest.approx(expected_times, abs=2e-4)
      assert re.search(rf"\b{t['cue']}\b", row["Utterance"])  # the text names the key cue
      assert all(not re.search(rf"\b{c}\b", row["Utterance"]) for c in cues[1:])
      assert 2.4 <= t["duration"] <= 3.6
      assert (t["corrupted"], t["corruption"]) in {
        (None, None),
        ("audio", "silence"),
        ("audio", "white_noise"),
        ("video", "black"),
        ("video", "noise"),
      }


def test_mp4_streams_and_content(corpus):
  root, _ = corpus
  truth = [t for t in _sidecar(root, "train") if t["corrupted"] != "video"][:4]
  for t in truth:
    path = _clip_path(root, t["id"])
    with av.open(str(path)) as container:
      assert container.streams.video[0].codec_context.name == "h264"
      assert container.streams.audio[0].codec_context.name == "aac"
      assert container.streams.audio[0].codec_context.sample_rate == 16000
      assert container.duration / 1e6 == pytest.approx(t["duration"], abs=0.01)
    frames, pts, _ = _decode(path)
    assert frames.shape == (t["num_frames"], 120, 160)
    assert frames.std() > 10  # not constant
    key = [_frame_at(frames, pts, s) for s in t["key_frame_times"]]
    decoy = [_frame_at(frames, pts, s) for d in t["decoys"] for s in d["frame_times"]]
    # The 4 key samples show the same picture; every decoy sample shows a different one.
    assert max(np.abs(k - key[0]).mean() for k in key) < 4.0  # codec noise only
    assert min(np.abs(d - key[0]).mean() for d in decoy) > 6.0


def test_any_reader_convention_lands_in_the_right_group():
  """Frame-shown-at-t, nearest-pts and first-pts-at-or-after-t all pick a frame of the group of t."""
  rng = np.random.default_rng(0)
  for num_frames in range(36, 55):
    groups = [sorted(g) for g in rng.permutation(12).reshape(3, 4).tolist()]
    per_frame = mdc.frame_groups(num_frames, groups)
    pts = np.arange(num_frames) / mdc.FPS
    for g, positions in enumerate(groups):
      for i in positions:
        t = (i + 0.5) * num_frames / mdc.FPS / 12
        shown = int(np.searchsorted(pts, t, side="right")) - 1
        nearest = int(np.argmin(np.abs(pts - t)))
        after = min(int(np.searchsorted(pts, t, side="left")), num_frames - 1)
        assert per_frame[shown] == per_frame[nearest] == per_frame[after] == g


def _rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_corrupted_audio_and_video(corpus):
  root, _ = corpus
  truth = [t for s in FOLDERS for t in _sidecar(root, s)]
  kinds = {t["corruption"]: t for t in truth if t["corrupted"]}
  assert {"silence", "black"} <= set(kinds)  # tiny splits still get one of each first kind
  clean = next(t for t in truth if t["corrupted"] is None)
  _, _, clean_audio = _decode(_clip_path(root, clean["id"]))
  _, _, silent_audio = _decode(_clip_path(root, kinds["silence"]["id"]))
  assert _rms(clean_audio) > 0.01
  assert _rms(silent_audio) < _rms(clean_audio) / 100
  black, _, black_audio = _decode(_clip_path(root, kinds["black"]["id"]))
  assert black.max() <= 2 and len(black_audio) > 0  # still both tracks


def test_label_quota_and_decoy_balance():
  labels = mdc._quota_labels(2000, np.random.default_rng(0))
  counts = {e: labels.count(e) for e in mdc.EMOTIONS}
  assert counts["neutral"] == 500 and all(counts[e] == 250 for e in mdc.EMOTIONS[1:])
  # P(true = e | e is shown) must be 1/3 for every e, or video alone would hint at the label.
  rng = np.random.default_rng(1)
  shown = {e: 0 for e in mdc.EMOTIONS}
  for e in labels:
    for s in [e] + mdc._decoy_emotions(e, rng):
      shown[s] += 1
  for e in mdc.EMOTIONS:
    assert counts[e] / shown[e] == pytest.approx(1 / 3, abs=0.03)


def test_normalize_utterance_fixes_cp1252_and_mojibake():
  assert mdc.normalize_utterance("You\x92re  here\x85") == "You're here..."
  assert mdc.normalize_utterance("It\u00e2\u20ac\u2122s fine") == "It's fine"
  assert mdc.normalize_utterance("Oh\u2014no \u201cway\u201d") == 'Oh-no "way"'


def test_builtin_text_when_meld_missing(tmp_path):
  summary = mdc.make_corpus(tmp_path / "c", 3, 1, 1, seed=0, workers=1, meld_dir=tmp_path / "none")
  assert set(summary["text_source"].values()) == {"builtin"}
  assert len(_rows(tmp_path / "c", "train")) == 3


def test_rerun_into_same_folder_removes_stale_clips(tmp_path):
  mdc.make_corpus(tmp_path, 10, 0, 0, seed=0, workers=1)
  mdc.make_corpus(tmp_path, 3, 0, 0, seed=0, workers=1)
  clips = sorted(p.stem for p in (tmp_path / "train_splits").glob("*.mp4"))
  assert clips == sorted(t["id"].split("/")[1] for t in _sidecar(tmp_path, "train"))


def test_bad_resolution_message(tmp_path):
  with pytest.raises(ValueError, match="even"):
    mdc.make_corpus(tmp_path, 1, 0, 0, resolution=(161, 120))


def test_faces_and_audio_differ_per_emotion():
  style = demo_faces.sample_style(np.random.default_rng(0), (160, 120))
  images = {e: demo_faces.draw_frame(style, e, "circle").astype(np.float32) for e in mdc.EMOTIONS}
  for a in mdc.EMOTIONS:
    for b in mdc.EMOTIONS:
      if a < b:
        assert np.abs(images[a] - images[b]).mean() > 0.5, (a, b)
  loud = demo_audio.synth_prosody("anger", 16000, np.random.default_rng(0))
  assert loud.dtype == np.float32 and loud.shape == (16000,) and np.abs(loud).max() <= 0.99


def _fingerprint(root: Path) -> dict:
  out = {}
  for split in FOLDERS:
    out[f"{split}.csv"] = (root / f"{split}_sent_emo.csv").read_bytes()
    out[f"{split}.jsonl"] = (root / f"{split}_ground_truth.jsonl").read_bytes()
  for t in _sidecar(root, "train")[:6]:
    frames, _, audio = _decode(_clip_path(root, t["id"]))
    out[t["id"]] = (frames.tobytes(), audio.tobytes())
  return out


def test_same_seed_same_corpus_different_seed_differs(corpus, tmp_path):
  root, _ = corpus
  again = tmp_path / "again"
  mdc.make_corpus(again, num_train=12, num_dev=6, num_test=6, seed=3, workers=1)
  first, second = _fingerprint(root), _fingerprint(again)
  assert first.keys() == second.keys()
  for key in first:
    assert first[key] == second[key], key
  other = tmp_path / "other"
  mdc.make_corpus(other, num_train=12, num_dev=6, num_test=6, seed=4, workers=1)
  third = _fingerprint(other)
  assert third["train.csv"] != first["train.csv"]
  assert third["train.jsonl"] != first["train.jsonl"]
  assert third["train/dia0_utt0"] != first["train/dia0_utt0"]


def test_process_pool_gives_the_same_corpus(tmp_path):
  serial = mdc.make_corpus(tmp_path / "serial", 48, 0, 0, seed=5, workers=1)
  pooled = mdc.make_corpus(tmp_path / "pooled", 48, 0, 0, seed=5, workers=2)
  assert serial["splits"] == pooled["splits"]
  for name in ("train_sent_emo.csv", "train_ground_truth.jsonl"):
    assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "pooled" / name).read_bytes()
  clips = sorted(p.name for p in (tmp_path / "serial" / "train_splits").glob("*.mp4"))
  assert len(clips) == 48
  for clip in clips:  # single-threaded encoders: the files are byte-identical
    a, b = tmp_path / "serial" / "train_splits" / clip, tmp_path / "pooled" / "train_splits" / clip
    assert a.read_bytes() == b.read_bytes(), clip


def test_cli_writes_corpus_and_prints_summary(tmp_path, capsys):
  assert (
    mdc.main(
      ["--out", str(tmp_path), "--train", "2", "--dev", "1", "--test", "1", "--resolution", "128x96", "--workers", "1"]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "train" in printed and "corrupted" in printed
  with av.open(str(tmp_path / "train_splits" / "dia0_utt0.mp4")) as container:
    stream = container.streams.video[0]
    assert (stream.codec_context.width, stream.codec_context.height) == (128, 96)
