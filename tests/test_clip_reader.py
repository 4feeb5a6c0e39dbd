"""mer_jax.data.clip_reader on clips written here with PyAV: right frames at the right times, face vs centre
crop, audio length and rate, and one reason per kind of bad file."""

import dataclasses
import os
import time

import av
import numpy as np
import pytest

from benchmarks.data_throughput import write_clip
from mer_jax.data import clip_reader as cr
from mer_jax.data import face_crop

needs_haar = pytest.mark.skipif(
  not face_crop.face_detector_available(),
  reason="OpenCV without the Haar cascade (opencv 5 dropped it): pin opencv-python-headless 4.x",
)

FAST = cr.ClipReadConfig(num_frames=6, frame_size=48, face_crop=False)


def write_numbered_clip(path, seconds, fps, gop, width=96, height=64):
  """Flat grey frames whose level encodes the frame index (level = 20 + 7 * (i % 30)); no audio."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.options = {"preset": "veryfast", "crf": "10", "bf": "3"}  # B-frames: NONREF skipping
    for i in range(int(seconds * fps)):
      grey = np.full((height, width, 3), 20 + 7 * (i % 30), np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(grey, format="bgr24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  return {
    "face": write_clip(d / "face.mp4", seconds=2.0, width=320, height=240, fps=10),
    "noise": write_clip(d / "noise.mp4", seconds=2.0, width=320, height=240, fps=10, content="noise"),
    "numbered": write_numbered_clip(d / "numbered.mp4", seconds=8.0, fps=10, gop=10),
    "audio_only": write_clip(d / "audio_only.mp4", seconds=1.0, video=False),
    "video_only": write_clip(d / "video_only.mp4", seconds=1.0, width=96, height=64, audio=False),
    "zero": write_clip(d / "zero.mp4", seconds=0, width=96, height=64),
    "dir": str(d),
  }


def test_frame_times_are_uniform_and_frames_vary(clips):
  clip = cr.read_clip(clips["face"], FAST)
  assert clip.has_video and clip.has_audio and clip.problems == []
  assert clip.duration == pytest.approx(2.0, abs=0.05)
  np.testing.assert_allclose(clip.frame_times, (np.arange(6) + 0.5) * clip.duration / 6, rtol=1e-6)
  assert clip.frames.shape == (6, 48, 48, 1) and clip.frames.dtype == np.uint8
  assert clip.frame_times.dtype == np.float32 and clip.face_found.dtype == bool
  assert clip.frames.std() > 10  # a picture, not a flat field
  assert np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean() > 1  # the face moves


def test_each_frame_is_the_one_on_screen_at_its_time_with_seeking(clips):
  """8 s, keyframe every 1 s, B-frames: targets 2 s apart force seeks; levels name the frames."""
  for config in (
    cr.ClipReadConfig(num_frames=4, frame_size=32, face_crop=False),
    cr.ClipReadConfig(num_frames=12, frame_size=32, face_crop=False),
    cr.ClipReadConfig(num_frames=4, frame_size=32, face_crop=False, seek_gap_seconds=100.0, thread_type="NONE"),
  ):
    clip = cr.read_clip(clips["numbered"], config)
    assert clip.has_video and not clip.has_audio and clip.problems == ["no_audio_stream"]
    shown = np.floor(clip.frame_times * 10 + 1e-6).astype(int)  # frame index on screen at t_i
    np.testing.assert_allclose(clip.frames.mean(axis=(1, 2, 3)), 20 + 7 * (shown % 30), atol=2.5)


def test_seeking_decodes_only_part_of_a_clip(clips, monkeypatch):
  decoded = []
  original = cr._TargetFrames.add
  monkeypatch.setattr(cr._TargetFrames, "add", lambda self, frame, t: (decoded.append(t), original(self, frame, t))[1])
  cr.read_clip(clips["numbered"], cr.ClipReadConfig(num_frames=4, frame_size=32, face_crop=False, thread_type="NONE"))
  assert 4 <= len(decoded) < 40, len(decoded)  # 80 frames in the clip


@needs_haar
def test_face_crop_vs_centre_crop(clips):
  face = cr.read_clip(clips["face"], cr.ClipReadConfig(num_frames=6, frame_size=48))
  centre = cr.read_clip(clips["face"], FAST)
  noise = cr.read_clip(clips["noise"], cr.ClipReadConfig(num_frames=6, frame_size=48))
  assert face.face_found.all()
  assert not centre.face_found.any()
  assert not noise.face_found.any()  # no face in moving noise: centre crop, recorded as such
  assert np.abs(face.frames.astype(int) - centre.frames).mean() > 10  # a different crop


def test_audio_is_16k_mono_int16_with_the_tone(clips):
  clip = cr.read_clip(clips["face"], FAST)
  assert clip.audio.dtype == np.int16 and clip.audio.ndim == 1
  assert abs(clip.audio.size - 32000) <= 1100  # 2 s at 16 kHz (+ AAC priming / padding)
  spectrum = np.abs(np.fft.rfft(clip.audio.astype(np.float32)))
  assert np.fft.rfftfreq(clip.audio.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(220, abs=3)
  short = cr.read_clip(
    clips["face"], cr.ClipReadConfig(num_frames=6, frame_size=48, face_crop=False, max_audio_seconds=0.5)
  )
  assert short.audio.size == 8000
  np.testing.assert_array_equal(short.audio, clip.audio[:8000])


def _truncated(src, dst, fraction):
  data = open(src, "rb").read()
  open(dst, "wb").write(data[: int(len(data) * fraction)])
  return dst


def test_each_bad_file_gives_its_reason(clips):
  d = clips["dir"]
  open(os.path.join(d, "empty.mp4"), "wb").close()
  open(os.path.join(d, "random.mp4"), "wb").write(np.random.default_rng(0).bytes(20000))
  open(os.path.join(d, "text.mp4"), "w").write("not a video\n")
  cases = {
    os.path.join(d, "missing.mp4"): ["missing_file"],
    d: ["missing_file"],  # a folder is not a clip
    os.path.join(d, "empty.mp4"): ["empty_file"],
    os.path.join(d, "random.mp4"): ["unreadable_file"],
    os.path.join(d, "text.mp4"): ["unreadable_file"],
    _truncated(clips["face"], os.path.join(d, "cut.mp4"), 0.5): ["corrupt_mp4"],  # no moov atom
    clips["zero"]: ["zero_duration"],
  }
  for path, reasons in cases.items():
    clip = cr.read_clip(path, FAST)
    assert clip.problems == reasons, path
    assert not clip.has_video and not clip.has_audio
    assert clip.frames.shape == (6, 48, 48, 1) and not clip.frames.any()
    assert clip.audio.shape == (0,)
  audio_only = cr.read_clip(clips["audio_only"], FAST)
  assert audio_only.problems == ["no_video_stream"]
  assert audio_only.has_audio and not audio_only.has_video and not audio_only.frames.any()
  video_only = cr.read_clip(clips["video_only"], FAST)
  assert video_only.problems == ["no_audio_stream"]
  assert video_only.has_video and not video_only.has_audio and video_only.audio.size == 0


def test_too_long_is_not_decoded(clips):
  start = time.perf_counter()
  clip = cr.read_clip(
    clips["numbered"], cr.ClipReadConfig(num_frames=4, frame_size=32, face_crop=False, max_clip_seconds=5.0)
  )
  assert time.perf_counter() - start < 1.0
  assert clip.problems == ["no_audio_stream", "too_long"]
  assert not clip.has_video and clip.duration == pytest.approx(8.0, abs=0.1)


def test_faststart_file_cut_in_its_data_is_marked(clips, tmp_path):
  """moov first, mdat cut: the header promises 2 s, the frames stop early -> marked, not silent."""
  src = str(tmp_path / "fast.mp4")
  with av.open(clips["face"]) as inp, av.open(src, "w", options={"movflags": "faststart"}) as out:
    streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
    for packet in inp.demux():
      if packet.dts is not None:
        packet.stream = streams[packet.stream.index]
        out.mux(packet)
  clip = cr.read_clip(_truncated(src, str(tmp_path / "fast_cut.mp4"), 0.4), FAST)
  assert clip.has_video
  assert "video_ends_early" in clip.problems or "video_decode_error" in clip.problems
  assert "audio_ends_early" in clip.problems or "audio_decode_error" in clip.problems


def test_read_clips_in_a_pool_matches_serial_reads(clips):
  paths = [clips["face"], clips["noise"], os.path.join(clips["dir"], "nope.mp4"), clips["face"]]
  serial = list(cr.read_clips(paths, FAST, workers=1))
  pooled = list(cr.read_clips(paths, FAST, workers=2))
  assert [c.problems for c in pooled] == [[], [], ["missing_file"], []]
  for a, b in zip(serial, pooled):
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)


def test_missing_haar_cascade_says_what_to_install(monkeypatch):
  monkeypatch.setattr(face_crop, "_CASCADE", None)
  monkeypatch.setattr(face_crop, "HAAR_CASCADE_FILE", "no_such_cascade.xml")
  with pytest.raises(face_crop.FaceDetectorUnavailable, match="opencv-python-headless"):
    cr.read_clip("whatever.mp4", cr.ClipReadConfig())
  assert cr.read_clip("whatever.mp4", FAST).problems == ["missing_file"]  # no face crop: fine


def test_pool_survives_a_worker_that_dies(monkeypatch):
  """A file that kills its worker twice is marked reader_crashed; the others are read."""
  from concurrent.futures.process import BrokenProcessPool

  def fake_pool(paths, config, workers):
    for path in paths:
      if path == "crash.mp4":
        raise BrokenProcessPool("worker died")
      yield cr.empty_clip(config, [f"read:{path}"])

  monkeypatch.setattr(cr, "_pool_results", fake_pool)
  clips = list(cr._read_in_pool(["a.mp4", "crash.mp4", "b.mp4"], FAST, 2))
  assert [c.problems for c in clips] == [["read:a.mp4"], ["reader_crashed"], ["read:b.mp4"]]


def test_pool_that_cannot_start_falls_back_to_this_process(monkeypatch):
  from concurrent.futures.process import BrokenProcessPool

  def dead_pool(paths, config, workers):
    raise BrokenProcessPool("cannot start")
    yield

  monkeypatch.setattr(cr, "_pool_results", dead_pool)
  with pytest.warns(UserWarning, match="could not start"):
    clips = list(cr._read_in_pool(["x.mp4", "y.mp4"], FAST, 2))
  assert [c.problems for c in clips] == [["missing_file"], ["missing_file"]]


def test_nearest_frames_mode_is_within_two_frames_and_cheaper(clips, monkeypatch):
  decoded = []
  original = cr._TargetFrames.add
  monkeypatch.setattr(cr._TargetFrames, "add", lambda self, frame, t: (decoded.append(t), original(self, frame, t))[1])
  exact = cr.ClipReadConfig(num_frames=12, frame_size=32, face_crop=False, thread_type="NONE")
  cr.read_clip(clips["numbered"], exact)
  exact_count, decoded[:] = len(decoded), []
  clip = cr.read_clip(clips["numbered"], dataclasses.replace(exact, exact_frames=False))
  assert len(decoded) < exact_count
  shown = np.floor(clip.frame_times * 10 + 1e-6).astype(int) % 30
  got = np.round((clip.frames.mean(axis=(1, 2, 3)) - 20) / 7).astype(int)
  off = (got - shown + 15) % 30 - 15  # frame levels wrap every 30 frames
  assert np.abs(off).max() <= 2, off
