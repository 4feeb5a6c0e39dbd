"""The HTML gallery of many predictions: one self-contained page that holds every clip, and that a real browser
(headless Chromium) renders with every frame decoded, from disk, with nothing fetched: a page of drawn predictions,
and the page `predict --folder` writes over clips the project did not make (tests/test_predict.py)."""

import dataclasses
import html.parser
import json
import os
import subprocess

import numpy as np
import pytest

from mer_jax.inference import api
from mer_jax.tools import gallery
from mer_jax.tools import predict
from tests.test_predict import foreign_prediction

NUM_FRAMES, FRAME_SIZE = 4, 16
HOSTILE_TEXT = '<script>alert("x")</script> & "quotes"'


def _prediction(name: str, rng, *, has_video=True, error=None, text="Look at the circle.") -> api.Prediction:
  """A Prediction as api.Model makes one, with drawn numbers and frames (T, S, S) uint8."""
  emotion = rng.dirichlet(np.ones(3))
  names = ("joy", "neutral", "anger")
  times = tuple(round(0.25 + 0.5 * i, 3) for i in range(NUM_FRAMES))
  scores = tuple(round(float(s), 5) for s in rng.normal(size=NUM_FRAMES))
  if not has_video:  # as api.Model: no frame chosen among blank ones
    times, scores = (), ()
  return api.Prediction(
    id=name,
    clip=f"/clips/{name}.mp4",
    text=text,
    tasks={"emotion": api.TaskPrediction(names[int(np.argmax(emotion))], dict(zip(names, emotion.round(5).tolist())))},
    chosen_frames=tuple(api.ChosenFrame(i, times[i], scores[i]) for i in (0, 2)) if has_video else (),
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
    # Blank frames without video, as return_frames gives them: the card must still show none.
    frames=rng.integers(0, 256, (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8) * has_video,
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


def test_links_and_names_survive_any_file_name(tmp_path):
  """An explanation link is percent-encoded ('#', '?', '%' in a stem); a name that is not UTF-8 (os.listdir's
  surrogate escapes) neither fails the page nor changes the link's bytes."""
  record = _prediction("x", np.random.default_rng(1)).to_json()
  card = gallery.clip_card(record, None, 0, os.path.join("explanations", "a#b?c%d e.png"))
  assert 'href="explanations/a%23b%3Fc%25d%20e.png"' in card
  undecodable = os.fsdecode(b"caf\xe9")  # Latin-1 bytes on a UTF-8 system: 'caf\udce9'
  record.update(id=undecodable, clip=f"/clips/{undecodable}.mp4", text=f"{undecodable} said hi")
  path = tmp_path / "gallery.html"
  with gallery.GalleryWriter(str(path)) as writer:
    writer.add(record, None, os.path.join("explanations", undecodable + ".png"))
    writer.close({"model": undecodable, "clips": 1})
  page = path.read_text(encoding="utf-8")  # strict: the page is UTF-8 throughout
  assert 'data-id="caf?"' in page and 'href="explanations/caf%E9.png"' in page
  assert os.listdir(tmp_path) == ["gallery.html"]


def test_a_failed_run_leaves_no_side_file(tmp_path):
  path = tmp_path / "gallery.html"
  with pytest.raises(RuntimeError, match="decoder died"), gallery.GalleryWriter(str(path)) as writer:
    writer.add(_prediction("a", np.random.default_rng(2)).to_json(), None)
    raise RuntimeError("decoder died")
  assert os.listdir(tmp_path) == []


def test_null_numbers_show_as_not_available(tmp_path):
  """A record made strict JSON (api.finite_json: NaN -> null) still renders, its missing numbers as n/a."""
  rng = np.random.default_rng(4)
  prediction = _prediction("nan", rng)
  bad = dict(prediction.tasks["emotion"].probabilities, joy=float("nan"))
  record = api.finite_json(
    {
      **prediction.to_json(),
      "probs": {"emotion": bad},
      "frame_scores": [float("nan")] * NUM_FRAMES,
      "reliability_video": float("inf"),
    }
  )
  card = gallery.clip_card(record, prediction.frames, 0)
  assert card.count("n/a") == 1 + 2 * NUM_FRAMES + 1 and "non_finite_output" in json.dumps(record["problems"])


def test_a_clip_not_read_gets_an_explanation_png_without_frames(tmp_path):
  """--explain-pngs on a clip whose video was not read: no frame row (none was chosen), the rest of the figure."""
  rng = np.random.default_rng(5)
  prediction = _prediction("dev/dia0_utt1", rng, has_video=False, error="corrupt_mp4: damaged")
  prediction = dataclasses.replace(prediction, gate=np.full(8, 0.5, np.float32))
  png = tmp_path / "dev_dia0_utt1.png"
  record = predict.explain_png(prediction, {"emotion": ("joy", "neutral", "anger")}, str(png))
  assert record["num_frames"] == 0 and record["selected_indices"] == [] and record["frame_scores"] == []
  assert png.stat().st_size > 5_000


# A script the test appends to a copy of the page: it writes into the DOM how many images the browser decoded.
COUNT_DECODED = (
  "<script>window.addEventListener('load', () => { const images = [...document.images];"
  "document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;"
  "document.body.dataset.images = images.length; });</script>"
)


def render(browser: list[str], page, scratch) -> tuple[_Cards, str]:
  """(the clip cards, the DOM) of `page` as headless Chromium renders it from disk; the DOM's body carries
  data-images / data-decoded, how many images the page has and how many the browser decoded. Also checks that a
  screenshot of the page can be taken (written under `scratch`)."""
  checked = scratch / "checked.html"
  checked.write_text(page.read_text(encoding="utf-8").replace("</body>", COUNT_DECODED + "</body>"), encoding="utf-8")
  command = [*browser, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()]
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  cards = _Cards()
  cards.feed(done.stdout)
  screenshot = scratch / "gallery.png"
  command = [*browser, "--window-size=1000,900", f"--screenshot={screenshot}", page.as_uri()]
  shot = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
  return cards, done.stdout


def test_headless_chromium_renders_every_clip_with_its_frames(tmp_path, headless_browser):
  path = tmp_path / "gallery.html"
  predictions = _write(path)
  cards, dom = render(headless_browser, path, tmp_path)
  assert list(cards.cards) == [p.id for p in predictions]
  assert [len(sources) for sources in cards.cards.values()] == [NUM_FRAMES, 0, NUM_FRAMES]
  images = 2 * NUM_FRAMES
  assert f'data-decoded="{images}"' in dom and f'data-images="{images}"' in dom, dom[-500:]
  # The hostile transcript stayed text: no script of the page's own ran (the test's is the only one).
  assert dom.count("<script>") == 1


@pytest.mark.slow
def test_headless_chromium_shows_every_clip_of_a_folder_prediction(tmp_path, tmp_path_factory, headless_browser):
  """The issue's bar: the gallery.html of `predict --folder` over clips the project did not make (two good, three
  broken, one audio only) opens in a browser and shows every clip, the frames of those with video decoded."""
  foreign = foreign_prediction(tmp_path_factory)
  cards, dom = render(headless_browser, foreign.out / "gallery.html", tmp_path)
  kinds = foreign.kinds
  assert set(cards.cards) == kinds["good"] | kinds["broken"] | kinds["audio_only"] and cards.other_sources == []
  frames = {name: len(sources) for name, sources in cards.cards.items()}
  assert {name for name, count in frames.items() if count} == kinds["good"], frames
  images = sum(frames.values())
  assert images == 2 * 4 and f'data-decoded="{images}"' in dom and f'data-images="{images}"' in dom, dom[-500:]
  assert dom.count('class="reason"') == 4  # every clip whose video was not read says why
