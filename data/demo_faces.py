"""Frame drawing for the demo corpus: cartoon faces with one expression per emotion, plus a cue shape.

Everything that matters is drawn inside the centre square of the frame (the clip reader centre-crops
to a square and may shrink it to 64x64), big and bold: the face fills most of the square and the cue
shape sits in its top-right corner. Coordinates below are in units of the centre square's side.

The face is centred and about 0.8 of the square tall on purpose: OpenCV's Haar cascade does detect
these cartoon faces (on ~80% of frames, box ~0.85 of the square), and the reader's face crop
(1.4 x box, clamped to the frame) then stays the centre square, so the corner cue is never cut off.

Frames are grey `(H, W) uint8`; the muxer turns them into yuv420p with flat chroma.
"""

from dataclasses import dataclass

import cv2
import numpy as np

CUE_SHAPES = ("circle", "square", "triangle", "cross")

_SHIFT = 4  # cv2 fixed-point sub-pixel bits: coordinates are multiplied by 2**_SHIFT
_ONE = 1 << _SHIFT

# Expression table, in face units: x in face half-widths from the face centre, y in face
# half-heights. Each emotion differs from every other one in at least two of eyes/brows/mouth, so
# a small CNN separates them quickly even at 64x64.
#   eyes:  (kind, radius) with kind dot | ring (wide open, white sclera + pupil) | narrow | happy
#          (upward arc) | squint (one eye a slit, the other narrow)
#   brows: (inner_dy, outer_dy) per side, negative = raised; `brow_y` the mean height
#   mouth: line | smile | frown | round | stretched | tight | wavy
EXPRESSIONS = {
  "neutral": dict(eyes=("dot", 0.11), brows=((0.0, 0.0), (0.0, 0.0)), brow_y=-0.50, mouth="line"),
  "joy": dict(eyes=("happy", 0.14), brows=((-0.04, -0.04), (-0.04, -0.04)), brow_y=-0.52, mouth="smile"),
  "sadness": dict(eyes=("dot", 0.09), brows=((-0.16, 0.06), (-0.16, 0.06)), brow_y=-0.48, mouth="frown"),
  "surprise": dict(eyes=("ring", 0.17), brows=((-0.16, -0.16), (-0.16, -0.16)), brow_y=-0.60, mouth="round"),
  "fear": dict(eyes=("ring", 0.16), brows=((-0.20, -0.02), (-0.20, -0.02)), brow_y=-0.56, mouth="stretched"),
  "disgust": dict(eyes=("squint", 0.12), brows=((0.12, -0.02), (-0.08, -0.08)), brow_y=-0.46, mouth="wavy"),
  "anger": dict(eyes=("narrow", 0.12), brows=((0.16, -0.08), (0.16, -0.08)), brow_y=-0.44, mouth="tight"),
}


@dataclass(frozen=True)
class FaceStyle:
  """Per-clip look: the same person in every frame of a clip, only the expression/cue change."""

  width: int
  height: int
  face_x: float  # face centre, centre-square units
  face_y: float
  face_a: float  # face half-width, centre-square units
  face_b: float  # face half-height
  cue_x: float  # cue centre, centre-square units
  cue_y: float
  cue_r: float  # cue half-size
  bg_tone: int
  face_tone: int
  ink_tone: int  # eyes, brows, mouth
  cue_tone: int
  thickness: float  # feature line thickness, centre-square units
  texture_seed: int  # static per-clip pixel noise (static, so H.264 keeps files small)


def sample_style(rng: np.random.Generator, resolution: tuple[int, int]) -> FaceStyle:
  """Draws one clip's jitter of position, scale and brightness; `resolution` is (W, H)."""
  width, height = resolution
  scale = rng.uniform(0.95, 1.05)
  return FaceStyle(
    width=width,
    height=height,
    face_x=0.50 + rng.uniform(-0.02, 0.02),
    face_y=0.57 + rng.uniform(-0.02, 0.02),
    face_a=0.30 * scale,
    face_b=0.40 * scale,
    cue_x=0.84 + rng.uniform(-0.01, 0.01),
    cue_y=0.15 + rng.uniform(-0.01, 0.01),
    cue_r=rng.uniform(0.10, 0.11),
    bg_tone=int(rng.integers(25, 80)),
    face_tone=int(rng.integers(150, 205)),
    ink_tone=int(rng.integers(0, 40)),
    cue_tone=int(rng.integers(225, 256)),
    thickness=rng.uniform(0.045, 0.06),
    texture_seed=int(rng.integers(2**31)),
  )


