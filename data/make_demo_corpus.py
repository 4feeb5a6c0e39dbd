"""Generates the demo corpus: a synthetic dataset in MELD's exact on-disk format that tests what the
model claims to do (text-guided frame selection, audio/video fusion, reliability under corruption).

    python -m data.make_demo_corpus --out DIR [--train N --dev N --test N --seed S
                                              --resolution WxH --workers W]

Per clip, the 12 canonical sample times t_i = (i + 0.5) * duration / 12 are split at random into
3 groups of 4: the key group shows the true emotion's face with the cue shape that the transcript
names ("Look at the triangle."); two decoy groups show two other emotions with other shapes. Video
alone leaves 3 candidates (each exactly 1/3 likely); with the text's cue the key frames identify the
emotion. Audio carries the emotion through prosody, only partly (see `demo_audio`). The text is a
real MELD utterance of the same emotion. ~10% of clips have broken audio, ~10% broken video.

Output: `{train,dev,test}_sent_emo.csv`, clip folders `train_splits/`, `dev_splits_complete/`,
`output_repeated_splits_test/` with `dia{D}_utt{U}.mp4` (H.264 + AAC), and a ground-truth sidecar
`<split>_ground_truth.jsonl` per split. Deterministic given the seed.
"""

import argparse
import csv
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import av
import cv2
import numpy as np

from data import demo_audio, demo_faces
from mer_jax.data.labels import EMOTIONS

NUM_SAMPLES = 12  # canonical uniform frame samples per clip (the model's T)
GROUP_SIZE = 4  # frames per group (the model's K)
FPS = 15
MIN_SECONDS, MAX_SECONDS = 2.4, 3.6
CSV_COLUMNS = (
  "Sr No.",
  "Utterance",
  "Speaker",
  "Emotion",
  "Sentiment",
  "Dialogue_ID",
  "Utterance_ID",
  "Season",
  "Episode",
  "StartTime",
  "EndTime",
)
# split -> (CSV name, clip folder, MELD annotation file its utterances come from)
SPLITS = {
  "train": ("train_sent_emo.csv", "train_splits", "train_sent_emo.csv"),
  "dev": ("dev_sent_emo.csv", "dev_splits_complete", "dev_sent_emo.csv"),
  "test": ("test_sent_emo.csv", "output_repeated_splits_test", "dev_sent_emo.csv"),
}
# MELD's annotation CSVs beside this repository (its working setup); $MELD_DIR comes first (default_meld_dir).
DEFAULT_MELD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"


def default_meld_dir() -> Path:
  """Where the transcripts come from when make_corpus is not told: $MELD_DIR, else DEFAULT_MELD_DIR."""
  return Path(os.path.expanduser(os.environ["MELD_DIR"])) if os.environ.get("MELD_DIR") else DEFAULT_MELD_DIR


SPEAKERS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
GUEST_SPEAKERS = ("Janice", "Carol", "Emily", "Mike", "Richard", "Gunther")
CUE_TEMPLATES = (
  "Look at the {}.",
  "(watch the {})",
  "See the {}?",
  "Focus on the {}.",
  "Notice the {}!",
  "Keep an eye on the {}.",
)
# Utterances that name a cue shape themselves would give the model a second, wrong cue.
_CUE_WORDS = re.compile(r"\b(circle|square|triangle|cross)", re.IGNORECASE)
_MAX_WORDS = 30
_TYPOGRAPHY = str.maketrans(
  {
    "\u2019": "'",
    "\u2018": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u2014": "-",
    "\u2013": "-",
    "\u00a0": " ",
  }
)
# Used only when the MELD annotation files are not found (a bare checkout).
_BUILTIN_UTTERANCES = {
  "neutral": (
    "I'll be at the coffee house.",
    "So what time is it?",
    "He said he'd call later.",
    "We need more napkins.",
  ),
  "surprise": ("Wait, you did what?", "Oh my God, really?", "No way! Since when?", "You're kidding me!"),
  "fear": (
    "I'm so scared right now.",
    "Please don't leave me alone here.",
    "What if he finds out?",
    "I think someone's following me.",
  ),
  "sadness": ("I really miss her.", "It's over, she's gone.", "I just feel so alone.", "Nobody came to my party."),
  "joy": ("This is the best day ever!", "I got the job!", "I love you guys so much!", "Yay, we did it!"),
  "disgust": ("Ew, that is so gross.", "Ugh, what is that smell?", "That's disgusting.", "Eww, get it away from me."),
  "anger": ("Get out of my apartment!", "How could you do this to me?", "I am so mad at you!", "Stop it right now!"),
}


