"""A self-contained HTML gallery of many predictions: one page that a browser opens from disk, no server, no network.

Each clip is a card: its id and file, the transcript, its T frames as the model saw them with the K chosen
outlined and every frame's text-guided score and time, each task's probabilities as bars (predicted vs true
label where the CSV had one), the reliabilities r_video, r_audio and the mean gate, and the reason when the clip
could not be read. Frames are embedded as WebP data URIs, the style is inline, and three radio buttons filter
the cards (all, errors, wrong) in CSS alone. `GalleryWriter` streams cards to a side file while predictions
arrive, so memory stays flat on 10,000 clips; `close(summary)` puts the header in front. A number that is null
in the record (non-finite in the model's output, api.finite_json) shows as "n/a". File names that are not UTF-8
(os.listdir's surrogate escapes) show with '?' in the text and keep their bytes, percent-encoded, in links.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import urllib.parse
from collections.abc import Iterable

import cv2
import numpy as np

FRAME_PIXELS = 72  # frames are shown this wide (smaller ones scaled up, pixelated)
WEBP_QUALITY = 90
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 12px; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 8px; }
h1 { font-size: 20px; margin: 4px 0; }
.summary span { margin-right: 14px; }
.legend { color: #555; font-size: 12px; }
body > input { margin-left: 14px; }
#show-errors:checked ~ main .clip:not(.error), #show-wrong:checked ~ main .clip:not(.wrong) { display: none; }
.clip { border: 1px solid #ddd; border-radius: 6px; margin: 10px 0; padding: 8px 10px; }
.clip.error { border-color: #e0a040; background: #fffaf0; }
.clip h2 { font-size: 15px; margin: 0 0 4px; }
.clip h2 .file { color: #777; font-weight: normal; font-size: 12px; margin-left: 8px; }
.badge { font-size: 12px; padding: 1px 6px; border-radius: 8px; margin-left: 8px; color: #fff; }
.badge.right { background: #2ca02c; } .badge.wrong { background: #d62728; } .badge.error { background: #e08a00; }
.text { margin: 2px 0 6px; font-style: italic; }
.reason { color: #a05a00; margin: 2px 0 6px; font-size: 13px; }
.frames { display: flex; flex-wrap: wrap; gap: 4px; }
.frames figure { margin: 0; text-align: center; font-size: 11px; color: #555; }
.frames img { width: 72px; height: 72px; image-rendering: pixelated; border: 2px solid #ccc; display: block; }
.frames figure.chosen img { border: 3px solid #d62728; margin: -1px; }
.frames figure.chosen figcaption { color: #d62728; font-weight: bold; }
.numbers { display: flex; flex-wrap: wrap; gap: 18px; margin-top: 8px; }
.numbers h3 { font-size: 13px; margin: 0 0 2px; }
table.bars { border-collapse: collapse; font-size: 12px; }
table.bars td { padding: 0 4px; }
table.bars td.bar { width: 140px; }
table.bars div { background: #9467bd; height: 10px; }
table.bars tr.true div { background: #2ca02c; }
table.bars tr.predicted td:first-child { font-weight: bold; }
.modalities div { background: #1f77b4; height: 10px; }
a.png { font-size: 12px; }
"""


def frame_data_uri(frame: np.ndarray) -> str:
  """(S, S) or (S, S, 1) uint8 grey frame -> a WebP data URI, at most FRAME_PIXELS wide (the size shown).

  WebP at quality 90 is ~3x smaller than PNG on these frames (~0.8 KB at 64 px) with no visible change, which
  keeps a page of thousands of clips openable; every current browser decodes it.
  """
  frame = np.ascontiguousarray(np.asarray(frame, np.uint8).reshape(frame.shape[0], frame.shape[1]))
  if max(frame.shape) > FRAME_PIXELS:
    frame = cv2.resize(frame, (FRAME_PIXELS, FRAME_PIXELS), interpolation=cv2.INTER_AREA)
  ok, encoded = cv2.imencode(".webp", frame, [cv2.IMWRITE_WEBP_QUALITY, WEBP_QUALITY])
  if not ok:
    raise ValueError(f"OpenCV could not encode a frame of shape {np.shape(frame)} as WebP.")
  return "data:image/webp;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _number(value, spec: str) -> str:
  """`value` formatted with `spec`, or "n/a" for None (a non-finite output, null in predictions.jsonl)."""
  return "n/a" if value is None else format(value, spec)


