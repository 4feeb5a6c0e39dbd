"""What an export says about itself and the run's data it is checked on.

metadata.json (inputs, outputs, labels, preprocessing) + tokenizer/, written by `mer_jax.export.exporters` and
read by `mer_jax.tools.predict`; and the prepared examples of the run's eval split that the parity check and
the accuracy report (`--accuracy-split`) run every export on. Reading needs neither JAX nor TensorFlow, so
a prediction on an ONNX or TFLite file imports neither through this module. The preprocessing section
holds everything that turns a raw clip into model inputs exactly as training saw it: the clip reader's
settings of the prepared data the model was trained on (`clip_read_config`) and the `config.data`
fields the input pipeline's resize, log-mel and tokenizer read (`data`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Sequence

import numpy as np

from mer_jax.data import labels as labels_lib

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2  # 2: adds preprocessing.clip_read_config and preprocessing.data
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "config.json")
# The config.data fields that preprocessing reads (features._mel_params, resize, tokenizer, context).
DATA_FIELDS = ("num_frames", "frame_size", "sample_rate", "max_audio_seconds", "num_mel_bins",
               "mel_frame_length", "mel_frame_step", "fft_length", "mel_lower_hz", "mel_upper_hz",
               "max_text_length", "context_turns", "builder", "builder_config")


def class_names(config, best: dict | None = None) -> dict[str, list[str]]:
  """Per task: the names in eval/best.json, else config.data.classes, else mer_jax/data/labels.py."""
  names = {}
  for task, count in config.model.tasks.items():
    candidates = [((best or {}).get("tasks", {}).get(task) or {}).get("class_names"),
                  (config.data.get("classes") or {}).get(task), labels_lib.TASK_CLASSES.get(task)]
    found = next((list(c) for c in candidates if c and len(c) == count), None)
    if found is None:
      raise ValueError(f"No list of {count} class names for task {task!r}; set config.data.classes = "
                       f"{{{task!r}: (...)}} or add it to mer_jax/data/labels.py.")
    names[task] = found
  return names


def data_fields(config) -> dict:
  """The preprocessing fields of `config.data` (those it sets) as plain JSON values."""
  data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
  return {key: (list(data[key]) if isinstance(data[key], tuple) else data[key])
          for key in DATA_FIELDS if key in data}


def clip_read_config(config, data_dir: str | None = None) -> tuple[dict, str]:
  """(ClipReadConfig fields, where they came from) for the data `config` was trained on.

  The prepared data's TFDS metadata records how its clips were read (data/meld_format.py); that is the
  reading prediction must repeat. Without prepared data (a checkpoint copied alone), the reader's
  defaults with config.data's frame count, sample rate and audio length are used, with a warning: the
  builder config may have read clips differently (e.g. 'demo' uses centre crops and exact frames).
  """
  from mer_jax.data import clip_reader
  from mer_jax.data import input_pipeline
  try:
    builder = input_pipeline.load_builder(config, data_dir)
    stored = (builder.info.metadata or {}).get("clip_read_config")
  except FileNotFoundError:
    stored = None
  if stored:
    return dict(stored), f"prepared data {builder.data_dir}"
  data = config.data
  fallback = clip_reader.ClipReadConfig(
      num_frames=int(data.num_frames), frame_size=max(112, int(data.frame_size)),
      sample_rate=int(data.get("sample_rate", 16000)),
      max_audio_seconds=float(data.get("max_audio_seconds", 10.0)))
  warnings.warn(f"No prepared data for builder config {data.get('builder_config')!r} under data_dir "
                f"{data_dir or data.get('data_dir') or '(TFDS default)'!r}: clips are read with the clip reader's defaults, "
                "which may differ from how the training data was read. Point config.data.data_dir at "
                "the prepared data to fix this.")
  return dataclasses.asdict(fallback), "clip reader defaults (prepared data not found)"


def _output_meanings(config) -> list[str]:
  return [f"(batch, {n}) float32 softmax over labels[{t!r}]" for t, n in config.model.tasks.items()] + [
      f"(batch, {config.data.num_frames}) float32 text-guided score of each frame",
      f"(batch, {config.model.top_k}) int32 chosen frames, in time order",
      "(batch,) float32 in [0, 1]", "(batch,) float32 in [0, 1]",
      f"(batch, {config.model.width}) float32 GMU gate: the video share of each fused channel"]


def write_metadata(config, variables, out_dir: str, parity: dict, tflite_batch_size: int = 1,
                   classes: dict | None = None, source: dict | None = None,
                   clip_config: tuple[dict, str] | None = None) -> dict:
  """metadata.json (inputs, outputs, labels, preprocessing, batch policy) and tokenizer/ in `out_dir`.

  `clip_config`: (ClipReadConfig fields, source) from `clip_read_config`; looked up when None.
  """
  from mer_jax.export import exporters as export
  from mer_jax.data import features
  from mer_jax.models import minilm
  from mer_jax.models import emotion_model as model_lib
  data = config.data
  spec = model_lib.input_spec(config, 1)
  tokenizer_dir = os.path.join(out_dir, TOKENIZER_DIR)
  os.makedirs(tokenizer_dir, exist_ok=True)
  for name in TOKENIZER_FILES:  # the files AutoTokenizer reads; not the MiniLM weights
    if (minilm.model_dir() / name).is_file():
      shutil.copy(minilm.model_dir() / name, tokenizer_dir)
  reading, reading_source = clip_config or clip_read_config(config)
  mel = features._mel_params(config)  # the exact parameters the input pipeline uses
  metadata = {
      "format_version": FORMAT_VERSION,
      "inputs": [{"name": n, "shape": ["batch"] + list(spec[n].shape[1:]),
                  "dtype": str(np.dtype(spec[n].dtype))} for n in export.INPUT_NAMES],
      "outputs": [{"name": n, "meaning": m}
                  for n, m in zip(export.output_names(config), _output_meanings(config))],
      "labels": dict(classes) if classes else class_names(config),
      "preprocessing": {
          "num_frames": int(data.num_frames), "frame_size": int(data.frame_size), "frame_channels": 1,
          "frame_times": "t_i = (i + 0.5) * duration / T, grey uint8, face crop (Haar) else centre crop",
          "sample_rate": mel["sample_rate"], "max_audio_seconds": mel["max_seconds"],
          "audio_frames": int(spec["audio"].shape[1]),
          "log_mel": {**{k: mel[k] for k in ("num_mel_bins", "frame_length", "frame_step", "fft_length",
                                             "lower_hz", "upper_hz")}, "log_offset": features.LOG_OFFSET,
                      "function": "mer_jax.data.features.audio_features"},
          "max_text_length": int(data.max_text_length), "tokenizer": TOKENIZER_DIR + "/",
          "text": "[CLS] utterance [SEP] (+ context [SEP]), padded with id 0; text_mask marks real tokens",
          "clip_read_config": reading, "clip_read_config_source": reading_source,
          "data": data_fields(config),
          "pipeline": "mer_jax.data.clip_reader.read_clip -> input_pipeline.resize_frames; "
                      "features.audio_features; tokenizer.tokenize (see mer_jax/tools/predict.py)",
      },
      "batch_size": {"onnx": "dynamic", "savedmodel": "dynamic", "tflite": int(tflite_batch_size),
                     "tflite_note": "TFLite goes through XLA HLO, which has static shapes: feed exactly "
                                    "this many rows (pad and drop the extra outputs)."},
      "files": {key: report["file"] for key, report in parity["formats"].items()},
      "model": {"config": json.loads(export.export_config(config).model.to_json()),
                "parameters": model_lib.count_parameters(variables["params"])},
      "source": source or {"checkpoint": None},
  }
  with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata


# ----------------------------------------------------------------------------- the run's real data


def accuracy_report(config, variables, runners: dict, split: str, batches: list) -> dict:
  """Accuracy and weighted F1 per task of JAX and of each export on `batches`, and each export's change."""
  from mer_jax.export import exporters as export
  from mer_jax.training import metrics
  tasks = dict(config.model.tasks)
  predictions = {"jax": {t: [] for t in tasks}, **{key: {t: [] for t in tasks} for key in runners}}
  labels = {t: [] for t in tasks}
  for batch in batches:
    keep = np.asarray(batch["example_mask"], bool)
    inputs = {name: batch[name] for name in export.INPUT_NAMES}
    for key, run in [("jax", lambda ex: export.jax_reference(config, variables, ex)), *runners.items()]:
      outputs = run(inputs)
      for task in tasks:
        predictions[key][task].append(np.argmax(outputs[f"probs_{task}"], -1)[keep])
    for task in tasks:
      labels[task].append(np.asarray(batch[f"labels/{task}"])[keep])
  labels = {t: np.concatenate(v) for t, v in labels.items()}
  report = {"split": split, "examples": int(len(next(iter(labels.values())))), "jax": {}, "formats": {}}
  for key, per_task in predictions.items():
    entry = {}
    for task, parts in per_task.items():
      predicted = np.concatenate(parts)
      scores = metrics.f1_scores(labels[task], predicted, tasks[task])
      entry[task] = {"accuracy": round(scores["accuracy"], 5), "weighted_f1": round(scores["weighted_f1"], 5)}
      if key != "jax":
        reference = report["jax"][task]
        jax_predicted = np.concatenate(predictions["jax"][task])
        entry[task].update(
            accuracy_change=round(entry[task]["accuracy"] - reference["accuracy"], 5),
            weighted_f1_change=round(entry[task]["weighted_f1"] - reference["weighted_f1"], 5),
            agreement_with_jax=round(float(np.mean(predicted == jax_predicted)), 5))
    if key == "jax":
      report["jax"] = entry
    else:
      report["formats"][key] = entry
  return report