# ----------------------------------------------------------------------------------------- text
def normalize_utterance(text: str) -> str:
  """MELD CSV text clean-up: mojibake, cp1252 control characters, typographic quotes, spaces."""
  if any(mark in text for mark in ("\u00e2\u20ac", "\u00c3", "\u00c2")):
    try:  # UTF-8 bytes that were decoded as cp1252 somewhere upstream
      text = text.encode("cp1252").decode("utf-8")
    except UnicodeError:
      pass
  # \x80-\x9f are cp1252 bytes read as latin-1 (e.g. \x92 for a right quote).
  text = "".join(bytes([ord(ch)]).decode("cp1252", errors="ignore") if 0x80 <= ord(ch) <= 0x9F else ch for ch in text)
  return " ".join(text.translate(_TYPOGRAPHY).split())


def load_utterances(meld_dir: Path, csv_name: str) -> tuple[dict, str]:
  """Emotion -> sorted tuple of usable utterances from a MELD CSV, and the source name."""
  path = Path(meld_dir) / csv_name
  if not path.is_file():
    return {e: _BUILTIN_UTTERANCES[e] for e in EMOTIONS}, "builtin"
  pools = {e: set() for e in EMOTIONS}
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    for row in csv.DictReader(f):
      text = normalize_utterance(row.get("Utterance", ""))
      emotion = row.get("Emotion", "").strip().lower()
      if emotion in pools and 0 < len(text.split()) <= _MAX_WORDS and not _CUE_WORDS.search(text):
        pools[emotion].add(text)
  pools = {e: tuple(sorted(p)) or _BUILTIN_UTTERANCES[e] for e, p in pools.items()}
  return pools, f"meld:{csv_name}"


# ------------------------------------------------------------------------------------- planning
def _split_rng(seed: int, split_index: int) -> np.random.Generator:
  return np.random.default_rng([seed, 1_000_003, split_index])


def _clip_rng(seed: int, split_index: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, split_index, index])


def _quota_labels(n: int, rng: np.random.Generator) -> list[str]:
  """Exact class counts (neutral 25%, the other six 12.5% each, largest remainder), shuffled."""
  weights = np.array([0.25 if e == "neutral" else 0.125 for e in EMOTIONS])
  counts = np.floor(weights * n).astype(int)
  order = np.argsort(-(weights * n - counts), kind="stable")
  counts[order[: n - counts.sum()]] += 1
  labels = [e for e, c in zip(EMOTIONS, counts) for _ in range(c)]
  return [labels[i] for i in rng.permutation(n)]


def _decoy_emotions(emotion: str, rng: np.random.Generator) -> list[str]:
  """Two decoys such that P(true | the 3 shown emotions) is exactly 1/3 for each of them.

  With labels 25% neutral / 12.5% others, a shown set holds neutral with probability 3/4; so a
  non-neutral true emotion gets a neutral decoy 2/3 of the time. Uniform decoys would make
  "neutral is shown" a video-only hint (P(neutral true | shown) = 1/2).
  """
  others = [e for e in EMOTIONS if e not in ("neutral", emotion)]
  if emotion == "neutral":
    return [str(e) for e in rng.choice(others, 2, replace=False)]
  if rng.random() < 2.0 / 3.0:
    return ["neutral", str(rng.choice(others))]
  return [str(e) for e in rng.choice(others, 2, replace=False)]


def _sentiment(emotion: str, rng: np.random.Generator) -> str:
  if emotion == "neutral":
    return "neutral"
  if emotion == "joy":
    return "positive"
  if emotion == "surprise":
    return "positive" if rng.random() < 0.5 else "negative"
  return "negative"


