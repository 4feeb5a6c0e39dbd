"""Data throughput: clips/s through mer_jax.data.clip_reader, and the training input's rates.

    python -m benchmarks.data_throughput [--quick] [--json]

Generates MELD-like clips itself (1280x720, 25 fps, 3 s, H.264 (x264 'veryfast', crf 23) + AAC
48 kHz stereo; a face photo moving over a blurred background with film grain, or moving noise
blocks: ~1.5 Mbit/s, MELD's clips are 1-3), reads them with the reader over 2 processes, and
reports wall-clock clips/s and CPU ms per clip (the machine is shared: CPU time says what 2 idle
cores would do). Then prepares them with data/meld_format.py and measures the training input on copies of
the prepared clips (`bench_input`), in one run:

  raw_read_clips_per_s_per_core   tf.data read + parse of the records only: the storage format's limit
  pipeline_clips_per_s_per_core   the train pipeline's steady state once the cache is filled (raw batches
                                  ready through the prefetch thread), clips per CPU-second of the process
  pipeline_over_raw_ratio         the two above
and, separately, the cache fill's time and rate, the jitted device features (log-mel + augmentation) per
batch on this machine's JAX backend, and the host-feature pipeline (make_dataset) the tools use.
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
  """Prepare the clips (MELD's reader settings, one 'train' split), then measure the training input on copies."""
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
  out.update(bench_input(builder, config, os.path.join(work, "copies"), quick))
  return out


# The prepared-example encoding before issue 23 (zlib frames, tfds Audio's int64 varints), for comparison.
def _old_features(fmt):
  import tensorflow_datasets as tfds

  from mer_jax.data import meld_csv

  new = meld_csv.example_features(fmt)
  features = {k: new[k] for k in new.keys()}
  t, s = fmt.num_frames, fmt.frame_size
  features["frames"] = tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)
  features["audio"] = tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=fmt.sample_rate)
  return tfds.features.FeaturesDict(features)


def write_copies(builder, fmt, data_dir: str, name: str, count: int, features=None) -> str:
  """`count` copies of the prepared train examples (new ids) as TFDS data `name/bench` under `data_dir`, written
  with `features` (default: the builder's own, meld_csv.example_features). Returns the builder name."""
  import tensorflow_datasets as tfds

  from mer_jax.data import meld_csv

  examples = list(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())

  def copies():
    for i in range(count):
      ex = dict(examples[i % len(examples)])
      ex["id"] = f"train/dia{i}_utt0"
      ex["dialogue_id"], ex["utterance_id"] = i, 0
      yield ex["id"], ex

  tfds.dataset_builders.store_as_tfds_dataset(
    name=name,
    version="1.0.0",
    config="bench",
    features=features or meld_csv.example_features(fmt),
    data_dir=data_dir,
    split_datasets={"train": copies()},
  )
  return name


def raw_read_rate(config, data_dir: str, passes: int) -> dict:
  """Read + parse only (tf.data over the records, every feature decoded): clips per CPU-second of this process
  (time.process_time: every thread of it) and per wall second. The limit any pipeline over the format has."""
  import tensorflow as tf

  from mer_jax.data import input_pipeline

  builder = input_pipeline.load_builder(config, data_dir)
  read_config = tfds_read_config()
  ds = builder.as_dataset(split="train", shuffle_files=False, read_config=read_config).repeat(passes)
  # One value of each decoded tensor: every decode runs, Python sees one small batch per 256 clips.
  ds = ds.map(
    lambda ex: tf.cast(ex["frames"][0, 0, 0, 0], tf.int32) + tf.cast(tf.reduce_sum(ex["audio"][:1]), tf.int32)
  )
  ds = ds.batch(256)
  for _ in ds.take(1):  # graph building, file opening
    pass
  cpu, wall, clips = time.process_time(), time.perf_counter(), 0
  for values in ds:
    clips += int(values.shape[0])
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  return {"clips": clips, "clips_per_s_per_core": round(clips / cpu, 1), "clips_per_s": round(clips / wall, 1)}


def tfds_read_config():
  import tensorflow_datasets as tfds

  from mer_jax.data import input_pipeline

  return tfds.ReadConfig(options=input_pipeline._options(), try_autocache=False)


