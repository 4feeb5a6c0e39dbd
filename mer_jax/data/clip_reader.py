"""Read one clip (mp4 or anything FFmpeg opens) into T grey frames and 16 kHz mono audio.

Library code shared by the dataset builder (data/meld_format.py) and by prediction on a raw clip, so
training and serving read a clip the same way. `read_clip` never raises on bad media: a missing,
empty, truncated, foreign, stream-less, empty or over-long file gives `has_video` / `has_audio` False
and a reason string in `problems` (the reasons are the keys of the preparation report).

Cost: a 12-frame read never decodes more of a clip than it must. Frame targets are uniform,
`t_i = (i + 0.5) * duration / T`; the demuxer seeks to the keyframe before a far target, and packets
that hold no target frame are decoded with `skip_frame='NONREF'` (the decoder drops them when no
other frame refers to them) -- or, with exact_frames=False, no B-frame is decoded at all and each
target takes the nearest I/P frame. Only the chosen frames are converted to grey, in swscale, at a
working size; faces are detected on a smaller copy of two to four probe frames and the boxes
interpolated between them (mer_jax/data/face_crop.py). Measured costs: benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import warnings

import av
import cv2
import numpy as np

from mer_jax.data import face_crop as face_crop_lib

# Reasons (stable strings; the report counts them).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
CORRUPT_MP4 = "corrupt_mp4"  # has an mp4/mov signature but cannot be opened (e.g. no moov atom)
UNREADABLE_FILE = "unreadable_file"  # FFmpeg does not recognise it as media at all
NO_VIDEO_STREAM = "no_video_stream"
NO_AUDIO_STREAM = "no_audio_stream"
ZERO_DURATION = "zero_duration"
TOO_LONG = "too_long"
NO_VIDEO_FRAMES = "no_video_frames"
VIDEO_DECODE_ERROR = "video_decode_error"
VIDEO_ENDS_EARLY = "video_ends_early"  # frames stop well before the stated duration (cut file)
NO_AUDIO_SAMPLES = "no_audio_samples"
AUDIO_DECODE_ERROR = "audio_decode_error"
AUDIO_ENDS_EARLY = "audio_ends_early"  # > 0.5 s less audio than the stream says it holds
READER_CRASHED = "reader_crashed"  # the decoder killed its worker process on this file, twice


@dataclasses.dataclass(frozen=True)
class ClipReadConfig:
  """How a clip is read. Every field can change the frames a model sees, so training and serving
  must use the same config (the builder stores it in the prepared data's metadata). Past the first
  six, the fields trade cost against fidelity; benchmarks/data_throughput.py measures them."""

  num_frames: int = 12
  frame_size: int = 112
  face_crop: bool = True
  sample_rate: int = 16000
  max_audio_seconds: float = 10.0
  max_clip_seconds: float = 60.0
  work_height: int = 360  # grey frames are cut from a copy of this height (swscale)
  detect_height: int = 120  # faces are searched on a copy of this height (min face: 24 px = 1/5)
  face_probes: int = 4  # at most this many frames are searched for a face (see face_crop.face_boxes)
  face_reuse_seconds: float = 1.0  # a probe without a face borrows the nearest box this close
  face_margin: float = 1.4  # crop side = margin * Haar box side (the box is tight on eyes-mouth)
  seek_gap_seconds: float = 1.5  # seek when the next target is further ahead than this
  exact_frames: bool = True  # False: nearest I/P frame to each t_i (<= ~2 frames off), ~2x cheaper
  skip_loop_filter: bool = False  # skip H.264 deblocking: ~15% faster, ~1 grey level off
  thread_type: str = "AUTO"  # FFmpeg decoder threads; 'NONE' when many clips decode in parallel


@dataclasses.dataclass
class ClipData:
  """One clip. frames (T, S, S, 1) uint8; frame_times (T,) float32 s; face_found (T,) bool;
  audio (N,) int16 at config.sample_rate, N <= max_audio_seconds * sample_rate."""

  frames: np.ndarray
  frame_times: np.ndarray
  face_found: np.ndarray
  audio: np.ndarray
  has_video: bool
  has_audio: bool
  duration: float
  problems: list[str]


def frame_times_for(duration: float, num_frames: int) -> np.ndarray:
  """Uniform sample times t_i = (i + 0.5) * duration / T, (T,) float32 seconds."""
  return ((np.arange(num_frames) + 0.5) * (duration / num_frames)).astype(np.float32)


def empty_clip(config: ClipReadConfig, problems: list[str], duration: float = 0.0) -> ClipData:
  """A clip with neither modality: zero frames, no audio, `problems` as given."""
  t, s = config.num_frames, config.frame_size
  return ClipData(
    frames=np.zeros((t, s, s, 1), np.uint8),
    frame_times=frame_times_for(duration, t),
    face_found=np.zeros((t,), bool),
    audio=np.zeros((0,), np.int16),
    has_video=False,
    has_audio=False,
    duration=float(duration),
    problems=list(problems),
  )


# ----------------------------------------------------------------------------------------- video


def _work_size(stream, config: ClipReadConfig):
  """(width, height) of the grey working copy: height config.work_height at most, aspect kept."""
  w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
  if w <= 0 or h <= 0:
    return None
  scale = min(1.0, config.work_height / h)
  # Even sizes keep swscale on its fast paths.
  return max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)


class _TargetFrames:
  """Collects, for each target time, the grey copy of the frame on screen at that time (exact) or
  of the decoded frame nearest to it (nearest: only some frames are decoded)."""

  def __init__(self, targets: list[float], size, frame_dur: float, nearest: bool = False):
    self.targets, self.size, self.frame_dur, self.nearest = targets, size, frame_dur, nearest
    self.chosen: list = [None] * len(targets)
    self.next = 0  # first target without a frame
    self.last = None  # most recent decoded frame
    self.position = -np.inf  # its time
    self._cache: dict = {}

  def done(self) -> bool:
    return self.next >= len(self.targets)

  def _grey(self, frame) -> np.ndarray:
    key = frame.pts if frame.pts is not None else id(frame)
    if key not in self._cache:  # short clips map several targets to one frame
      w, h = self.size or (frame.width, frame.height)
      self._cache[key] = frame.reformat(width=w, height=h, format="gray", interpolation="AREA").to_ndarray()
    return self._cache[key]

  def add(self, frame, time: float):
    if self.nearest:
      # Targets up to this frame lie between the previous decoded frame and this one.
      while not self.done() and time >= self.targets[self.next] - 1e-6:
        target = self.targets[self.next]
        closer = self.last is None or time - target <= target - self.position
        self.chosen[self.next] = self._grey(frame if closer else self.last)
        self.next += 1
      self.last, self.position = frame, max(self.position, time)
      return
    # Targets before this frame were showing the previous one (or this one, at the clip start).
    while not self.done() and time > self.targets[self.next] + 1e-6:
      self.chosen[self.next] = self._grey(self.last if self.last is not None else frame)
      self.next += 1
    # Targets within this frame's display time are settled now: no need to decode the next one.
    while not self.done() and self.targets[self.next] < time + self.frame_dur - 1e-6:
      self.chosen[self.next] = self._grey(frame)
      self.next += 1
    self.last, self.position = frame, max(self.position, time)

  def finish(self) -> bool:
    """End of stream or a decode error: the last decoded frame stays on screen to the end.

    Returns True when targets lay well past the last frame (a cut file, not a rounding).
    """
    late = False
    if self.last is not None:
      while not self.done():
        late |= self.targets[self.next] > self.position + max(0.5, 3 * self.frame_dur)
        self.chosen[self.next] = self._grey(self.last)
        self.next += 1
    return late


def _decode_video(container, stream, targets: np.ndarray, config: ClipReadConfig, problems: list):
  """Grey work-size copies (T arrays, None where nothing decoded) of the frames shown at
  `targets` (seconds from the clip start).

  Seeks to the keyframe before a target that is more than config.seek_gap_seconds ahead. Exact
  frames: packets that hold no target are decoded with skip_frame='NONREF'. Otherwise no B-frame
  is decoded (skip_frame='BIDIR', about half the cost) and each target takes the nearest I/P frame.
  If a seek lands behind what was already decoded (sparse keyframes), seeking is given up for this
  clip. The demuxer must stand at the start of the file.
  """
  tb = float(stream.time_base)
  start = stream.start_time * tb if stream.start_time is not None else 0.0
  rate = stream.average_rate or stream.guessed_rate
  frame_dur = 1.0 / float(rate) if rate else 0.04
  times = [start + float(t) for t in targets]
  out = _TargetFrames(times, _work_size(stream, config), frame_dur, not config.exact_frames)
  codec = stream.codec_context
  if config.skip_loop_filter:
    codec.options = {**codec.options, "skip_loop_filter": "all"}
  try:
    stream.thread_type = config.thread_type
  except (ValueError, av.FFmpegError):  # a decoder that refuses threads still decodes
    pass

  def skip_for(p) -> str:
    if not config.exact_frames:
      return "BIDIR"
    j = bisect.bisect_left(times, p - 1e-6, lo=out.next) if p is not None else out.next
    holds_target = p is None or (j < len(times) and times[j] < p + frame_dur)
    return "DEFAULT" if holds_target else "NONREF"

  can_seek = True
  try:
    while not out.done():
      seeked = False
      ahead = times[out.next] - max(out.position, start)
      if can_seek and ahead > config.seek_gap_seconds:
        try:
          container.seek(int(times[out.next] / tb), stream=stream, backward=True)
          seeked = True
        except av.FFmpegError:  # unseekable: decode forward from where the demuxer is
          can_seek = False
      jump = False
      for packet in container.demux(stream):
        codec.skip_frame = skip_for(packet.pts * tb if packet.pts is not None else None)
        for frame in packet.decode():
          ft = frame.time if frame.time is not None else out.position + frame_dur
          if seeked:
            seeked = False
            can_seek = can_seek and ft > out.position
          out.add(frame, ft)
        if out.done():
          break
        # Jump again only once this seek has given a frame (else it would loop forever).
        if (
          can_seek and not seeked and out.last is not None and times[out.next] - out.position > config.seek_gap_seconds
        ):
          jump = True
          break
      if not jump:
        break
  except (av.FFmpegError, ValueError, MemoryError):  # corrupt packets or broken streams
    problems.append(VIDEO_DECODE_ERROR)
  codec.skip_frame = "DEFAULT"
  if out.finish():
    problems.append(VIDEO_ENDS_EARLY)
  return out.chosen


# ----------------------------------------------------------------------------------------- audio


def _decode_audio(container, stream, config: ClipReadConfig, problems: list) -> np.ndarray:
  """First max_audio_seconds of `stream` as (N,) int16 mono at config.sample_rate."""
  limit = int(round(config.max_audio_seconds * config.sample_rate))
  resampler = av.AudioResampler(format="s16", layout="mono", rate=config.sample_rate)
  chunks, total = [], 0
  try:
    for packet in container.demux(stream):
      for frame in packet.decode():
        for resampled in resampler.resample(frame):
          chunks.append(resampled.to_ndarray().reshape(-1))
          total += chunks[-1].size
      if total >= limit:
        break
    else:
      for resampled in resampler.resample(None):
        chunks.append(resampled.to_ndarray().reshape(-1))
  except (av.FFmpegError, ValueError, MemoryError):
    problems.append(AUDIO_DECODE_ERROR)
  if not chunks:
    return np.zeros((0,), np.int16)
  return np.ascontiguousarray(np.concatenate(chunks)[:limit], dtype=np.int16)


# ----------------------------------------------------------------------------------------- clip


def _duration(container, video, audio) -> float | None:
  """Clip length in seconds from stream or container headers (None when unknown)."""
  for stream in (video, audio):
    if stream is not None and stream.duration and stream.duration > 0:
      return float(stream.duration * stream.time_base)
  if container.duration and container.duration > 0:
    return container.duration / av.time_base
  return None


def _scan_duration(container, stream) -> float | None:
  """Duration from the last packet time, demuxing without decoding (headers did not say)."""
  tb, end = float(stream.time_base), None
  for packet in container.demux(stream):
    if packet.pts is not None:
      stop = (packet.pts + (packet.duration or 0)) * tb
      end = stop if end is None else max(end, stop)
  if end is None:
    return None
  return end - (stream.start_time or 0) * tb


def _rewind(container):
  """Demuxer back to the start of the file (and decoders flushed)."""
  container.seek(0, backward=True, any_frame=False)


def _open_problem(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(12)
  return CORRUPT_MP4 if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") else UNREADABLE_FILE


def _open(path: str):
  return av.open(path, mode="r", metadata_errors="ignore")


def read_clip(path: str, config: ClipReadConfig = ClipReadConfig()) -> ClipData:
  """Read `path` into a ClipData; never raises on bad media (reasons go to `problems`).

  Raises face_crop.FaceDetectorUnavailable only when config.face_crop is set and OpenCV has no Haar
  cascade (an environment problem, said before any clip is read).
  """
  if config.face_crop:
    face_crop_lib.face_detector()
  try:
    return _read_clip(str(path), config)
  except face_crop_lib.FaceDetectorUnavailable:
    raise
  except Exception as err:  # a reader bug must not stop a 10,000-clip preparation: report it
    return empty_clip(config, [f"reader_error:{type(err).__name__}"])


def _read_clip(path: str, config: ClipReadConfig) -> ClipData:
  if not os.path.isfile(path):
    return empty_clip(config, [MISSING_FILE])
  if os.path.getsize(path) == 0:
    return empty_clip(config, [EMPTY_FILE])
  try:
    container = _open(path)
  except (av.FFmpegError, ValueError, UnicodeDecodeError, OSError):
    return empty_clip(config, [_open_problem(path)])
  with container:
    problems: list[str] = []
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    if video is None:
      problems.append(NO_VIDEO_STREAM)
    if audio is None:
      problems.append(NO_AUDIO_STREAM)
    if video is None and audio is None:
      if not container.streams and not (container.duration and container.duration > 0):
        return empty_clip(config, [ZERO_DURATION])  # e.g. cut with start == end
      return empty_clip(config, problems)
    duration = _duration(container, video, audio)
    if duration is None:  # headers do not say: read packet times with a second demuxer
      try:
        with _open(path) as probe:
          stream = probe.streams.video[0] if video is not None else probe.streams.audio[0]
          duration = _scan_duration(probe, stream)
      except (av.FFmpegError, ValueError, OSError):
        duration = None
    if not duration or duration <= 0:
      return empty_clip(config, problems + [ZERO_DURATION])
    if duration > config.max_clip_seconds:
      return empty_clip(config, problems + [TOO_LONG], duration)

    clip = empty_clip(config, problems, duration)
    audio_seconds = _duration(container, None, audio) if audio is not None else None
    if video is not None:
      greys = _decode_video(container, video, clip.frame_times, config, problems)
      if any(g is not None for g in greys):
        clip.frames, clip.face_found = face_crop_lib.crop_frames(greys, clip.frame_times, config)
        clip.has_video = True
      elif VIDEO_DECODE_ERROR not in problems:
        problems.append(NO_VIDEO_FRAMES)
    if audio is not None:
      try:  # the same demuxer, back at the start: opening a file costs ~5 ms
        if video is not None:
          _rewind(container)
        clip.audio = _decode_audio(container, audio, config, problems)
      except (av.FFmpegError, ValueError):
        try:  # could not rewind: a fresh demuxer
          with _open(path) as again:
            clip.audio = _decode_audio(again, again.streams.audio[0], config, problems)
        except (av.FFmpegError, ValueError, OSError, IndexError):
          problems.append(AUDIO_DECODE_ERROR)
  if audio is not None:
    clip.has_audio = clip.audio.size > 0
    if not clip.has_audio and AUDIO_DECODE_ERROR not in problems:
      problems.append(NO_AUDIO_SAMPLES)
    expected = min(config.max_audio_seconds, audio_seconds or duration)
    if clip.has_audio and clip.audio.size < (expected - 0.5) * config.sample_rate:
      problems.append(AUDIO_ENDS_EARLY)
  clip.problems = problems
  return clip


# ----------------------------------------------------------------------------------------- many


def _init_worker():
  cv2.setNumThreads(1)  # the pool already uses every core; OpenCV threads would only contend


def read_clips(paths, config: ClipReadConfig = ClipReadConfig(), workers: int | None = None):
  """Yield read_clip(path, config) for each path, in order, over `workers` processes.

  workers None -> os.cpu_count(); 1 -> in this process. Workers are spawned (not forked: the caller
  may hold TensorFlow's threads) and decode with FFmpeg threads off, since the pool fills the cores.
  """
  paths = [str(p) for p in paths]
  workers = min(workers or os.cpu_count() or 1, max(1, len(paths)))
  if config.face_crop:
    face_crop_lib.face_detector()  # fail here, with the fix in the message, not inside every worker
  if workers <= 1:
    for path in paths:
      yield read_clip(path, config)
    return
  yield from _read_in_pool(paths, dataclasses.replace(config, thread_type="NONE"), workers)


def _pool_results(paths, config, workers):
  """read_clip over a spawned pool, in order, <= 4 clips per worker in flight (bounded memory).

  Raises BrokenProcessPool when a worker dies (multiprocessing.Pool would wait for it forever).
  """
  import collections
  import multiprocessing
  from concurrent.futures import ProcessPoolExecutor

  context = multiprocessing.get_context("spawn")
  with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as executor:
    pending, submitted = collections.deque(), 0
    for _ in range(len(paths)):
      while submitted < len(paths) and len(pending) < 4 * workers:
        pending.append(executor.submit(read_clip, paths[submitted], config))
        submitted += 1
      yield pending.popleft().result()


def _read_in_pool(paths, config, workers):
  """In-order clips from worker processes that survive a worker's death.

  When the pool breaks, the first unread clip is retried alone: if it kills its worker again it
  is marked READER_CRASHED (a decoder crash on that file) and the rest goes on in a new pool. If
  no worker ever returned a clip (they cannot start, e.g. a __main__ they cannot import), the
  clips are read in this process instead.
  """
  from concurrent.futures.process import BrokenProcessPool

  done, started = 0, False
  while done < len(paths):
    try:
      for clip in _pool_results(paths[done:], config, workers):
        started = True
        done += 1
        yield clip
      return
    except BrokenProcessPool:
      pass
    try:
      clip = list(_pool_results(paths[done : done + 1], config, 1))[0]
      started = True
    except BrokenProcessPool:
      if not started:
        warnings.warn(
          "Clip-reading worker processes could not start; reading clips in "
          "this process (slower). Run from a script or `python -m`."
        )
        for path in paths[done:]:
          yield read_clip(path, config)
        return
      clip = empty_clip(config, [READER_CRASHED])
    done += 1
    yield clip