def _corruptions(n: int, fraction: float, rng: np.random.Generator) -> list[tuple]:
  """(modality, kind) or (None, None) per clip: round(fraction*n) each for audio and video,
  never both; kinds alternate so even a tiny split has each kind before it has two of one."""
  k = int(round(fraction * n))
  k = min(k, n // 2)
  slots = rng.permutation(n)
  out = [(None, None)] * n
  for j, i in enumerate(slots[:k]):
    out[i] = ("audio", ("silence", "white_noise")[j % 2])
  for j, i in enumerate(slots[k : 2 * k]):
    out[i] = ("video", ("black", "noise")[j % 2])
  return out


def _time_str(seconds: float) -> str:
  ms = int(round(seconds * 1000))
  return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def plan_split(
  split: str,
  n: int,
  seed: int,
  utterances: dict,
  resolution: tuple[int, int],
  clip_dir: Path,
  corrupt_fraction: float = 0.1,
) -> list[dict]:
  """Every random decision for one split; rendering a plan needs nothing else."""
  split_index = list(SPLITS).index(split)
  srng = _split_rng(seed, split_index)
  labels = _quota_labels(n, srng)
  corruptions = _corruptions(n, corrupt_fraction, srng)
  plans, dialogue, index = [], 0, 0
  while index < n:
    size = min(int(srng.integers(1, 9)), n - index)
    cast = srng.choice(SPEAKERS, int(srng.integers(2, 4)), replace=False).tolist()
    if srng.random() < 0.15:
      cast.append(str(srng.choice(GUEST_SPEAKERS)))
    season, episode = int(srng.integers(1, 11)), int(srng.integers(1, 25))
    clock = float(srng.uniform(30.0, 1200.0))
    for utt in range(size):
      rng = _clip_rng(seed, split_index, index)
      emotion = labels[index]
      num_frames = int(rng.integers(int(np.ceil(MIN_SECONDS * FPS)), int(MAX_SECONDS * FPS) + 1))
      duration = num_frames / FPS
      groups = rng.permutation(NUM_SAMPLES).reshape(3, GROUP_SIZE)
      cues = [demo_faces.CUE_SHAPES[i] for i in rng.permutation(len(demo_faces.CUE_SHAPES))[:3]]
      shown = [emotion] + _decoy_emotions(emotion, rng)
      phrase = CUE_TEMPLATES[int(rng.integers(len(CUE_TEMPLATES)))].format(cues[0])
      pool = utterances[emotion]
      line = pool[int(rng.integers(len(pool)))]
      text = f"{phrase} {line}" if rng.random() < 0.5 else f"{line} {phrase}"
      modality, kind = corruptions[index]
      plans.append(
        dict(
          split=split,
          index=index,
          dialogue=dialogue,
          utterance=utt,
          path=str(clip_dir / f"dia{dialogue}_utt{utt}.mp4"),
          emotion=emotion,
          sentiment=_sentiment(emotion, rng),
          text=text,
          cue_phrase=phrase,
          speaker=str(rng.choice(cast)),
          season=season,
          episode=episode,
          start=_time_str(clock),
          end=_time_str(clock + duration),
          num_frames=num_frames,
          duration=duration,
          resolution=tuple(resolution),
          groups=[sorted(int(i) for i in g) for g in groups],
          cues=cues,
          shown=shown,
          corrupted=modality,
          corruption=kind,
          render_seed=int(rng.integers(2**63)),
        )
      )
      clock += duration + float(rng.uniform(0.2, 2.0))
      index += 1
    dialogue += 1
  return plans


# ------------------------------------------------------------------------------------ rendering
def frame_groups(num_frames: int, groups: list[list[int]]) -> np.ndarray:
  """Group (0 key, 1-2 decoys) shown in each video frame, `(num_frames,) int`.

  Frame j is displayed during [j, j+1)/fps; it takes the group of the sample position nearest its
  midpoint. So each sample time t_i sits in the middle of a run of its group's frames that is the
  full sample spacing wide, and any reader (frame shown at t, nearest pts, first pts >= t) lands in
  it at 15 fps.
  """
  position_group = np.empty(NUM_SAMPLES, int)
  for g, positions in enumerate(groups):
    position_group[positions] = g
  mids = (np.arange(num_frames) + 0.5) / num_frames  # as a fraction of the duration
  positions = np.minimum((mids * NUM_SAMPLES).astype(int), NUM_SAMPLES - 1)
  return position_group[positions]


def render_clip(plan: dict) -> tuple[np.ndarray, np.ndarray]:
  """Frames `(N, H, W) uint8` and audio `(S,) float32` at 16 kHz for one plan."""
  rng = np.random.default_rng(plan["render_seed"])
  style = demo_faces.sample_style(rng, plan["resolution"])
  n = plan["num_frames"]
  num_samples = int(round(plan["duration"] * demo_audio.SAMPLE_RATE))
  audio = demo_audio.synth_prosody(plan["emotion"], num_samples, rng)
  if plan["corrupted"] == "audio":
    audio = demo_audio.corrupt_audio(plan["corruption"], num_samples, rng)
  if plan["corrupted"] == "video":
    return demo_faces.corrupt_frames(plan["corruption"], n, style, rng), audio
  images = [demo_faces.draw_frame(style, e, c) for e, c in zip(plan["shown"], plan["cues"])]
  return np.stack([images[g] for g in frame_groups(n, plan["groups"])]), audio


def _gray_to_yuv420p(frames: np.ndarray) -> np.ndarray:
  """Grey `(N, H, W) uint8` -> yuv420p planes `(N, H*3/2, W) uint8`: limited-range luma (what
  swscale writes for gray -> yuv420p, so a reader's yuv -> gray gets the pixels back), flat chroma."""
  n, h, w = frames.shape
  luma = ((frames.astype(np.uint32) * 219 + 127) // 255 + 16).astype(np.uint8)
  return np.concatenate([luma, np.full((n, h // 2, w), 128, np.uint8)], axis=1)


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray, fps: int = FPS, plain_c: bool = False) -> None:
  """Muxes grey frames `(N, H, W) uint8` (H.264, yuv420p) and mono audio `(S,)` (AAC) to mp4.

  Single-threaded encoders with fixed settings, so the same input gives the same file. x264's SIMD
  code was seen to make run-to-run different files (same input, same process, different heap
  state) at height 120 (not a multiple of 16) with macroblock-tree rate control, on pure-noise
  frames only: mbtree is off (0 of 360 stress encodes differed, vs 5 of 66 noise clips with it on),
  and `plain_c` (x264's C code, 3x slower) is for the noise-corrupted clips on top.
  """
  _, height, width = frames.shape
  x264_params = "mbtree=0" + (":asm=0" if plain_c else "")
  with av.open(path, mode="w", format="mp4") as container:
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.codec_context.gop_size = 2 * fps  # a keyframe every 2 s: readers can seek
    video.codec_context.thread_count = 1
    video.codec_context.options = {"preset": "veryfast", "crf": "23", "threads": "1", "x264-params": x264_params}
    sound = container.add_stream("aac", rate=demo_audio.SAMPLE_RATE)
    sound.codec_context.layout = "mono"
    sound.codec_context.bit_rate = 32000
    sound.codec_context.thread_count = 1
    sound.codec_context.options = {"aac_coder": "fast"}  # 3x faster than twoloop; fine here
    for j, planes in enumerate(_gray_to_yuv420p(frames)):
      frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
      frame.pts = j
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    step = 1024  # AAC frame size
    for start in range(0, len(audio), step):
      chunk = np.ascontiguousarray(audio[None, start : start + step], dtype=np.float32)
      frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
      frame.sample_rate, frame.pts = demo_audio.SAMPLE_RATE, start
      container.mux(sound.encode(frame))
    container.mux(sound.encode(None))


def _render_and_write(plan: dict) -> int:
  """Worker entry point: render one clip and write it. Returns the file size in bytes."""
  frames, audio = render_clip(plan)
  write_mp4(plan["path"], frames, audio, plain_c=plan["corruption"] == "noise")
  return os.path.getsize(plan["path"])


def _init_worker() -> None:
  cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only fight


# -------------------------------------------------------------------------------------- writing
def sidecar_record(plan: dict) -> dict:
  """The ground-truth line of one clip (times rounded so the file is byte-stable)."""

  def times(indices):
    return [round((i + 0.5) * plan["duration"] / NUM_SAMPLES, 4) for i in indices]

  return {
    "id": f"{plan['split']}/dia{plan['dialogue']}_utt{plan['utterance']}",
    "emotion": plan["emotion"],
    "sentiment": plan["sentiment"],
    "duration": round(plan["duration"], 4),
    "fps": FPS,
    "num_frames": plan["num_frames"],
    "cue": plan["cues"][0],
    "cue_phrase": plan["cue_phrase"],
    "text": plan["text"],
    "key_frame_indices": plan["groups"][0],
    "key_frame_times": times(plan["groups"][0]),
    "decoys": [
      {"emotion": e, "cue": c, "frame_indices": g, "frame_times": times(g)}
      for e, c, g in zip(plan["shown"][1:], plan["cues"][1:], plan["groups"][1:])
    ],
    "corrupted": plan["corrupted"],
    "corruption": plan["corruption"],
  }


def _write_csv(path: Path, plans: list[dict]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for sr, p in enumerate(plans, start=1):
      writer.writerow(
        [
          sr,
          p["text"],
          p["speaker"],
          p["emotion"],
          p["sentiment"],
          p["dialogue"],
          p["utterance"],
          p["season"],
          p["episode"],
          p["start"],
          p["end"],
        ]
      )


def _write_sidecar(path: Path, plans: list[dict]) -> None:
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for p in plans:
      f.write(json.dumps(sidecar_record(p), sort_keys=True, ensure_ascii=False) + "\n")


def _remove_stale_clips(folder: Path, plans: list[dict]) -> None:
  keep = {Path(p["path"]).name for p in plans}
  for path in folder.glob("dia*_utt*.mp4"):
    if path.name not in keep:
      path.unlink()


def _report_progress(sizes, total: int, verbose: bool) -> list[int]:
  """Drains an iterator of file sizes, printing progress every ~10% when verbose."""
  out, started = [], time.perf_counter()
  for size in sizes:
    out.append(size)
    if verbose and (len(out) % max(1, total // 10) == 0 or len(out) == total):
      print(f"  {len(out)}/{total} clips, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
  return out


def _render_in_pool(jobs: list[dict], workers: int, verbose: bool) -> list[int] | None:
  """Renders in `workers` spawned processes; None if the pool could not run (then the caller
  renders in-process: same files, since every clip depends only on its plan)."""
  # spawn, not fork: callers (tests, the trainer) may hold JAX/TF threads that fork breaks.
  ctx = multiprocessing.get_context("spawn")
  chunk = max(1, min(16, len(jobs) // (workers * 8)))
  try:
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker) as pool:
      return _report_progress(pool.map(_render_and_write, jobs, chunksize=chunk), len(jobs), verbose)
  except BrokenProcessPool as err:
    # e.g. a parent script read from stdin, which spawned workers cannot re-import
    print(f"make_demo_corpus: process pool failed ({err}); rendering in this process.", file=sys.stderr)
    return None


def make_corpus(
  out_dir,
  num_train: int = 2000,
  num_dev: int = 300,
  num_test: int = 300,
  seed: int = 0,
  resolution: tuple[int, int] = (160, 120),
  workers: int | None = None,
  meld_dir=None,
  corrupt_fraction: float = 0.1,
  verbose: bool = False,
) -> dict:
  """Writes the demo corpus under `out_dir` and returns a summary dict (counts, seconds).

  `resolution` is (width, height), both even and >= 64. `workers` processes render clips
  (default: all CPUs; small corpora are rendered in-process). `meld_dir` holds MELD's
  train/dev annotation CSVs (default $MELD_DIR, else ../shared/data/meld from the repo); without them a small
  built-in set of sentences is used and the summary says so. Old `dia*_utt*.mp4` files in the
  clip folders that the new corpus does not hold are removed, so CSV rows and clips always match.
  `verbose` prints progress to stderr.
  """
  started = time.perf_counter()
  width, height = (int(v) for v in resolution)
  if width % 2 or height % 2 or min(width, height) < 64:
    raise ValueError(
      f"resolution {width}x{height}: width and height must be even and >= 64 "
      "(H.264 4:2:0 needs even sizes; the faces need room)."
    )
  counts = {"train": num_train, "dev": num_dev, "test": num_test}
  if any(n < 0 for n in counts.values()):
    raise ValueError(f"Clip counts must be >= 0, got {counts}.")
  if not 0.0 <= corrupt_fraction <= 0.5:
    raise ValueError(f"corrupt_fraction={corrupt_fraction}: use 0..0.5 (audio and video each).")
  out = Path(out_dir)
  meld = Path(meld_dir) if meld_dir is not None else default_meld_dir()
  plans_by_split, sources = {}, {}
  for split, (csv_name, folder, source_csv) in SPLITS.items():
    utterances, sources[split] = load_utterances(meld, source_csv)
    (out / folder).mkdir(parents=True, exist_ok=True)
    plans_by_split[split] = plan_split(
      split, counts[split], seed, utterances, (width, height), out / folder, corrupt_fraction
    )
    _remove_stale_clips(out / folder, plans_by_split[split])
  jobs = [p for plans in plans_by_split.values() for p in plans]
  workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
  sizes = None
  if workers > 1 and len(jobs) >= 48:
    sizes = _render_in_pool(jobs, workers, verbose)
  if sizes is None:
    sizes = _report_progress(map(_render_and_write, jobs), len(jobs), verbose)
  for split, (csv_name, _, _) in SPLITS.items():
    _write_csv(out / csv_name, plans_by_split[split])
    _write_sidecar(out / f"{split}_ground_truth.jsonl", plans_by_split[split])
  summary = {
    "out_dir": str(out),
    "seed": seed,
    "resolution": [width, height],
    "fps": FPS,
    "text_source": sources,
    "bytes": int(sum(sizes)),
    "splits": {},
  }
  for split, plans in plans_by_split.items():
    summary["splits"][split] = {
      "clips": len(plans),
      "dialogues": len({p["dialogue"] for p in plans}),
      "emotions": dict(Counter(p["emotion"] for p in plans)),
      "corrupted_audio": sum(p["corrupted"] == "audio" for p in plans),
      "corrupted_video": sum(p["corrupted"] == "video" for p in plans),
    }
  summary["seconds"] = round(time.perf_counter() - started, 2)
  return summary


def _format_summary(s: dict) -> str:
  lines = [
    f"demo corpus in {s['out_dir']}: seed {s['seed']}, {s['resolution'][0]}x"
    f"{s['resolution'][1]} @ {s['fps']} fps, {s['bytes'] / 1e6:.1f} MB, {s['seconds']:.1f} s"
  ]
  for split, d in s["splits"].items():
    emo = " ".join(f"{e}={d['emotions'].get(e, 0)}" for e in EMOTIONS)
    lines.append(
      f"  {split:5s} {d['clips']:5d} clips {d['dialogues']:4d} dialogues | {emo} | "
      f"corrupted audio={d['corrupted_audio']} video={d['corrupted_video']} | "
      f"text {s['text_source'][split]}"
    )
  return "\n".join(lines)


def _parse_resolution(text: str) -> tuple[int, int]:
  match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if not match:
    raise argparse.ArgumentTypeError(f"resolution {text!r}: expected WxH, e.g. 160x120")
  return int(match.group(1)), int(match.group(2))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--dev", type=int, default=300)
  parser.add_argument("--test", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--resolution", type=_parse_resolution, default=(160, 120), help="WxH")
  parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
  parser.add_argument(
    "--meld-dir", default=None, help=f"MELD annotation CSVs (default $MELD_DIR, else {DEFAULT_MELD_DIR})"
  )
  args = parser.parse_args(argv)
  try:
    summary = make_corpus(
      args.out, args.train, args.dev, args.test, args.seed, args.resolution, args.workers, args.meld_dir, verbose=True
    )
  except ValueError as err:
    parser.error(str(err))
  print(_format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
