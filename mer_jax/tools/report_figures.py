"""The report's figures and report.md: plots of the measured claims, and the markdown that shows them.

Split from the measuring (mer_jax/tools/report.py, whose `write_report` calls these on the result of `measure`) so
that matplotlib and the page's layout stay out of the measurements. Plots are written to files only (Agg).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GROUPS = ("clean", "audio", "video")  # the sidecar's "corrupted": null | "audio" | "video"


def _save(figure, path: str) -> str:
  figure.savefig(path, dpi=90)
  plt.close(figure)
  return os.path.basename(path)


def plot_selection(histogram: dict, top_k: int, path: str) -> str:
  counts = np.asarray(histogram["counts"])
  figure, axis = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
  axis.bar(np.arange(counts.size), counts, color="#1f77b4")
  if histogram["total"]:
    axis.axhline(histogram["total"] / counts.size, color="#d62728", ls="--", label="uniform")
    axis.legend(fontsize=8)
  p_value = histogram["p_value"]
  axis.set_title(
    f"chosen frame positions ({histogram['num_examples']} clips x K={top_k}); chi-square vs "
    f"uniform p={'n/a' if p_value is None else f'{p_value:.3g}'}",
    fontsize=9,
  )
  axis.set_xlabel("frame index t")
  axis.set_xticks(np.arange(counts.size))
  return _save(figure, path)


def plot_task(task: str, report: dict, path: str) -> str:
  names, confusion = report["class_names"], np.asarray(report["confusion_matrix"])
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
  left.imshow(confusion, cmap="Blues")
  for (i, j), value in np.ndenumerate(confusion):
    left.text(
      j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > confusion.max() / 2 else "black"
    )
  left.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
  left.set_yticks(range(len(names)), names, fontsize=7)
  left.set_xlabel("predicted")
  left.set_ylabel("true")
  left.set_title(f"{task}: confusion matrix", fontsize=9)
  right.barh(names, [report["per_class"][n]["f1"] for n in names], color="#2ca02c")
  right.set_xlim(0, 1)
  right.invert_yaxis()  # classes top to bottom, as in the confusion matrix
  right.set_title(f"{task}: per-class F1 (weighted F1 {report['weighted_f1']:.3f})", fontsize=9)
  right.tick_params(labelsize=7)
  return _save(figure, path)


def plot_modalities(data: dict, sidecar: dict | None, path: str) -> str:
  """Histograms of mean gate, r_v and r_a; split by corruption group when the ground truth is known."""
  if sidecar is not None:
    group = np.array([(sidecar.get(i) or {}).get("corrupted") or "clean" for i in data["ids"]], object)
    splits = {f"{name} ({int((group == name).sum())})": group == name for name in GROUPS}
  else:
    splits = {"all": np.ones(data["ids"].size, bool)}
  figure, axes = plt.subplots(1, 3, figsize=(12, 3.2), constrained_layout=True)
  for axis, key, title in zip(
    axes, ("gate_mean", "reliability_video", "reliability_audio"), ("mean gate (video share)", "r_video", "r_audio")
  ):
    for label, rows in splits.items():
      if rows.any():
        axis.hist(data[key][rows], bins=20, range=(0, 1), alpha=0.55, label=label)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
  return _save(figure, path)


def plot_faithfulness(faith: dict, path: str) -> str:
  labels = ["as run", "K chosen blanked", "K random blanked"]
  values = [faith["accuracy"], faith["accuracy_blank_chosen"], faith["accuracy_blank_random"]]
  figure, axis = plt.subplots(figsize=(5.5, 3.2), constrained_layout=True)
  axis.bar(labels, [v or 0.0 for v in values], color=["#7f7f7f", "#d62728", "#1f77b4"])
  axis.set_ylim(0, 1)
  axis.set_title(f"{faith['task']} accuracy ({faith['num_examples']} clips)", fontsize=9)
  return _save(figure, path)


def _fmt(value) -> str:
  return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_markdown(result: dict, plots: dict, path: str) -> None:
  lines = [
    f"# Report: {result['workdir']} on `{result['split']}`",
    "",
    f"Checkpoint step {result['checkpoint']['checkpoint_step']} ({result['checkpoint']['chosen_as']}); "
    f"{result['num_examples']} examples; T={result['num_frames']}, K={result['top_k']}; seed "
    f"{result['seed']}. Numbers: `claims.json`.",
    "",
    "## Claims",
    "",
    "| claim | value | bar | met |",
    "|---|---|---|---|",
  ]
  for name, entry in result["claims"].items():
    lines.append(f"| {name} | {_fmt(entry['value'])} | {entry['bar']} | {'yes' if entry['met'] else 'NO'} |")
  lines += ["", "## Classification", "", "| task | accuracy | weighted F1 | macro F1 |", "|---|---|---|---|"]
  for task, report in result["tasks"].items():
    lines.append(f"| {task} | {report['accuracy']:.4f} | {report['weighted_f1']:.4f} | {report['macro_f1']:.4f} |")
  lines.append("")
  lines += [f"![{task}]({plots[f'task_{task}']})" for task in result["tasks"]]
  histogram = result["selection_histogram"]
  lines += [
    "",
    "## Where the chosen frames are",
    "",
    f"Counts per frame index: {histogram['counts']} ({histogram['total']} = {histogram['num_examples']} "
    f"clips with video x K). Chi-square vs uniform: chi2={_fmt(histogram['chi2'])}, "
    f"p={_fmt(histogram['p_value'])}. In the demo corpus the key frames sit at uniformly random "
    "positions, so a selector that reads content gives a flat histogram (large p); a small p means a "
    "positional habit.",
    "",
    f"![selection]({plots['selection']})",
    "",
    "## Gate and reliabilities",
    "",
    f"mean gate {_fmt(result['gate_mean'].get('mean'))}, r_v {_fmt(result['reliability_video'].get('mean'))}, "
    f"r_a {_fmt(result['reliability_audio'].get('mean'))} (means over all examples).",
    "",
    f"![modalities]({plots['modalities']})",
    "",
    "## Ground truth (demo sidecar)",
    "",
  ]
  side = result["sidecar"]
  if side is None:
    lines.append(f"Omitted: {result['sidecar_note']}")
  else:
    lines += [
      f"{result['sidecar_note']}; {side['num_examples_with_ground_truth']} examples matched.",
      "",
      f"Selection precision@K: {_fmt(side['precision_at_k'])} over {side['precision_num_examples']} clips "
      f"with uncorrupted video (the best possible at this K: {_fmt(side['precision_at_k_ceiling'])}).",
      "",
      "| clips | n | mean r_a | mean r_v | accuracy |",
      "|---|---|---|---|---|",
    ]
    for name, group in side["groups"].items():
      lines.append(
        f"| {name} | {group['num_examples']} | {_fmt(group['reliability_audio'])} | "
        f"{_fmt(group['reliability_video'])} | {_fmt(group['accuracy'])} |"
      )
  faith = result["faithfulness"]
  lines += ["", "## Faithfulness", ""]
  if faith is None:
    lines.append("Not measured (--no-faithfulness).")
  else:
    lines += [
      f"{faith['task']} accuracy on {faith['num_examples']} clips ({faith['rows']}): as run "
      f"{_fmt(faith['accuracy'])}; K chosen frames blanked {_fmt(faith['accuracy_blank_chosen'])} "
      f"(drop {_fmt(faith['drop_blank_chosen'])}); K random other frames blanked "
      f"{_fmt(faith['accuracy_blank_random'])} (drop {_fmt(faith['drop_blank_random'])}).",
      "",
      "Protocol: blanked frames are set to 0 (black) in the input and excluded from the re-selection "
      "(their scores are set to -1e9; everything else the scorer sees is unchanged), so the model "
      "chooses its K frames among the frames left. The random set is K frames drawn with --seed, "
      "never identical to the chosen set.",
      "",
      f"![faithfulness]({plots['faithfulness']})",
    ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
