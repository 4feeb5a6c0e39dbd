"""Explaining one prediction: which frames the text picked, how the modalities were weighed, what was predicted.

    python -m mer_jax.tools.explain --workdir W --id dev/dia0_utt0 --out x.png [--split dev] [--json]

`show_prediction_sample(...)` writes a PNG (the T frames in order with their text-guided scores, the K chosen
outlined, the transcript, gate and reliabilities, predicted probabilities vs the label) and a JSON of the same
numbers, so a person can look and a program can check.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from mer_jax import errors  # noqa: E402
from mer_jax import storage  # noqa: E402
from mer_jax import tools  # noqa: E402

CHOSEN_COLOUR = "#d62728"


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - np.max(logits, axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / np.sum(exp, axis=-1, keepdims=True)


def explanation_record(
  example_id: str,
  text: str,
  frames: np.ndarray,
  logits: Mapping[str, np.ndarray],
  explanation: Mapping[str, np.ndarray],
  class_names: Mapping[str, Sequence[str]],
  labels: Mapping[str, int] | None = None,
  frame_times: Sequence[float] | None = None,
) -> dict:
  """The JSON-able explanation of one example (arrays without the batch axis)."""
  scores = np.asarray(explanation["frame_scores"], np.float64)
  chosen = [int(i) for i in np.asarray(explanation["selected_indices"])]
  gate = np.asarray(explanation["gate"], np.float64)
  record = {
    "id": example_id,
    "text": text,
    "num_frames": int(frames.shape[0]),
    "frame_scores": [round(float(s), 5) for s in scores],
    "selected_indices": chosen,
    "frame_times": None if frame_times is None else [round(float(t), 3) for t in frame_times],
    "gate_mean": round(float(gate.mean()), 5),
    "gate_quartiles": [round(float(q), 5) for q in np.quantile(gate, [0.25, 0.5, 0.75])],
    "reliability_video": round(float(explanation["reliability_video"]), 5),
    "reliability_audio": round(float(explanation["reliability_audio"]), 5),
    "tasks": {},
  }
  if "attention" in explanation:
    # Share of attention (averaged over heads and valid text tokens) on [fused, frames..., audio...].
    attention = np.asarray(explanation["attention"], np.float64)
    valid = attention.sum(-1).mean(0) > 0
    record["attention_share"] = [round(float(a), 5) for a in attention.mean(0)[valid].mean(0)]
  for task, task_logits in logits.items():
    probabilities = softmax(np.asarray(task_logits, np.float64))
    names = list(class_names[task])
    entry = {
      "probabilities": {name: round(float(p), 5) for name, p in zip(names, probabilities)},
      "predicted": names[int(np.argmax(probabilities))],
    }
    if labels is not None and task in labels and int(labels[task]) >= 0:
      entry["label"] = names[int(labels[task])]
      entry["correct"] = entry["label"] == entry["predicted"]
    record["tasks"][task] = entry
  return record


def show_prediction_sample(
  example_id: str,
  text: str,
  frames: np.ndarray,
  logits: Mapping[str, np.ndarray],
  explanation: Mapping[str, np.ndarray],
  class_names: Mapping[str, Sequence[str]],
  out_png: str,
  labels: Mapping[str, int] | None = None,
  frame_times: Sequence[float] | None = None,
  out_json: str | None = None,
) -> dict:
  """Writes the PNG (and JSON, default next to it) for one example; returns the JSON record.

  frames: (T, H, W, 1) uint8; logits: task -> (classes,); explanation: the model's explanation for this example
  (frame_scores (T,), selected_indices (K,), gate (D,), reliability_video (), reliability_audio (), attention).
  """
  record = explanation_record(example_id, text, frames, logits, explanation, class_names, labels, frame_times)
  num_frames = frames.shape[0]
  chosen = set(record["selected_indices"])
  tasks = list(logits)
  figure = plt.figure(figsize=(max(12, 1.3 * num_frames), 6.2), constrained_layout=True)
  grid = figure.add_gridspec(3, max(num_frames, 4), height_ratios=[1.2, 0.25, 1.3])
  for index in range(num_frames):
    axis = figure.add_subplot(grid[0, index])
    axis.imshow(frames[index, :, :, 0], cmap="gray", vmin=0, vmax=255)
    axis.set_xticks([])
    axis.set_yticks([])
    when = "" if frame_times is None else f"\n{float(frame_times[index]):.2f}s"
    axis.set_title(
      f"{record['frame_scores'][index]:+.2f}{when}", fontsize=8, color=CHOSEN_COLOUR if index in chosen else "black"
    )
    for spine in axis.spines.values():
      spine.set_edgecolor(CHOSEN_COLOUR if index in chosen else "#bbbbbb")
      spine.set_linewidth(3.5 if index in chosen else 0.5)
  text_axis = figure.add_subplot(grid[1, :])
  text_axis.axis("off")
  shown_text = text if len(text) < 160 else text[:157] + "..."
  text_axis.text(
    0.0,
    0.5,
    f"{example_id}: \"{shown_text}\"   (frames outlined in red: the K chosen; numbers: text-guided scores)",
    fontsize=9,
    va="center",
    wrap=True,
  )
  columns = len(tasks) + 1
  span = max(num_frames, 4) // columns
  modality_axis = figure.add_subplot(grid[2, 0:span])
  values = [record["reliability_video"], record["reliability_audio"], record["gate_mean"]]
  modality_axis.bar(["r_video", "r_audio", "gate (video share)"], values, color=["#1f77b4", "#ff7f0e", "#7f7f7f"])
  modality_axis.set_ylim(0, 1)
  modality_axis.set_title("reliabilities and mean gate", fontsize=9)
  modality_axis.tick_params(labelsize=7)
  for position, task in enumerate(tasks, start=1):
    axis = figure.add_subplot(grid[2, position * span : (position + 1) * span])
    entry = record["tasks"][task]
    names = list(entry["probabilities"])
    colours = ["#2ca02c" if name == entry.get("label") else "#9467bd" for name in names]
    axis.barh(names, list(entry["probabilities"].values()), color=colours)
    axis.set_xlim(0, 1)
    label = entry.get("label", "none")
    axis.set_title(f"{task}: predicted {entry['predicted']}, label {label}", fontsize=9)
    axis.tick_params(labelsize=7)
  storage.make_dirs(storage.parent(out_png))
  with epath.Path(out_png).open("wb") as f:  # a local path or gs://; the format follows the name, as savefig's
    figure.savefig(f, format=os.path.splitext(out_png)[1].lstrip(".").lower() or "png", dpi=90)
  plt.close(figure)
  out_json = out_json or os.path.splitext(out_png)[0] + ".json"
  storage.write_json(out_json, record, indent=2)
  return record


# ----------------------------------------------------------------------------- a trained run, one example


def predict_fn(config):
  """Jitted (variables, batch) -> (logits, explanation) in eval mode; `batch` without host-only `id`."""
  import jax
  from mer_jax.models import emotion_model as model_lib

  model = model_lib.for_this_host(config.model)
  return jax.jit(lambda variables, batch: model.apply(variables, batch, train=False))


def find_example(config, data_dir: str, split: str, example_id: str) -> tuple[dict, dict]:
  """(raw prepared example, model batch of 1 (the batch contract, with `id`)) for `example_id` of `split`.

  Ids are scanned without decoding frames or audio; then only that example is read.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from mer_jax.data import input_pipeline

  builder = input_pipeline.load_builder(config, data_dir)
  if split not in builder.info.splits:
    raise errors.InvalidInput(
      f"--split {split}: the data prepared under {data_dir} has no such split; pass one of "
      f"{sorted(builder.info.splits)} (the default is the id's prefix, e.g. dev/dia0_utt0 -> dev)."
    )
  ids_ds = builder.as_dataset(split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding({"id": True}))
  ids = [v.decode() for v in tfds.as_numpy(ids_ds.map(lambda ex: ex["id"]))]
  if example_id not in ids:
    raise errors.InvalidInput(
      f"--id {example_id}: no such example in split {split!r} ({len(ids)} examples); pass an id such as "
      f"{', '.join(ids[:3])} (and --split to match the id's prefix)."
    )
  position = ids.index(example_id)
  raw_ds = builder.as_dataset(split=f"{split}[{position}:{position + 1}]", shuffle_files=False)
  raw = next(iter(tfds.as_numpy(raw_ds)))
  if raw["id"].decode() != example_id:  # a split slice that does not follow file order would land here
    raise RuntimeError(f"Reading {split}[{position}] gave {raw['id']!r}, not {example_id!r}.")
  table = input_pipeline.split_token_table(builder, split, config)
  batch_ds = input_pipeline.dataset_from_examples(
    tf.data.Dataset.from_tensors(raw), config, train=False, batch_size=1, token_table=table
  )
  return raw, next(input_pipeline.as_numpy(batch_ds))