class _Canvas:
  """Maps centre-square units to fixed-point pixel coordinates of the full frame."""

  def __init__(self, style: FaceStyle):
    self.side = min(style.width, style.height)
    self.ox = (style.width - self.side) / 2.0
    self.oy = (style.height - self.side) / 2.0
    self.img = np.full((style.height, style.width), style.bg_tone, np.uint8)

  def pt(self, x: float, y: float) -> tuple[int, int]:
    return (int(round((self.ox + x * self.side) * _ONE)), int(round((self.oy + y * self.side) * _ONE)))

  def px(self, length: float) -> int:
    """A length in centre-square units as fixed-point pixels."""
    return max(1, int(round(length * self.side * _ONE)))

  def width(self, length: float) -> int:
    """A line thickness (cv2 takes it in whole pixels, not fixed point)."""
    return max(1, int(round(length * self.side)))


def _draw_cue(c: _Canvas, s: FaceStyle, cue: str) -> None:
  x, y, r, tone = s.cue_x, s.cue_y, s.cue_r, s.cue_tone
  aa = cv2.LINE_AA
  if cue == "circle":  # a thick ring: hollow centre, unlike the solid square and triangle
    cv2.circle(c.img, c.pt(x, y), c.px(r * 0.8), tone, c.width(r * 0.4), aa, _SHIFT)
  elif cue == "square":
    pts = np.array(
      [
        c.pt(x - r * 0.85, y - r * 0.85),
        c.pt(x + r * 0.85, y - r * 0.85),
        c.pt(x + r * 0.85, y + r * 0.85),
        c.pt(x - r * 0.85, y + r * 0.85),
      ]
    )
    cv2.fillPoly(c.img, [pts], tone, aa, _SHIFT)
  elif cue == "triangle":
    pts = np.array([c.pt(x, y - r), c.pt(x + r, y + r * 0.8), c.pt(x - r, y + r * 0.8)])
    cv2.fillPoly(c.img, [pts], tone, aa, _SHIFT)
  elif cue == "cross":  # a diagonal X: mass in the corners, none in the middle of the edges
    w = c.width(r * 0.42)
    cv2.line(c.img, c.pt(x - r, y - r), c.pt(x + r, y + r), tone, w, aa, _SHIFT)
    cv2.line(c.img, c.pt(x - r, y + r), c.pt(x + r, y - r), tone, w, aa, _SHIFT)
  else:
    raise ValueError(f"Unknown cue shape {cue!r}; expected one of {CUE_SHAPES}.")


def _draw_eye(c: _Canvas, s: FaceStyle, x: float, y: float, kind: str, r: float, side: int) -> None:
  ink, aa, t = s.ink_tone, cv2.LINE_AA, c.width(s.thickness)
  if kind == "dot":
    cv2.circle(c.img, c.pt(x, y), c.px(r), ink, -1, aa, _SHIFT)
  elif kind == "ring":  # wide-open eye: white sclera, dark rim and pupil
    cv2.circle(c.img, c.pt(x, y), c.px(r), 255, -1, aa, _SHIFT)
    cv2.circle(c.img, c.pt(x, y), c.px(r), ink, t, aa, _SHIFT)
    cv2.circle(c.img, c.pt(x, y), c.px(r * 0.4), ink, -1, aa, _SHIFT)
  elif kind == "narrow":
    cv2.ellipse(c.img, c.pt(x, y), (c.px(r), c.px(r * 0.45)), 0, 0, 360, ink, -1, aa, _SHIFT)
  elif kind == "happy":  # upward arc, like a closed laughing eye
    cv2.ellipse(c.img, c.pt(x, y + r * 0.5), (c.px(r), c.px(r * 0.8)), 0, 180, 360, ink, t, aa, _SHIFT)
  elif kind == "squint":  # left eye a slit, right eye narrow: asymmetric
    if side < 0:
      cv2.line(c.img, c.pt(x - r, y), c.pt(x + r, y + r * 0.2), ink, t, aa, _SHIFT)
    else:
      cv2.ellipse(c.img, c.pt(x, y), (c.px(r), c.px(r * 0.5)), 0, 0, 360, ink, -1, aa, _SHIFT)
  else:
    raise ValueError(f"Unknown eye kind {kind!r}.")