def bench_input(builder, fmt, work: str, quick: bool) -> dict:
  """The training input on copies of the prepared clips (MELD's 12 x 112 px frames, 3 s audio; the train config
  crops audio to 4 s): the raw record read rate, the cache fill, the in-memory train pipeline's steady state (raw
  batches of 32 ready through the prefetch thread), the jitted device features per batch, and the host-feature
  pipeline (make_dataset: log-mel and augmentation in tf.data, what tools still use) for comparison."""
  import jax

  from configs import default
  from mer_jax.data import device_features, example_cache, input_pipeline, raw_batches

  count = 192 if quick else 1024
  start = time.perf_counter()
  write_copies(builder, fmt, work, "bench_copies", count)
  out = {"input_examples": count, "input_write_s": round(time.perf_counter() - start, 1)}
  config = default.get_config()
  config.data.update(builder="bench_copies", builder_config="bench", data_dir=work, cache="memory")
  config.batch_size = 32
  one = dict(process_index=0, process_count=1, data_dir=work)

  out["raw_read"] = raw_read_rate(config, work, passes=1 if quick else 3)
  if not quick:  # the format before issue 23, same examples
    write_copies(builder, fmt, work, "bench_copies_old", count, _old_features(fmt))
    old = config.copy_and_resolve_references()
    old.data.builder = "bench_copies_old"
    out["raw_read_old_format"] = raw_read_rate(old, work, passes=3)

  builder_copies = input_pipeline.load_builder(config, work)
  input_pipeline.split_token_table(builder_copies, "train", config)  # tokenised once per split: not the fill's cost
  raw_batches.clear_caches()
  cpu, wall = time.process_time(), time.perf_counter()
  cache = raw_batches.cached_split(config, "train", **one)
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  out["cache_fill"] = {
    "seconds": round(wall, 2),
    "clips_per_s": round(cache.size / wall, 1),
    "clips_per_s_per_core": round(cache.size / cpu, 1),
    "megabytes": round(cache.nbytes / 1e6, 1),
  }

  batches = example_cache.Prefetcher(raw_batches.train_batches(config, "train", **one))
  for _ in range(3):
    batch = next(batches)
  steps = 40 if quick else 300
  cpu, wall = time.process_time(), time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  batches.close()
  clips = steps * config.batch_size
  out["pipeline"] = {
    "batch_size": config.batch_size,
    "clips_per_s_per_core": round(clips / cpu, 1),
    "clips_per_s": round(clips / wall, 1),
    "batch": {k: list(v.shape) for k, v in batch.items() if k != "id"},
  }

  to_model = jax.jit(lambda raw, key: device_features.model_batch(raw, config.data, rng=key))
  inputs, key = input_pipeline.model_inputs(batch), jax.random.key(0)
  jax.block_until_ready(to_model(inputs, key))
  times = []
  for i in range(5 if quick else 20):
    t = time.perf_counter()
    jax.block_until_ready(to_model(inputs, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - t)
  out["device_features_ms_per_batch"] = round(1000 * float(np.median(times)), 2)
  out["device_features_backend"] = jax.default_backend()

  host = input_pipeline.as_numpy(input_pipeline.make_dataset(config, "train", train=True, **one))
  next(host)
  steps = 5 if quick else 30
  cpu, wall = time.process_time(), time.perf_counter()
  for _ in range(steps):
    next(host)
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  out["host_features_pipeline"] = {
    "clips_per_s_per_core": round(steps * config.batch_size / cpu, 1),
    "clips_per_s": round(steps * config.batch_size / wall, 1),
  }
  raw_batches.clear_caches()

  out["raw_read_clips_per_s_per_core"] = out["raw_read"]["clips_per_s_per_core"]
  out["pipeline_clips_per_s_per_core"] = out["pipeline"]["clips_per_s_per_core"]
  out["pipeline_over_raw_ratio"] = round(out["pipeline_clips_per_s_per_core"] / out["raw_read_clips_per_s_per_core"], 2)
  return out


def print_input_table(results: dict) -> None:
  """The training input's rates (bench_input), one line each."""
  rows = [("raw record read (read + parse only)", results["raw_read"])]
  if "raw_read_old_format" in results:
    rows.append(("  the same, format before issue 23 (zlib)", results["raw_read_old_format"]))
  rows += [
    ("cache fill (one pass, resize, tokens)", results["cache_fill"]),
    ("train pipeline, in memory (raw batches)", results["pipeline"]),
    ("host-feature pipeline (make_dataset)", results["host_features_pipeline"]),
  ]
  print(f"\n{'training input (' + str(results['input_examples']) + ' clips)':42s} {'clips/s':>9s} {'clips/cpu-s':>12s}")
  for name, row in rows:
    print(f"{name:42s} {row['clips_per_s']:9.1f} {row['clips_per_s_per_core']:12.1f}")
  print(
    f"pipeline / raw read (per core): {results['pipeline_over_raw_ratio']:.2f}x; cache fill "
    f"{results['cache_fill']['seconds']} s, {results['cache_fill']['megabytes']} MB; device features "
    f"(log-mel + augmentation, jitted, {results['device_features_backend']}): "
    f"{results['device_features_ms_per_batch']} ms per batch of {results['pipeline']['batch_size']}"
  )


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
  print_input_table(results)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  if args.json:  # one line: tests/test_benchmarks.py reads the last line that starts with '{'
    print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
