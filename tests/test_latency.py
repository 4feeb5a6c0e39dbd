"""benchmarks/latency.py --quick --json: every runtime measured, sizes recorded (no time assertions)."""

import json

import pytest

from benchmarks import latency


@pytest.mark.slow
def test_quick_latency_reports_every_runtime(tmp_path, capsys):
  out = tmp_path / "latency.json"
  result = latency.main(["--quick", "--json", "--out", str(out)])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
  keys = [
    "onnxruntime_batch1_ms",
    "tflite_batch1_ms",
    "jax_batch1_ms",
    "onnxruntime_batch32_ms",
    "jax_batch32_ms",
    "tflite_int8_batch1_ms",
    "onnx_mb",
    "tflite_mb",
    "tflite_int8_mb",
  ]
  for key in keys:
    assert isinstance(printed[key], float) and printed[key] > 0, key
  # int8 weights: the TFLite file shrinks to well under half (fp32 ~22 MB for the edge model).
  assert printed["tflite_int8_mb"] < 0.5 * printed["tflite_mb"]
  meta = printed["meta"]
  assert meta["quick"] and (meta["num_frames"], meta["frame_size"], meta["top_k"]) == (12, 112, 4)
  assert "tflite_batch32_ms" not in printed  # --quick skips the batch-32 TFLite exports
