"""Builds and registers the C++ CPU kernels (`cpu_kernels_convs.cc`, `cpu_kernels_sums.cc`, `cpu_kernels.h`).

The kernels are compiled on first use with the system's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`) against
the FFI headers that jaxlib ships, and cached under `$MER_JAX_KERNEL_CACHE` (default `~/.cache/mer_jax/kernels`),
keyed by the sources, the jaxlib version, the compiler and the CPU. `available()` says whether they can run here;
whether the model uses them is decided once per run by `mer_jax.ops.choose` (the `cpu_ffi` form), never here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

SOURCES = tuple(
  pathlib.Path(__file__).with_name(name) for name in ("cpu_kernels.h", "cpu_kernels_convs.cc", "cpu_kernels_sums.cc")
)
FORWARD_TARGET, BACKWARD_TARGET = "mer_jax_depthwise_forward", "mer_jax_depthwise_backward"
ONE_CHANNEL_KERNEL_GRAD_TARGET = "mer_jax_one_channel_kernel_grad"
ONE_CHANNEL_INPUT_GRAD_TARGET = "mer_jax_one_channel_input_grad"
CONV_KERNEL_GRAD_TARGET = "mer_jax_conv_kernel_grad"
CHANNEL_SUMS_TARGET = "mer_jax_channel_sums"
FRAME_GATHER_TARGET = "mer_jax_frame_gather"
FRAME_GATHER_SELECTION_GRAD_TARGET = "mer_jax_frame_gather_selection_grad"


def cache_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "mer_jax" / "kernels"
  return pathlib.Path(os.environ.get("MER_JAX_KERNEL_CACHE") or default)


def find_compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
  except OSError:
    return platform.processor() + platform.machine()


def _compile(compiler: str, output: pathlib.Path) -> None:
  """Builds the shared library at `output` (atomically: concurrent processes may build it too)."""
  base = [
    compiler,
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-I",
    jax.ffi.include_dir(),
    *(str(path) for path in SOURCES if path.suffix == ".cc"),
  ]
  output.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
    built = pathlib.Path(scratch) / output.name
    errors = ""
    for tuning in (["-march=native"], []):  # some compilers or CPUs refuse -march=native
      result = subprocess.run(base + tuning + ["-o", str(built)], capture_output=True, text=True)
      if result.returncode == 0:
        os.replace(built, output)
        return
      errors = result.stderr
    raise RuntimeError(f"{compiler} could not build the CPU kernels:\n{errors[-2000:]}")


@functools.lru_cache(maxsize=None)
def library_path() -> pathlib.Path | None:
  """The built kernel library, building it if needed; None (with a logged reason) when that fails."""
  compiler = find_compiler()
  if compiler is None:
    logging.warning("No C++ compiler found (set $CXX or install g++): the CPU kernels cannot be built.")
    return None
  import jaxlib

  key = hashlib.sha256(
    b"\0".join(
      [
        *(path.read_bytes() for path in SOURCES),
        jaxlib.__version__.encode(),
        compiler.encode(),
        _cpu_signature().encode(),
      ]
    )
  ).hexdigest()[:16]
  path = cache_dir() / f"cpu_kernels-{key}.so"
  if not path.exists():
    try:
      _compile(compiler, path)
    except (OSError, RuntimeError) as error:
      logging.warning("CPU kernels not built: %s", error)
      return None
  return path


@functools.lru_cache(maxsize=None)
def register() -> bool:
  """Loads the built library and registers its FFI targets with XLA; False when it cannot be built."""
  import ctypes

  path = library_path()
  if path is None:
    return False
  library = ctypes.cdll.LoadLibrary(str(path))
  for target, symbol in (
    (FORWARD_TARGET, library.MerJaxDepthwiseForward),
    (BACKWARD_TARGET, library.MerJaxDepthwiseBackward),
    (ONE_CHANNEL_KERNEL_GRAD_TARGET, library.MerJaxOneChannelKernelGrad),
    (ONE_CHANNEL_INPUT_GRAD_TARGET, library.MerJaxOneChannelInputGrad),
    (CONV_KERNEL_GRAD_TARGET, library.MerJaxConvKernelGrad),
    (CHANNEL_SUMS_TARGET, library.MerJaxChannelSums),
    (FRAME_GATHER_TARGET, library.MerJaxFrameGather),
    (FRAME_GATHER_SELECTION_GRAD_TARGET, library.MerJaxFrameGatherSelectionGrad),
  ):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
  return True


def available() -> bool:
  """Whether the kernels can run here: built (or buildable) and registered with XLA."""
  return register()


def unavailable_reason() -> str:
  """Why `available()` is False, for error messages and the launch log."""
  if find_compiler() is None:
    return "no C++ compiler found (install g++ or set $CXX)"
  return "the C++ kernels did not build (the warning logged above says why)"
