"""Preparation survives a folder of 60+ broken or odd clips and a cp1252 CSV with broken rows:
no crash, and each clip and row is counted under its reason."""

import json
import time

import av
import numpy as np
import pytest

from benchmarks.data_throughput import write_clip
from data import meld_format, prepare
from mer_jax.data import clip_reader

TINY = dict(width=64, height=48, fps=10)


def remux_faststart(src, dst):
  """Same packets, moov atom first (as web-ready mp4s): a cut then keeps the header."""
  with av.open(src) as inp, av.open(dst, "w", options={"movflags": "faststart"}) as out:
    streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
    for packet in inp.demux():
      if packet.dts is not None:
        packet.stream = streams[packet.stream.index]
        out.mux(packet)
  return dst


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
  """A MELD-format folder; returns (source, {id: set of acceptable reasons})."""
  src = tmp_path_factory.mktemp("faulty")
  clips = src / "train_splits"
  clips.mkdir()
  rng = np.random.default_rng(0)
  work = tmp_path_factory.mktemp("work")
  good = write_clip(work / "good.mp4", seconds=2.0, **TINY)
  fast = remux_faststart(good, str(work / "fast.mp4"))
  data_good, data_fast = open(good, "rb").read(), open(fast, "rb").read()
  expect, u = {}, iter(range(1000))

  def add(reasons, writer=None):
    utt = next(u)
    if writer is not None:
      writer(str(clips / f"dia0_utt{utt}.mp4"))
    expect[f"train/dia0_utt{utt}"] = set(reasons)
    return str(clips / f"dia0_utt{utt}.mp4")

  def put(data):
    return lambda path: open(path, "wb").write(data)

  add([], lambda p: write_clip(p, seconds=1.0, **TINY))  # a good clip
  for cut in rng.uniform(0.02, 0.98, 20):  # moov at the end: any cut loses it
    add(["corrupt_mp4"], put(data_good[: int(cut * len(data_good))]))
  moov_end = data_fast.index(b"mdat")
  for cut in rng.uniform(0.1, 0.9, 8):  # moov first, frames cut: decodes part, says so
    add(
      [
        "video_ends_early",
        "audio_ends_early",
        "video_decode_error",
        "audio_decode_error",
        "no_video_frames",
        "no_audio_samples",
        "corrupt_mp4",
      ],
      put(data_fast[: moov_end + int(cut * (len(data_fast) - moov_end))]),
    )
  for size in (1, 7, 100, 4096, 50_000):
    add(["unreadable_file"], put(rng.bytes(size)))
  for _ in range(3):
    add(["corrupt_mp4", "unreadable_file"], put(data_good[:32] + rng.bytes(5000)))  # ftyp + junk
  add(["unreadable_file"], put(b"<html>404 Not Found</html>\n"))
  for _ in range(2):
    add(["empty_file"], put(b""))
  for i in range(5):
    add(["no_video_stream"], lambda p, i=i: write_clip(p, seconds=0.5 + i / 4, video=False, channels=1 + i % 2))
  for i in range(5):
    add(["no_audio_stream"], lambda p, i=i: write_clip(p, seconds=0.5 + i / 4, audio=False, **TINY))
  for _ in range(3):
    add(["zero_duration"], lambda p: write_clip(p, seconds=0, **TINY))
  five_minutes = add(
    ["too_long"],
    lambda p: write_clip(
      p, seconds=300, width=64, height=48, fps=1, grain=0, sample_rate=8000, channels=1, content="flat"
    ),
  )
  add([], lambda p: write_clip(p, seconds=0.2, **TINY))  # MELD has clips under 0.5 s
  add([], lambda p: write_clip(p, seconds=0.1, **TINY))  # one frame
  add([], lambda p: write_clip(p, seconds=1.0, width=48, height=64, fps=7))  # portrait, 7 fps
  add([], lambda p: write_clip(p, seconds=1.0, sample_rate=8000, channels=1, **TINY))
  add([], lambda p: write_clip(p, seconds=1.0, sample_rate=44100, **TINY))
  for _ in range(3):
    add(["missing_file"])  # rows whose clip is not there
  for extra in ("dia99_utt0.mp4", "final_videos_testdia3_utt1.mp4", "._dia0_utt1.mp4"):
    open(clips / extra, "wb").write(data_good)  # clips no row names

  rows = [[f"Line {n} it’s café", "Joey", "joy", "positive", 0, n] for n in range(len(expect))]
  bad_rows = [
    ["bad id", "A", "joy", "positive", "", 1],
    ["bad id", "A", "joy", "positive", 1, "-3"],
    ["bad id", "A", "joy", "positive", "one", 1],
    ["bad id", "A", "joy", "positive", 1, 2.5],
    ["bad label", "A", "glee", "positive", 3, 0],
    ["bad label", "A", "joy", "meh", 3, 1],
    ["duplicate", "A", "joy", "positive", 0, 0],
    ["short row", "A"],
  ]
  header = "Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\r\n"
  lines = [",".join(str(v) for v in row) for row in rows + bad_rows]
  (src / "train_sent_emo.csv").write_bytes((header + "\r\n".join(lines)).encode("cp1252"))
  assert len(expect) >= 50
  return {"source": src, "expect": expect, "num_rows": len(rows) + len(bad_rows), "five_minutes": five_minutes}


def test_five_minute_clip_is_refused_without_decoding(faulty):
  start = time.perf_counter()
  clip = clip_reader.read_clip(faulty["five_minutes"], clip_reader.ClipReadConfig(face_crop=False))
  assert time.perf_counter() - start < 1.0
  assert clip.problems == ["too_long"] and clip.duration == pytest.approx(300, abs=1)


def test_preparation_counts_every_fault(faulty, tmp_path):
  src, expect, num_rows = faulty["source"], faulty["expect"], faulty["num_rows"]
  config = meld_format.MeldFormatConfig(
    name="faults", version="1.0.0", num_frames=4, frame_size=32, face_crop=False, num_workers=2
  )
  builder, report_path = prepare.prepare(src, tmp_path, config)
  report = json.load(open(report_path))["splits"]["train"]
  skipped = {reason: v["count"] for reason, v in report["rows_skipped"].items()}
  assert skipped == {"bad_id": 5, "unknown_label": 2, "duplicate_id": 1}
  assert report["rows_read"] == num_rows == report["examples"] + sum(skipped.values())
  assert report["examples"] == len(expect) == builder.info.splits["train"].num_examples
  assert report["unlabeled_clips"]["count"] == 3

  reasons_of = {}
  for reason, v in report["clip_problems"].items():
    assert not reason.startswith("reader_error"), (reason, v["ids"])  # a reader bug
    for example_id in v["ids"]:
      reasons_of.setdefault(example_id, set()).add(reason)
  examples = {ex["id"].decode(): ex for ex in builder.as_dataset(split="train").as_numpy_iterator()}
  for example_id, allowed in expect.items():
    got = reasons_of.get(example_id, set())
    ex = examples[example_id]
    if allowed:
      assert got and got <= allowed, (example_id, got, allowed)
    else:
      assert not got and ex["has_video"] and ex["has_audio"], (example_id, got)
    if not ex["has_video"]:
      assert got and not ex["frames"].any()
    if not ex["has_audio"]:
      assert got and ex["audio"].size == 0
    assert ex["text"].decode().endswith("it’s café")  # cp1252 CSV read right