def check_output(out_png: str) -> None:
  """Raises InvalidInput for an --out the PNG cannot be written to (a folder, or a path under a file)."""
  if storage.is_dir(out_png):
    raise errors.InvalidInput(f"--out {out_png} is a folder; pass the PNG's path, e.g. {out_png}/explanation.png.")
  tools.check_output_folder(storage.parent(out_png), "--out")


def explain_example(
  workdir: str,
  split: str,
  example_id: str,
  out_png: str,
  *,
  config_path: str | None = None,
  step: int | None = None,
  out_json: str | None = None,
) -> dict:
  """Runs the trained model of `workdir` on one prepared example and writes its PNG + JSON explanation."""
  import jax

  from mer_jax.data import input_pipeline
  from mer_jax.export import contract
  from mer_jax.export import metadata as export_metadata
  from mer_jax.training import runs

  check_output(out_png)
  run = runs.load_run(workdir, config_path, step)
  config = contract.export_config(run.config)  # float32 compute: explanations are read, not trained
  runs.split_size(config, run.data_dir(), split)  # the prepared data is there and has the split
  raw, batch = find_example(config, run.data_dir(), split, example_id)
  logits, explanation = predict_fn(config)(run.variables, input_pipeline.model_inputs(batch))
  logits, explanation = jax.tree.map(lambda x: np.asarray(x)[0], (logits, explanation))
  labels = {task: int(batch[f"labels/{task}"][0]) for task in config.model.tasks}
  text = raw["text"].decode("utf-8")
  record = show_prediction_sample(
    example_id,
    text,
    batch["frames"][0],
    logits,
    explanation,
    export_metadata.class_names(config, run.best),
    out_png,
    labels=labels,
    frame_times=raw["frame_times"].tolist(),
    out_json=out_json,
  )
  record["checkpoint"] = run.source
  if out_json is None:
    out_json = os.path.splitext(out_png)[0] + ".json"
  storage.write_json(out_json, record, indent=2)
  return record


def main(argv: Sequence[str] | None = None) -> dict:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m mer_jax.tools.explain", description="PNG + JSON explanation of one prepared example."
  )
  parser.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
  parser.add_argument("--id", required=True, help="example id, e.g. dev/dia0_utt0")
  parser.add_argument("--split", default=None, help="prepared split (default: the id's prefix)")
  parser.add_argument("--out", required=True, help="PNG path; the JSON goes next to it")
  parser.add_argument("--json", action="store_true", help="also print the JSON record")
  parser.add_argument("--config", default=None, help="config file, for workdirs without config.json")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  args = parser.parse_args(argv)
  split = args.split or args.id.split("/", 1)[0]
  record = explain_example(args.workdir, split, args.id, args.out, config_path=args.config, step=args.step)
  if args.json:
    print(json.dumps(record, indent=2))
  else:
    print(f"Wrote {args.out} and {os.path.splitext(args.out)[0]}.json")
  return record


def cli(argv: Sequence[str] | None = None) -> int:
  """Entry point of `mer-jax-explain` and `python -m mer_jax.tools.explain`: exit status 0 when `main` returns,
  2 with one line on stderr for a path or value the user can fix."""
  return tools.run_command(main, argv)


if __name__ == "__main__":
  sys.exit(cli())
