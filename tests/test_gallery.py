"""The HTML gallery of many predictions: one self-contained page that holds every clip, and that a real browser
(headless Chromium) renders with every frame decoded, from disk, with nothing fetched."""

import html.parser
import os
import subprocess

import numpy as np

from mer_jax import api
from mer_jax.tools import gallery

NUM_FRAMES, FRAME_SIZE = 4, 16
HOSTILE_TEXT = '<script>alert("x")</script> & "quotes"'


def _prediction(name: str, rng, *, has_video=True, error=None, text="Look at the circle.") -> api.Prediction:
  """A Prediction as api.Model makes one, with drawn numbers and frames (T, S, S) uint8."""
  emotion = rng.dirichlet(np.ones(3))
  names = ("joy", "neutral", "anger")
  times = tuple(round(0.25 + 0.5 * i, 3) for i in range(NUM_FRAMES))
  scores = tuple(round(float(s), 5) for s in rng.normal(size=NUM_FRAMES))
  return api.Prediction(
    id=name,
    clip=f"/clips/{name}.mp4",
    text=text,
    tasks={"emotion": api.TaskPrediction(names[int(np.argmax(emotion))], dict(zip(names, emotion.round(5).tolist())))},
    chosen_frames=tuple(api.ChosenFrame(i, times[i], scores[i]) for i in (0, 2)),
    frame_times=times,
    frame_scores=scores,
    reliability_video=0.8 if has_video else 0.0,
    reliability_audio=0.6,
    gate_mean=0.55,
    gate_quartiles=(0.4, 0.55, 0.7),
    has_video=has_video,
    has_audio=True,
    duration_seconds=2.0,
    problems=() if error is None else ("corrupt_mp4",),
    error=error,
    frames=rng.integers(0, 256, (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8) if has_video else None,
  )


def _write(path) -> list[api.Prediction]:
  """gallery.html at `path` from three predictions: a wrong one, a clip that could not be read, a hostile text."""
  rng = np.random.default_rng(0)
  predictions = [
    _prediction("dev/dia0_utt0", rng),
    _prediction("dev/dia0_utt1", rng, has_video=False, error="corrupt_mp4: damaged (predicted from audio only)"),
    _prediction("dev/dia1_utt0", rng, text=HOSTILE_TEXT),
  ]
  writer = gallery.GalleryWriter(str(path))
  for prediction in predictions:
    record = prediction.to_json()
    wrong = "anger" if record["label"]["emotion"] != "anger" else "joy"
    record["true_label"], record["correct"] = {"emotion": wrong}, {"emotion": False}
    writer.add(record, prediction.frames)
  writer.close({"model": "runs/demo", "runtime": "jax", "clips": 3, "errors": 1, "accuracy": {}})
  return predictions


class _Cards(html.parser.HTMLParser):
  """data-id of each clip <section> -> the data-URI <img> sources inside it; other sources anywhere."""

  def __init__(self):
    super().__init__()
    self.cards, self.current, self.other_sources = {}, None, []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "section" and "data-id" in attrs:
      self.current = self.cards.setdefault(attrs["data-id"], [])
    for name in ("src", "href"):
      value = attrs.get(name) or ""
      if value and not value.startswith("data:image/webp;base64,"):
        self.other_sources.append(value)
      elif value and self.current is not None:
        self.current.append(value)

  def handle_endtag(self, tag):
    if tag == "section":
      self.current = None


def test_the_page_holds_every_clip_and_fetches_nothing(tmp_path):
  path = tmp_path / "gallery.html"
  predictions = _write(path)
  page = path.read_text()
  cards = _Cards()
  cards.feed(page)
  assert list(cards.cards) == [p.id for p in predictions]
  assert [len(sources) for sources in cards.cards.values()] == [NUM_FRAMES, 0, NUM_FRAMES]
  assert cards.other_sources == [] and "http" not in page and "url(" not in page  # self-contained
  assert HOSTILE_TEXT not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
  assert page.count('<figure class="chosen">') == 2 * 2  # K = 2 outlined per clip with frames
  assert "corrupt_mp4: damaged (predicted from audio only)" in page and page.count("badge wrong") == 3
  assert not os.path.exists(str(path) + ".cards.tmp")  # the side file of the streamed cards is gone


# A script the test appends to a copy of the page: it writes into the DOM how many images the browser decoded.
COUNT_DECODED = (
  "<script>window.addEventListener('load', () => { const images = [...document.images];"
  "document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;"
  "document.body.dataset.images = images.length; });</script>"
)


def test_headless_chromium_renders_every_clip_with_its_frames(tmp_path, headless_browser):
  path = tmp_path / "gallery.html"
  predictions = _write(path)
  checked = tmp_path / "checked.html"
  checked.write_text(path.read_text().replace("</body>", COUNT_DECODED + "</body>"))
  command = [*headless_browser, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()]
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  dom = done.stdout
  cards = _Cards()
  cards.feed(dom)
  assert list(cards.cards) == [p.id for p in predictions]
  assert [len(sources) for sources in cards.cards.values()] == [NUM_FRAMES, 0, NUM_FRAMES]
  images = 2 * NUM_FRAMES
  assert f'data-decoded="{images}"' in dom and f'data-images="{images}"' in dom, dom[-500:]
  # The hostile transcript stayed text: no script of the page's own ran (the test's is the only one).
  assert dom.count("<script>") == 1

  screenshot = tmp_path / "gallery.png"
  command = [*headless_browser, "--window-size=1000,900", f"--screenshot={screenshot}", path.as_uri()]
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and screenshot.stat().st_size > 10_000, done.stderr[-2000:]