def _draw_mouth(c: _Canvas, s: FaceStyle, kind: str) -> None:
  fx, fy, a, b = s.face_x, s.face_y, s.face_a, s.face_b
  ink, aa = s.ink_tone, cv2.LINE_AA
  t = c.width(s.thickness)
  my = fy + 0.48 * b
  if kind == "line":
    cv2.line(c.img, c.pt(fx - 0.32 * a, my), c.pt(fx + 0.32 * a, my), ink, t, aa, _SHIFT)
  elif kind == "smile":  # open smile: filled lower half-ellipse
    cv2.ellipse(c.img, c.pt(fx, my - 0.10 * b), (c.px(0.46 * a), c.px(0.26 * b)), 0, 0, 180, ink, -1, aa, _SHIFT)
  elif kind == "frown":
    cv2.ellipse(
      c.img,
      c.pt(fx, my + 0.14 * b),
      (c.px(0.36 * a), c.px(0.18 * b)),
      0,
      180,
      360,
      ink,
      c.width(s.thickness * 1.2),
      aa,
      _SHIFT,
    )
  elif kind == "round":  # open "O"
    cv2.ellipse(c.img, c.pt(fx, my), (c.px(0.15 * a), c.px(0.20 * b)), 0, 0, 360, ink, -1, aa, _SHIFT)
  elif kind == "stretched":  # wide, flat, open grimace with teeth lines
    cv2.ellipse(c.img, c.pt(fx, my), (c.px(0.50 * a), c.px(0.12 * b)), 0, 0, 360, ink, -1, aa, _SHIFT)
    for dx in (-0.25, 0.0, 0.25):
      cv2.line(
        c.img, c.pt(fx + dx * a, my - 0.1 * b), c.pt(fx + dx * a, my + 0.1 * b), s.face_tone, max(1, t // 2), aa, _SHIFT
      )
  elif kind == "tight":  # short, pressed, corners down
    pts = np.array(
      [
        c.pt(fx - 0.20 * a, my + 0.05 * b),
        c.pt(fx - 0.12 * a, my),
        c.pt(fx + 0.12 * a, my),
        c.pt(fx + 0.20 * a, my + 0.05 * b),
      ]
    )
    cv2.polylines(c.img, [pts], False, ink, c.width(s.thickness * 1.5), aa, _SHIFT)
  elif kind == "wavy":  # asymmetric wavy line, raised on the right
    xs = np.linspace(-0.36, 0.36, 13)
    ys = 0.06 * np.sin(xs * 3 * np.pi / 0.36) - 0.22 * xs
    pts = np.array([c.pt(fx + u * a, my + v * b) for u, v in zip(xs, ys)])
    cv2.polylines(c.img, [pts], False, ink, t, aa, _SHIFT)
  else:
    raise ValueError(f"Unknown mouth kind {kind!r}.")


def draw_frame(style: FaceStyle, emotion: str, cue: str) -> np.ndarray:
  """One frame: `emotion`'s face and the `cue` shape. Returns `(H, W) uint8`."""
  if emotion not in EXPRESSIONS:
    raise ValueError(f"Unknown emotion {emotion!r}; expected one of {tuple(EXPRESSIONS)}.")
  expr = EXPRESSIONS[emotion]
  c = _Canvas(style)
  s = style
  cv2.ellipse(
    c.img, c.pt(s.face_x, s.face_y), (c.px(s.face_a), c.px(s.face_b)), 0, 0, 360, s.face_tone, -1, cv2.LINE_AA, _SHIFT
  )
  eye_kind, eye_r = expr["eyes"]
  for side, (inner_dy, outer_dy) in zip((-1, 1), expr["brows"]):
    ex, ey = s.face_x + side * 0.40 * s.face_a, s.face_y - 0.20 * s.face_b
    _draw_eye(c, s, ex, ey, eye_kind, eye_r * s.face_a, side)
    by = s.face_y + expr["brow_y"] * s.face_b
    inner = c.pt(s.face_x + side * 0.14 * s.face_a, by + inner_dy * s.face_b)
    outer = c.pt(s.face_x + side * 0.62 * s.face_a, by + outer_dy * s.face_b)
    cv2.line(c.img, inner, outer, s.ink_tone, c.width(s.thickness * 1.3), cv2.LINE_AA, _SHIFT)
  _draw_mouth(c, s, expr["mouth"])
  _draw_cue(c, s, cue)
  return _add_texture(c.img, s)


def _add_texture(img: np.ndarray, style: FaceStyle) -> np.ndarray:
  """Mild static pixel noise (same pattern in every frame of a clip)."""
  noise = np.random.default_rng(style.texture_seed).normal(0.0, 4.0, img.shape)
  return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def corrupt_frames(kind: str, num_frames: int, style: FaceStyle, rng: np.random.Generator) -> np.ndarray:
  """Frames that carry no content: `black` or heavy `noise`. Returns `(N, H, W) uint8`."""
  h, w = style.height, style.width
  if kind == "black":
    return np.zeros((num_frames, h, w), np.uint8)
  if kind == "noise":
    # Blocky 4x4 noise, new every frame: destroys the picture but keeps the encoder fast.
    small = rng.integers(0, 256, (num_frames, (h + 3) // 4, (w + 3) // 4), dtype=np.uint8)
    return np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)[:, :h, :w].copy()
  raise ValueError(f"Unknown video corruption {kind!r}; expected 'black' or 'noise'.")
