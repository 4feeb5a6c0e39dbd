"""Data preparation throughput: clips/s through mer_jax.data.clip_reader, and tf.data examples/s.

    python -m benchmarks.data_throughput [--quick] [--json]

Generates MELD-like clips itself (1280x720, 25 fps, 3 s, H.264 (x264 'veryfast', crf 23) + AAC
48 kHz stereo; a face photo moving over a blurred background with film grain, or moving noise
blocks: ~1.5 Mbit/s, MELD's clips are 1-3), reads them with the reader over 2 processes, and
reports wall-clock clips/s and CPU ms per clip (the machine is shared: CPU time says what 2 idle
cores would do). Then prepares them with data/meld_format.py and reads the prepared data back.
Prints a table; writes benchmarks/results/data_throughput.json.

`write_clip` is also the tests' clip maker (tests/test_clip_reader.py, tests/test_meld_format.py).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import av
import cv2
import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results", "data_throughput.json")


def face_photo() -> np.ndarray:
  """A real face (Grace Hopper, shipped with matplotlib), (H, W, 3) uint8 BGR."""
  from matplotlib import cbook

  return cv2.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), cv2.IMREAD_COLOR)


def _picture(kind: str, i: int, w: int, h: int, rng, state: dict) -> np.ndarray:
  """Frame i of a clip: 'face' (photo moving over a background), 'noise' (moving blocks), 'flat'."""
  if "bg" not in state:
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([xx * 255 // max(1, w), yy * 255 // max(1, h), np.full_like(xx, 120)], -1)
    bg = bg.astype(np.uint8)
    for _ in range(8):
      p0, p1 = rng.integers(0, [w, h]).tolist(), rng.integers(0, [w, h]).tolist()
      cv2.rectangle(bg, tuple(p0), tuple(p1), tuple(rng.integers(0, 255, 3).tolist()), -1)
    state["bg"] = cv2.GaussianBlur(bg, (0, 0), max(1, h / 240))
    fh = max(8, int(h * rng.uniform(0.75, 1.0)))  # the face: ~25-35% of the frame height
    photo = face_photo()
    state["face"] = cv2.resize(photo, (fh * photo.shape[1] // photo.shape[0], fh))
    state["blocks"] = rng.integers(0, 255, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    state["xy"] = rng.uniform(0, 1, 2)
  if kind == "flat":
    return np.full((h, w, 3), 128, np.uint8)
  if kind == "noise":
    blocks = np.roll(state["blocks"], i, axis=1)
    return cv2.resize(blocks, (w, h), interpolation=cv2.INTER_LINEAR)
  frame = state["bg"].copy()
  face = state["face"]
  fh, fw = face.shape[:2]
  x = int((w - fw) * state["xy"][0] + 0.03 * w * np.sin(i / 15))
  y = int((h - fh) * state["xy"][1] + 0.01 * h * np.cos(i / 20))
  x, y = min(max(x, 0), max(0, w - fw)), min(max(y, 0), max(0, h - fh))
  frame[y : y + fh, x : x + fw] = face[: h - y, : w - x]
  return frame


def write_clip(
  path,
  seconds=3.0,
  width=1280,
  height=720,
  fps=25,
  content="face",
  video=True,
  audio=True,
  sample_rate=48000,
  channels=2,
  tone_hz=220.0,
  grain=3,
  seed=0,
  preset="veryfast",
):
  """Write an H.264 + AAC mp4 with PyAV. content: 'face', 'noise' or 'flat'.

  Audio: a tone of `tone_hz` with a 3 Hz tremolo and a little noise. seconds=0 writes a file whose
  streams hold no frame. Returns the path.
  """
  rng = np.random.default_rng(seed)
  layout = "stereo" if channels == 2 else "mono"
  with av.open(str(path), "w") as container:
    vs = as_ = None
    if video:
      vs = container.add_stream("libx264", rate=fps)
      vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
      vs.options = {"preset": preset, "crf": "23"}
    if audio:
      as_ = container.add_stream("aac", rate=sample_rate)
      as_.layout = layout
    container.start_encoding()  # writes the header even when no frame follows (seconds=0)
    state: dict = {}
    for i in range(int(round(seconds * fps)) if video else 0):
      picture = _picture(content, i, width, height, rng, state)
      if grain:  # 2x2-pixel grain survives x264 as camera noise does: MELD-like bitrates
        if "grain" not in state:
          half = rng.integers(-grain, grain + 1, (8, (height + 1) // 2, (width + 1) // 2), dtype=np.int16)
          state["grain"] = half.repeat(2, axis=1).repeat(2, axis=2)[:, :height, :width, None]
        noise = state["grain"][rng.integers(0, 8)]
        picture = np.clip(picture + noise, 0, 255).astype(np.uint8)
      for packet in vs.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")):
        container.mux(packet)
    if vs is not None:
      for packet in vs.encode():
        container.mux(packet)
    if as_ is not None:
      n = int(round(seconds * sample_rate))
      t = np.arange(n) / sample_rate
      wave = 0.2 * np.sin(2 * np.pi * tone_hz * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
      wave = (wave + 0.01 * rng.standard_normal(n)).astype(np.float32)
      planes = np.repeat(wave[None], channels, axis=0)
      for s in range(0, n, 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, s : s + 1024]), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, s
        for packet in as_.encode(frame):
          container.mux(packet)
      for packet in as_.encode():
        container.mux(packet)
  return str(path)


def _write_one(args):
  path, seed = args
  return write_clip(path, content="noise" if seed % 4 == 3 else "face", seed=seed)


def make_clips(folder: str, count: int, workers: int = 2, unique: int | None = None) -> list[str]:
  """`count` MELD-like clips dia0_utt{i}.mp4 in `folder`: `unique` of them encoded (over `workers`
  processes), the rest copies (a copy costs the reader as much; encoding costs ~3 s a clip)."""
  import multiprocessing

  os.makedirs(folder, exist_ok=True)
  paths = [os.path.join(folder, f"dia0_utt{i}.mp4") for i in range(count)]
  unique = min(unique or count, count)
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    pool.map(_write_one, [(paths[i], i) for i in range(unique)])
  for i in range(unique, count):
    shutil.copy(paths[i % unique], paths[i])
  return paths


def _timed_read(args):
  from mer_jax.data import clip_reader

  path, config = args
  start = time.process_time()
  clip = clip_reader.read_clip(path, config)
  return time.process_time() - start, clip.has_video and clip.has_audio, float(clip.face_found.mean())


def bench_reader(paths, config, workers: int) -> dict:
  """Wall clips/s over `workers` spawned processes (pool start excluded) and CPU ms per clip."""
  import multiprocessing

  from mer_jax.data import clip_reader

  config = dataclasses.replace(config, thread_type="NONE") if workers > 1 else config
  with multiprocessing.get_context("spawn").Pool(workers, initializer=clip_reader._init_worker) as pool:
    pool.map(_timed_read, [(paths[0], config)] * workers)  # warm: imports, Haar cascade
    start = time.perf_counter()
    results = pool.map(_timed_read, [(p, config) for p in paths], chunksize=1)
    wall = time.perf_counter() - start
  cpu = [r[0] for r in results]
  return {
    "clips": len(paths),
    "clips_per_s": round(len(paths) / wall, 2),
    "cpu_ms_per_clip": round(1000 * float(np.mean(cpu)), 1),
    "idle_cores_clips_per_s": round(workers / float(np.mean(cpu)), 2),
    "all_read": all(r[1] for r in results),
    "face_found_fraction": round(float(np.mean([r[2] for r in results])), 3),
  }


def bench_prepare_and_tfdata(clip_dir: str, work: str, workers: int, quick: bool) -> dict:
  """Prepare the clips (MELD's reader settings, one 'train' split), then read them with tf.data."""
  from data import meld_format, prepare

  source = os.path.join(work, "source")
  os.makedirs(os.path.join(source, "train_splits"), exist_ok=True)
  names = sorted(os.listdir(clip_dir))
  with open(os.path.join(source, "train_sent_emo.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"])
    for i, name in enumerate(names):
      shutil.copy(os.path.join(clip_dir, name), os.path.join(source, "train_splits", f"dia0_utt{i}.mp4"))
      writer.writerow([i + 1, f"Utterance {i}.", "A", "joy", "positive", 0, i])
  config = meld_format.MeldFormatConfig(name="bench", version="1.0.0", num_workers=workers)
  start = time.perf_counter()
  builder, _ = prepare.prepare(source, os.path.join(work, "tfds"), config)
  prep_s = time.perf_counter() - start
  out = {
    "prepare_examples_per_s": round(len(names) / prep_s, 2),
    "prepare_note": "builder end to end, incl. spawning workers and writing TFRecords",
  }
  try:
    out.update(bench_tfdata(os.path.join(work, "tfds"), config, quick))
  except ImportError as err:  # the input pipeline is another module; say so rather than fail
    out.update({"tfdata_examples_per_s": None, "tfdata_todo": f"input pipeline: {err}"})
  return out


def bench_tfdata(data_dir: str, builder_config, quick: bool) -> dict:
  """examples/s of mer_jax.data.input_pipeline.make_dataset (train: shuffle, augment, log-mel, batch)."""
  from configs import default
  from mer_jax.data import input_pipeline

  config = default.get_config()
  config.data.builder_config = builder_config.name
  config.data.max_audio_seconds = builder_config.max_audio_seconds
  config.batch_size = 8
  it = input_pipeline.as_numpy(
    input_pipeline.make_dataset(config, "train", train=True, process_index=0, process_count=1, data_dir=data_dir)
  )
  next(it)  # tokenizer, graph tracing, first fill of the prefetch buffer
  steps = 10 if quick else 50
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  seconds = time.perf_counter() - start
  return {
    "tfdata_examples_per_s": round(steps * config.batch_size / seconds, 1),
    "tfdata_batch": {k: list(v.shape) for k, v in batch.items() if k != "id"},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="6 clips (3 encoded), < 60 s (CI)")
  parser.add_argument("--json", action="store_true", help="also print the JSON")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--clips", type=int, default=None, help="default 20 (6 with --quick)")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  from data import meld_format
  from mer_jax.data import face_crop

  count = args.clips or (6 if args.quick else 20)
  work = tempfile.mkdtemp(prefix="mer_jax_bench_")
  results = {
    "machine_cores": os.cpu_count(),
    "workers": args.workers,
    "quick": args.quick,
    "clip": "3 s 1280x720 25 fps H.264 veryfast crf23 + AAC 48 kHz stereo",
  }
  try:
    start = time.perf_counter()
    paths = make_clips(os.path.join(work, "clips"), count, args.workers, unique=3 if args.quick else None)
    results["generate_s"] = round(time.perf_counter() - start, 1)
    results["clip_mb"] = round(float(np.mean([os.path.getsize(p) for p in paths])) / 1e6, 2)
    meld = {c.name: c for c in meld_format.BUILDER_CONFIGS}["meld"].clip_read_config()
    replace = dataclasses.replace
    if face_crop.face_detector_available():
      variants = {
        "meld builder (face crop, I/P, no deblock)": meld,
        "+ deblocking": replace(meld, skip_loop_filter=False),
        "+ exact frames, deblocking (demo)": replace(meld, exact_frames=True, skip_loop_filter=False),
      }
      if not args.quick:
        variants["+ centre crop"] = replace(meld, face_crop=False)
        variants["+ Haar on all 12 frames"] = replace(meld, face_probes=12)
    else:
      variants = {"meld builder, centre crop (no Haar cascade here)": replace(meld, face_crop=False)}
    results["reader"] = {name: bench_reader(paths, cfg, args.workers) for name, cfg in variants.items()}
    results.update(bench_prepare_and_tfdata(os.path.join(work, "clips"), work, args.workers, args.quick))
  finally:
    shutil.rmtree(work, ignore_errors=True)

  print(f"{'reader config':40s} {'clips/s':>8s} {'cpu ms/clip':>12s} {'idle 2-core clips/s':>20s} {'faces':>6s}")
  for name, r in results["reader"].items():
    print(
      f"{name:40s} {r['clips_per_s']:8.2f} {r['cpu_ms_per_clip']:12.1f} "
      f"{r['idle_cores_clips_per_s']:20.2f} {r['face_found_fraction']:6.2f}"
    )
  print(f"prepare (builder) examples/s: {results['prepare_examples_per_s']}")
  print(
    f"tf.data examples/s: {results.get('tfdata_examples_per_s')}"
    + (f"  (TODO: {results['tfdata_todo']})" if results.get("tfdata_todo") else "")
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  if args.json:  # one line: tests/test_benchmarks.py reads the last line that starts with '{'
    print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