def _width(value) -> str:
  """A bar's CSS width for a value in [0, 1] (None: an empty bar)."""
  return f"{100 * (value or 0.0):.1f}%"


def _bar_rows(probabilities: dict, predicted: str, true_label: str | None) -> str:
  rows = []
  for name, p in sorted(probabilities.items(), key=lambda item: -(item[1] if item[1] is not None else -1.0)):
    classes = " ".join(c for c, on in (("predicted", name == predicted), ("true", name == true_label)) if on)
    rows.append(
      f'<tr class="{classes}"><td>{html.escape(name)}</td><td class="bar"><div style="width:{_width(p)}">'
      f"</div></td><td>{_number(p, '.3f')}</td></tr>"
    )
  return "".join(rows)


def clip_card(record: dict, frames: np.ndarray | None, position: int, explanation_href: str | None = None) -> str:
  """One clip's <section>. record: a predictions.jsonl line (with true_label / correct when labelled);
  frames: (T, S, S) uint8 as the model saw them, or None (no frame row)."""
  true_labels, correct = record.get("true_label") or {}, record.get("correct") or {}
  wrong = any(value is False for value in correct.values())
  classes = "clip" + (" error" if record.get("error") else "") + (" wrong" if wrong else "")
  badges = ""
  if record.get("error"):
    badges += '<span class="badge error">not read</span>'
  if correct:
    badges += '<span class="badge wrong">wrong</span>' if wrong else '<span class="badge right">right</span>'
  clip_name = os.path.basename(record["clip"]) if record.get("clip") else "text only"
  parts = [
    f'<section class="{classes}" id="clip-{position}" data-id="{html.escape(record["id"])}">',
    f'<h2><span class="id">{html.escape(record["id"])}</span><span class="file">{html.escape(clip_name)}</span>',
    f"{badges}</h2>",
    f'<p class="text">{html.escape(record.get("text") or "(no transcript)")}</p>',
  ]
  if record.get("error"):
    parts.append(f'<p class="reason">{html.escape(record["error"])}</p>')
  # A clip without video has no frame row: the model saw blank frames, and chose none (api.Prediction).
  if frames is not None and record.get("has_video", True) and record.get("frame_times"):
    chosen = {frame["index"] for frame in record["chosen_frames"]}
    figures = []
    for index, frame in enumerate(frames):
      score, time = record["frame_scores"][index], record["frame_times"][index]
      figures.append(
        f'<figure class="{"chosen" if index in chosen else "frame"}"><img src="{frame_data_uri(frame)}" '
        f'alt="frame {index} of {html.escape(record["id"])}" '
        f'title="frame {index} at {_number(time, ".2f")} s, score {_number(score, "+.3f")}">'
        f"<figcaption>{_number(score, '+.2f')}<br>{_number(time, '.2f')} s</figcaption></figure>"
      )
    parts.append(f'<div class="frames">{"".join(figures)}</div>')
  numbers = []
  for task, probabilities in record["probs"].items():
    predicted, true_label = record["label"][task], true_labels.get(task)
    verdict = "" if true_label is None else f", label {html.escape(true_label)}"
    numbers.append(
      f'<div class="task"><h3>{html.escape(task)}: {html.escape(predicted)}{verdict}</h3>'
      f'<table class="bars">{_bar_rows(probabilities, predicted, true_label)}</table></div>'
    )
  modalities = [("r_video", record["reliability_video"]), ("r_audio", record["reliability_audio"])]
  if record.get("gate_mean") is not None:
    modalities.append(("gate (video share)", record["gate_mean"]))
  rows = "".join(
    f'<tr><td>{name}</td><td class="bar"><div style="width:{_width(value)}"></div></td>'
    f"<td>{_number(value, '.3f')}</td></tr>"
    for name, value in modalities
  )
  used = ", ".join(m for m, on in (("video", record.get("has_video")), ("audio", record.get("has_audio"))) if on)
  numbers.append(
    f'<div class="modalities"><h3>modalities (read: {used or "none"})</h3><table class="bars">{rows}</table></div>'
  )
  parts.append(f'<div class="numbers">{"".join(numbers)}</div>')
  if explanation_href:
    # A path relative to the page, percent-encoded: a name with '#', '?' or '%' is not read as a fragment, a query
    # or an escape; surrogateescape gives a name os.listdir could not decode its own bytes back.
    href = urllib.parse.quote(explanation_href.replace(os.sep, "/"), errors="surrogateescape")
    parts.append(f'<a class="png" href="{html.escape(href)}">explanation PNG</a>')
  parts.append("</section>\n")
  return "".join(parts)


