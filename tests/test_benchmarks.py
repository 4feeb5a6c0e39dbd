"""Benchmarks run in their short modes so they do not rot; their non-timing bars are checked here.

Timings are printed, never asserted.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(module: str, *args: str) -> dict:
  result = subprocess.run([sys.executable, "-m", module, "--json", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  assert lines, f"no JSON line in the output of {module}:\n{result.stdout[-2000:]}"
  return json.loads(lines[-1])


@pytest.mark.slow
def test_model_cost_meets_its_bars():
  results = run_benchmark("benchmarks.model_cost", "--runs", "3")
  print(results)
  assert results["params_video_backbone"] == 926_720
  assert results["params_total_edge"] < 10_000_000
  assert results["params_total_base"] > results["params_total_edge"]
  assert results["flops_forward_k4"] <= 0.45 * results["flops_forward_k12"]
  # The scorer over all 12 frames plus everything else stays well below 12 backbone frames.
  assert results["flops_forward_k12"] > 12 * results["flops_backbone_one_frame"]
  assert results["latency_ms_cpu_batch1_edge"] > 0


@pytest.mark.slow
def test_data_throughput_quick_mode_runs():
  results = run_benchmark("benchmarks.data_throughput", "--quick")
  print(results)
  readers = results["reader"]
  assert readers and all(r["clips"] > 0 and r["clips_per_s"] > 0 for r in readers.values())
  assert results["tfdata_examples_per_s"] > 0