def split_batches(config, data_dir: str, split: str, limit: int | None = None) -> list[dict]:
  """Eval batches of a prepared split (padding rows have example_mask False), at most `limit` real rows."""
  from mer_jax.data import input_pipeline
  batches, rows = [], 0
  for batch in input_pipeline.batch_iterator(config, split, train=False, data_dir=data_dir,
                                             process_index=0, process_count=1):
    batches.append(input_pipeline.model_inputs(batch))
    rows += int(np.sum(batch["example_mask"]))
    if limit is not None and rows >= limit:
      break
  return batches


def make_examples(config, num: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
  """`num` random inputs of the batch contract; row 1 has no video and row 2 no audio (when num > 2)."""
  from mer_jax.models import emotion_model as model_lib
  rng = np.random.default_rng(seed)
  spec = model_lib.input_spec(config, num)
  frames = rng.integers(0, 256, spec["frames"].shape, dtype=np.uint8)
  audio = rng.uniform(-14.0, 2.0, spec["audio"].shape).astype(np.float32)  # log-mel range
  num_audio, length = spec["audio"].shape[1], spec["text_ids"].shape[1]
  audio_mask = np.arange(num_audio)[None] < rng.integers(num_audio // 4, num_audio + 1, (num, 1))
  text_mask = np.arange(length)[None] < rng.integers(2, length + 1, (num, 1))
  vocab = int(config.model.text.compact.vocab_size) if config.model.text.kind == "compact" else 30522
  text_ids = np.where(text_mask, rng.integers(1000, vocab, (num, length)), 0).astype(np.int32)
  has_video, has_audio = np.ones(num, bool), np.ones(num, bool)
  if num > 2:
    has_video[1], has_audio[2] = False, False
    frames[1], audio[2], audio_mask[2] = 0, 0.0, False
  return dict(frames=frames, audio=audio * audio_mask[..., None], audio_mask=audio_mask, text_ids=text_ids,
              text_mask=text_mask, has_video=has_video, has_audio=has_audio)


def parity_examples(config, data_dir: str, num: int) -> tuple[dict, str]:
  """(`num` real examples of config.eval_split, 'where from'), else random ones when there is no data."""
  split = config.get("eval_split", "dev")
  try:
    batches = split_batches(config, data_dir, split, num)
  except (FileNotFoundError, KeyError, ValueError) as error:
    warnings.warn(f"Parity check on random inputs: no prepared {split!r} split ({error}).")
    return make_examples(config, num), f"random inputs (make_examples): no prepared {split!r} split"
  keep = np.concatenate([np.asarray(b["example_mask"], bool) for b in batches])
  examples = {name: np.concatenate([b[name] for b in batches])[keep][:num] for name in batches[0]
              if name != "example_mask" and not name.startswith("labels/")}
  return examples, f"first {len(examples['frames'])} examples of the {split!r} split in {data_dir}"


# ----------------------------------------------------------------------------- reading


def read_metadata(export_dir: str) -> dict:
  """metadata.json of an export folder, checked for what prediction needs."""
  path = os.path.join(export_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: an exported model needs the metadata.json written beside "
                            "it by `python -m mer_jax.export --workdir RUN --out DIR`; keep the export "
                            "folder together (model files, metadata.json, tokenizer/).")
  with open(path) as f:
    metadata = json.load(f)
  pre = metadata.get("preprocessing", {})
  if "data" not in pre:  # format_version 1: rebuild the data fields from the flat entries
    log_mel = pre.get("log_mel", {})
    pre["data"] = {"num_frames": pre["num_frames"], "frame_size": pre["frame_size"],
                   "sample_rate": pre["sample_rate"], "max_audio_seconds": pre["max_audio_seconds"],
                   "num_mel_bins": log_mel.get("num_mel_bins", 64),
                   "mel_frame_length": log_mel.get("frame_length"), "mel_frame_step": log_mel.get("frame_step"),
                   "fft_length": log_mel.get("fft_length"), "mel_lower_hz": log_mel.get("lower_hz"),
                   "mel_upper_hz": log_mel.get("upper_hz"), "max_text_length": pre["max_text_length"],
                   "context_turns": 0}
    pre["data"] = {k: v for k, v in pre["data"].items() if v is not None}
  if "clip_read_config" not in pre:
    warnings.warn(f"{path} (format_version {metadata.get('format_version')}) does not record how the "
                  "training clips were read; using the clip reader's defaults. Export again to fix this.")
    pre["clip_read_config"] = {"num_frames": pre["num_frames"], "frame_size": max(112, pre["frame_size"]),
                               "sample_rate": pre["sample_rate"],
                               "max_audio_seconds": pre["max_audio_seconds"]}
  return metadata


def tokenizer_dir(export_dir: str) -> str:
  path = os.path.join(export_dir, TOKENIZER_DIR)
  if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
      os.path.join(path, "vocab.txt")):
    raise FileNotFoundError(f"{path} holds no tokenizer; export again (python -m mer_jax.export) or copy "
                            "the export's tokenizer/ folder next to the model.")
  return path


def output_order(metadata: dict) -> list[str]:
  return [o["name"] for o in metadata["outputs"]]


def task_names(metadata: dict) -> Sequence[str]:
  return list(metadata["labels"])