def page_header(summary: dict) -> str:
  """<head> and the summary header. summary: model, runtime, clips, errors and, when labelled, accuracy
  {task: {accuracy, labelled}}."""
  title = f"mer_jax predictions: {summary.get('clips', 0)} clips"
  facts = [
    ("model", summary.get("model")),
    ("runtime", summary.get("runtime")),
    ("clips", summary.get("clips")),
    ("not read", summary.get("errors")),
  ]
  for task, entry in (summary.get("accuracy") or {}).items():
    facts.append((f"{task} accuracy", f"{entry['accuracy']:.3f} of {entry['labelled']} labelled"))
  spans = "".join(f"<span><b>{html.escape(name)}</b>: {html.escape(str(value))}</span>" for name, value in facts)
  return (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
    f'<header><h1>{html.escape(title)}</h1><p class="summary">{spans}</p>'
    '<p class="legend">Frames as the model saw them; outlined in red: the K frames the text-guided selector chose. '
    "Under each frame: its score and time. Bars: each task's probabilities (green: the true label); r_video, "
    "r_audio: how far the model trusted each modality; gate: the video side's share of the fused vector.</p>"
    "</header>\n"
    '<input type="radio" name="filter" id="show-all" checked><label for="show-all">all clips</label>'
    '<input type="radio" name="filter" id="show-errors"><label for="show-errors">not read</label>'
    '<input type="radio" name="filter" id="show-wrong"><label for="show-wrong">wrong</label>\n<main>\n'
  )


class GalleryWriter:
  """Writes gallery.html: `add` a card per clip as predictions arrive (to a side file), `close` with the summary.

  As a context manager, the side file is removed however the block ends (a failed run leaves no .cards.tmp).
  Text is written with errors="replace": a file name os.listdir could not decode (a lone surrogate) shows as
  '?' instead of failing the whole page at the end of a long run.
  """

  def __init__(self, path: str):
    self.path, self.count = path, 0
    self._cards_path = path + ".cards.tmp"
    self._cards = open(self._cards_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 (see `discard`)

  def __enter__(self) -> GalleryWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.discard()

  def add(self, record: dict, frames: np.ndarray | None, explanation_href: str | None = None) -> None:
    self._cards.write(clip_card(record, frames, self.count, explanation_href))
    self.count += 1

  def close(self, summary: dict) -> str:
    """Header + cards + end into `path`; the side file is removed (also when this fails). Returns the path."""
    self._cards.close()
    try:
      with (
        open(self.path, "w", encoding="utf-8", errors="replace") as page,
        open(self._cards_path, encoding="utf-8") as cards,
      ):
        page.write(page_header(summary))
        shutil.copyfileobj(cards, page)
        page.write("</main></body></html>\n")
    finally:
      self.discard()
    return self.path

  def discard(self) -> None:
    """Closes and removes the side file (if still there); the page, if `close` wrote it, stays."""
    self._cards.close()
    if os.path.exists(self._cards_path):
      os.remove(self._cards_path)


def write_gallery(path: str, cards: Iterable[tuple[dict, np.ndarray | None]], summary: dict) -> str:
  """gallery.html at `path` from (record, frames) pairs at once (GalleryWriter for a stream)."""
  with GalleryWriter(path) as writer:
    for record, frames in cards:
      writer.add(record, frames)
    return writer.close(summary)
