"""What an export says about itself: metadata.json (inputs, outputs, labels, preprocessing) + tokenizer/.

Written by `mer_jax.export.exporters` beside the model files, and read back with `contract.read_metadata`
(by `mer_jax.tools.predict`). The preprocessing section holds everything that turns a raw clip into model
inputs exactly as training saw it: the clip reader's settings of the prepared data the model was trained on
(`clip_read_config`) and the `config.data` fields the input pipeline's resize, log-mel and tokenizer read
(`data`). `class_names`, `data_fields` and `clip_read_config` also serve prediction with JAX on a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import numpy as np

from mer_jax.data import labels as labels_lib
from mer_jax.export import contract

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")
# The config.data fields that preprocessing reads (features._mel_params, resize, tokenizer, context).
DATA_FIELDS = (
  "num_frames",
  "frame_size",
  "sample_rate",
  "max_audio_seconds",
  "num_mel_bins",
  "mel_frame_length",
  "mel_frame_step",
  "fft_length",
  "mel_lower_hz",
  "mel_upper_hz",
  "max_text_length",
  "context_turns",
  "context_future_turns",
  "builder",
  "builder_config",
  # How the training data's CSVs and clips were laid out (config.data, csv_format.SOURCE_FIELDS), so that
  # prediction over a CSV with an export reads the columns and clip names the model was trained on.
  "csv_files",
  "clip_folders",
  "clip_pattern",
  "columns",
  "label_columns",
  "no_label_values",
)


def class_names(config, best: dict | None = None) -> dict[str, list[str]]:
  """Per task: the names in eval/best.json, else config.data.classes, else mer_jax/data/labels.py."""
  names = {}
  for task, count in config.model.tasks.items():
    candidates = [
      ((best or {}).get("tasks", {}).get(task) or {}).get("class_names"),
      (config.data.get("classes") or {}).get(task),
      labels_lib.TASK_CLASSES.get(task),
    ]
    found = next((list(c) for c in candidates if c and len(c) == count), None)
    if found is None:
      raise ValueError(
        f"No list of {count} class names for task {task!r}; set config.data.classes = "
        f"{{{task!r}: (...)}} or add it to mer_jax/data/labels.py."
      )
    names[task] = found
  return names


def data_fields(config) -> dict:
  """The preprocessing fields of `config.data` (those it sets) as plain JSON values."""
  data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
  return {key: (list(data[key]) if isinstance(data[key], tuple) else data[key]) for key in DATA_FIELDS if key in data}


def clip_read_config(config, data_dir: str | None = None) -> tuple[dict, str]:
  """(ClipReadConfig fields, where they came from) for the data `config` was trained on.

  The prepared data's TFDS metadata records how its clips were read (meld_csv.dataset_metadata); that is the
  reading prediction must repeat. Without prepared data (a checkpoint copied alone), the reader's
  defaults with config.data's frame count, sample rate and audio length are used, with a warning: the
  builder config may have read clips differently (e.g. 'demo' uses centre crops and exact frames).
  """
  from mer_jax.data import clip_reader, input_pipeline

  try:
    builder = input_pipeline.load_builder(config, data_dir)
    stored = (builder.info.metadata or {}).get("clip_read_config")
  except FileNotFoundError:
    stored = None
  if stored:
    return dict(stored), f"prepared data {builder.data_dir}"
  data = config.data
  fallback = clip_reader.ClipReadConfig(
    num_frames=int(data.num_frames),
    frame_size=max(112, int(data.frame_size)),
    sample_rate=int(data.get("sample_rate", 16000)),
    max_audio_seconds=float(data.get("max_audio_seconds", 10.0)),
  )
  warnings.warn(
    f"No prepared data for builder config {data.get('builder_config')!r} under data_dir "
    f"{data_dir or data.get('data_dir') or '(TFDS default)'!r}: clips are read with the clip "
    "reader's defaults, which may differ from how the training data was read. Point "
    "config.data.data_dir at the prepared data to fix this."
  )
  return dataclasses.asdict(fallback), "clip reader defaults (prepared data not found)"


def _output_meanings(config) -> list[str]:
  return [f"(batch, {n}) float32 softmax over labels[{t!r}]" for t, n in config.model.tasks.items()] + [
    f"(batch, {config.data.num_frames}) float32 text-guided score of each frame",
    f"(batch, {config.model.top_k}) int32 chosen frames, in time order",
    "(batch,) float32 in [0, 1]",
    "(batch,) float32 in [0, 1]",
    f"(batch, {config.model.width}) float32 GMU gate: the video share of each fused channel",
  ]


def write_metadata(
  config,
  variables,
  out_dir: str,
  parity: dict,
  tflite_batch_size: int = 1,
  classes: dict | None = None,
  source: dict | None = None,
  clip_config: tuple[dict, str] | None = None,
) -> dict:
  """metadata.json (inputs, outputs, labels, preprocessing, batch policy) and tokenizer/ in `out_dir`.

  `clip_config`: (ClipReadConfig fields, source) from `clip_read_config`; looked up when None.
  """
  from mer_jax.data import features
  from mer_jax.models import emotion_model as model_lib
  from mer_jax.models import minilm

  data = config.data
  spec = model_lib.input_spec(config, 1)
  tokenizer_dir = os.path.join(out_dir, contract.TOKENIZER_DIR)
  os.makedirs(tokenizer_dir, exist_ok=True)
  for name in TOKENIZER_FILES:  # the files AutoTokenizer reads; not the MiniLM weights
    if (minilm.model_dir() / name).is_file():
      shutil.copy(minilm.model_dir() / name, tokenizer_dir)
  reading, reading_source = clip_config or clip_read_config(config)
  mel = features._mel_params(config)  # the exact parameters the input pipeline uses
  metadata = {
    "format_version": contract.FORMAT_VERSION,
    "inputs": [
      {"name": n, "shape": ["batch"] + list(spec[n].shape[1:]), "dtype": str(np.dtype(spec[n].dtype))}
      for n in contract.INPUT_NAMES
    ],
    "outputs": [{"name": n, "meaning": m} for n, m in zip(contract.output_names(config), _output_meanings(config))],
    "labels": dict(classes) if classes else class_names(config),
    "preprocessing": {
      "num_frames": int(data.num_frames),
      "frame_size": int(data.frame_size),
      "frame_channels": 1,
      "frame_times": "t_i = (i + 0.5) * duration / T, grey uint8, face crop (Haar) else centre crop",
      "sample_rate": mel["sample_rate"],
      "max_audio_seconds": mel["max_seconds"],
      "audio_frames": int(spec["audio"].shape[1]),
      "log_mel": {
        **{k: mel[k] for k in ("num_mel_bins", "frame_length", "frame_step", "fft_length", "lower_hz", "upper_hz")},
        "log_offset": features.LOG_OFFSET,
        "function": "mer_jax.data.features.audio_features",
      },
      "max_text_length": int(data.max_text_length),
      "tokenizer": contract.TOKENIZER_DIR + "/",
      "text": "[CLS] utterance [SEP] (+ context [SEP]), padded with id 0; text_mask marks real tokens",
      "clip_read_config": reading,
      "clip_read_config_source": reading_source,
      "data": data_fields(config),
      "pipeline": "mer_jax.data.clip_reader.read_clip -> input_pipeline.resize_frames; "
      "features.audio_features; tokenizer.tokenize (see mer_jax/tools/predict.py)",
    },
    "batch_size": {
      "onnx": "dynamic",
      "savedmodel": "dynamic",
      "tflite": int(tflite_batch_size),
      "tflite_note": "TFLite goes through XLA HLO, which has static shapes: feed exactly "
      "this many rows (pad and drop the extra outputs).",
    },
    "files": {key: report["file"] for key, report in parity["formats"].items()},
    "model": {
      "config": json.loads(contract.export_config(config).model.to_json()),
      "parameters": model_lib.count_parameters(variables["params"]),
    },
    "source": source or {"checkpoint": None},
  }
  with open(os.path.join(out_dir, contract.METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata
