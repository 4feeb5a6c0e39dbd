"""The export contract: what an exported model takes and returns, and what travels with it.

An export takes the 7 model inputs of the batch contract (`INPUT_NAMES`, in this order) and returns
`output_names(...)`: probs_<task> (B, C) per task, frame_scores (B, T), selected_indices (B, K) int32,
reliability_video / reliability_audio (B,), gate (B, D). Beside the model file lie metadata.json (inputs,
outputs, labels, preprocessing) and tokenizer/. This module is what a consumer of an export needs, so it
imports neither JAX nor TensorFlow: prediction on an ONNX or TFLite file reads it without either.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

INPUT_NAMES = ("frames", "audio", "audio_mask", "text_ids", "text_mask", "has_video", "has_audio")
SIGNAL_NAMES = ("frame_scores", "selected_indices", "reliability_video", "reliability_audio", "gate")
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2  # 2: adds preprocessing.clip_read_config and preprocessing.data
TOKENIZER_DIR = "tokenizer"


def output_names(source: Any) -> tuple[str, ...]:
  """The export's outputs in order, from a run's config (config.model.tasks) or a read metadata.json dict.

  Exports made before the gate output existed list fewer outputs in their metadata.
  """
  if isinstance(source, dict):
    return tuple(o["name"] for o in source["outputs"])
  return tuple(f"probs_{task}" for task in source.model.tasks) + SIGNAL_NAMES


def task_names(metadata: dict) -> Sequence[str]:
  """The tasks of an export, in the order of its probs_<task> outputs."""
  return list(metadata["labels"])


def export_config(config):
  """A copy of a run's config whose model computes in float32 (a bfloat16 training dtype is no edge format)."""
  import ml_collections

  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = "float32"
  return config


# ----------------------------------------------------------------------------- reading an export


def read_metadata(export_dir: str) -> dict:
  """metadata.json of an export folder, checked for what prediction needs (older formats filled in)."""
  path = os.path.join(export_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found: an exported model needs the metadata.json written beside "
      "it by `python -m mer_jax.export --workdir RUN --out DIR`; keep the export "
      "folder together (model files, metadata.json, tokenizer/)."
    )
  with open(path) as f:
    metadata = json.load(f)
  pre = metadata.get("preprocessing", {})
  if "data" not in pre:  # format_version 1: rebuild the data fields from the flat entries
    log_mel = pre.get("log_mel", {})
    pre["data"] = {
      "num_frames": pre["num_frames"],
      "frame_size": pre["frame_size"],
      "sample_rate": pre["sample_rate"],
      "max_audio_seconds": pre["max_audio_seconds"],
      "num_mel_bins": log_mel.get("num_mel_bins", 64),
      "mel_frame_length": log_mel.get("frame_length"),
      "mel_frame_step": log_mel.get("frame_step"),
      "fft_length": log_mel.get("fft_length"),
      "mel_lower_hz": log_mel.get("lower_hz"),
      "mel_upper_hz": log_mel.get("upper_hz"),
      "max_text_length": pre["max_text_length"],
      "context_turns": 0,
      "context_future_turns": 0,
    }
    pre["data"] = {k: v for k, v in pre["data"].items() if v is not None}
  if "clip_read_config" not in pre:
    warnings.warn(
      f"{path} (format_version {metadata.get('format_version')}) does not record how the "
      "training clips were read; using the clip reader's defaults. Export again to fix this."
    )
    pre["clip_read_config"] = {
      "num_frames": pre["num_frames"],
      "frame_size": max(112, pre["frame_size"]),
      "sample_rate": pre["sample_rate"],
      "max_audio_seconds": pre["max_audio_seconds"],
    }
  return metadata


def tokenizer_dir(export_dir: str) -> str:
  """The export's tokenizer/ folder; raises FileNotFoundError when it holds no tokenizer."""
  path = os.path.join(export_dir, TOKENIZER_DIR)
  if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "vocab.txt")):
    raise FileNotFoundError(
      f"{path} holds no tokenizer; export again (python -m mer_jax.export) or copy "
      "the export's tokenizer/ folder next to the model."
    )
  return path
