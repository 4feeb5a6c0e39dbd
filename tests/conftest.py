"""Shared test set-up: quiet TensorFlow, keep JAX on the CPU, make the repo importable."""

import os
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests that take more than ~20 s (still run in CI)")


@pytest.fixture(params=["kernels", "xla_ops"])
def form(request, monkeypatch):
  """Runs a test with the CPU's FFI kernels (mer_jax.ops.cpu.kernels, where this machine can build them) and
  with the XLA-op forms that every other backend runs."""
  from mer_jax.ops.cpu import kernels as cpu_kernels
  if request.param == "xla_ops":
    monkeypatch.setenv(cpu_kernels.ENABLE_VARIABLE, "0")
  elif not cpu_kernels.available():
    pytest.skip("no C++ compiler here: the kernels cannot be built")
  return request.param
