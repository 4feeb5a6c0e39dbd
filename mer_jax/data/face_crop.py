"""Face crops of a clip's grey frames: OpenCV's Haar cascade on a few probe frames, boxes in between.

Split from the clip reader (mer_jax/data/clip_reader.py, which calls `crop_frames` on the frames it decoded) so
the detector, its probing and the crop geometry read on their own. Without a face, or with
`ClipReadConfig(face_crop=False)`, a frame gets a centre crop. The cascade is loaded once per process.
"""

from __future__ import annotations

import os
from typing import Protocol

import cv2
import numpy as np

HAAR_CASCADE_FILE = "haarcascade_frontalface_default.xml"


class FaceCropSettings(Protocol):
  """The fields of `clip_reader.ClipReadConfig` that cropping reads (named here, not imported: the clip
  reader imports this module, and dependencies point one way)."""

  frame_size: int
  face_crop: bool
  detect_height: int
  face_probes: int
  face_reuse_seconds: float
  face_margin: float


class FaceDetectorUnavailable(RuntimeError):
  pass


_CASCADE = None


def face_detector():
  """OpenCV's bundled frontal-face Haar cascade, loaded once per process."""
  global _CASCADE
  if _CASCADE is None:
    path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), HAAR_CASCADE_FILE)
    if not hasattr(cv2, "CascadeClassifier") or not os.path.exists(path):
      raise FaceDetectorUnavailable(
        f"OpenCV {cv2.__version__} has no Haar cascade (cv2.CascadeClassifier and "
        f"cv2.data.haarcascades/{HAAR_CASCADE_FILE}); OpenCV 5 moved them out of the wheel. "
        "Install opencv-python-headless==4.14.0.94 (see requirements.txt), or read clips with "
        "ClipReadConfig(face_crop=False) for centre crops."
      )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
      raise FaceDetectorUnavailable(f"Could not load the Haar cascade {path}; reinstall opencv.")
    _CASCADE = cascade
  return _CASCADE


def face_detector_available() -> bool:
  try:
    face_detector()
    return True
  except FaceDetectorUnavailable:
    return False


def _largest_face(grey: np.ndarray, config: FaceCropSettings):
  """(cx, cy, side) of the largest face in `grey` (work-size pixels), or None."""
  scale = min(1.0, config.detect_height / grey.shape[0])
  small = grey
  if scale < 1.0:
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
  # scaleFactor 1.1: coarser steps (1.2, 1.3) missed half the faces in our measurements.
  boxes = face_detector().detectMultiScale(small, scaleFactor=1.1, minNeighbors=3, minSize=(24, 24))
  if len(boxes) == 0:
    return None
  x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
  return np.array([(x + w / 2) / scale, (y + h / 2) / scale, max(w, h) / scale])


def _square_crop(grey: np.ndarray, cx: float, cy: float, side: float, out: int) -> np.ndarray:
  """Square of `side` centred at (cx, cy), shifted to stay inside the image, resized to out x out."""
  h, w = grey.shape
  side = max(1, int(round(min(side, h, w))))
  x0 = int(round(min(max(cx - side / 2, 0), w - side)))
  y0 = int(round(min(max(cy - side / 2, 0), h - side)))
  crop = grey[y0 : y0 + side, x0 : x0 + side]
  interp = cv2.INTER_AREA if side >= out else cv2.INTER_LINEAR
  return cv2.resize(crop, (out, out), interpolation=interp)


def _same_face(a, b) -> bool:
  """Both None, or boxes whose centres and sizes differ by under a third of the face size."""
  if a is None or b is None:
    return a is None and b is None
  side = max(a[2], b[2])
  return np.hypot(a[0] - b[0], a[1] - b[1]) < side / 3 and abs(a[2] - b[2]) < side / 3


def face_boxes(greys: list[np.ndarray], times: np.ndarray, config: FaceCropSettings) -> list:
  """One (cx, cy, side) box or None per frame, from Haar detections on at most
  config.face_probes frames (all of them when face_probes >= T).

  Probes the first and last frame, then bisects (breadth first) only the intervals whose ends
  disagree: a steady shot (most utterances) costs two detections. A probe with no face borrows the
  nearest probe's box within config.face_reuse_seconds (the cascade misses a turned or blurred
  face now and then; the crop should not flicker). Frames between two probes with boxes get their
  linear interpolation; others take the nearest probe's box.
  """
  t = len(greys)
  if config.face_probes >= t:  # every frame
    found = {i: _largest_face(greys[i], config) for i in range(t)}
  else:
    found = {i: _largest_face(greys[i], config) for i in sorted({0, t - 1})}
  queue = [(0, t - 1)]
  while queue and len(found) < config.face_probes:
    lo, hi = queue.pop(0)
    if hi - lo < 2 or _same_face(found[lo], found[hi]):
      continue
    mid = (lo + hi) // 2
    found[mid] = _largest_face(greys[mid], config)
    queue += [(lo, mid), (mid, hi)]
  probes = sorted(found)
  hits = [i for i in probes if found[i] is not None]
  box = {}
  for i in probes:
    near = min(hits, key=lambda j: abs(times[j] - times[i]), default=None)
    ok = near is not None and abs(times[near] - times[i]) <= config.face_reuse_seconds
    box[i] = found[near] if ok else None
  out = []
  for i in range(t):
    before = max(j for j in probes if j <= i)
    after = min(j for j in probes if j >= i)
    if before != after and box[before] is not None and box[after] is not None:
      w = (i - before) / (after - before)
      out.append((1 - w) * box[before] + w * box[after])
    else:
      out.append(box[before if i - before <= after - i else after])
  return out


def crop_frames(greys: list[np.ndarray], times: np.ndarray, config: FaceCropSettings):
  """Work-size grey frames -> ((T, S, S, 1) uint8 crops, (T,) bool face_found)."""
  t, s = len(greys), config.frame_size
  boxes = face_boxes(greys, times, config) if config.face_crop else [None] * t
  frames = np.zeros((t, s, s, 1), np.uint8)
  for i, grey in enumerate(greys):
    h, w = grey.shape
    if boxes[i] is None:
      cx, cy, side = w / 2, h / 2, min(h, w)
    else:
      cx, cy, side = boxes[i][0], boxes[i][1], boxes[i][2] * config.face_margin
    frames[i, :, :, 0] = _square_crop(grey, cx, cy, side, s)
  return frames, np.array([b is not None for b in boxes], bool)
