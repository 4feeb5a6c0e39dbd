"""C++ kernels for XLA:CPU behind the XLA FFI (`cpu_kernels_convs.cc`, `cpu_kernels_sums.cc`, sharing
`cpu_kernels.h`), compiled on first use, for the places where XLA:CPU is slow on this model.

- Depthwise convs: XLA:CPU has no fast depthwise conv. The grouped conv takes a generic path, and the
  shifted-slice form (`mobilenet_v3.shifted_slices_depthwise_conv`) needs k*k passes over the output gradient
  in the backward. The kernels read each image once per pass: the forward sums its taps per output position,
  and one backward pass gives both the input and the kernel gradient.
- `channel_sums`: XLA:CPU's long reductions are slow too (`batch_norm`); this gives a BatchNorm's statistics,
  or its parameter gradients, in one read.
- The frame trunks' convs: `one_channel_kernel_grad` (grey-input convs: stem, frame scorer, evidence trunk)
  and `conv_kernel_grad` (their later convs over 8-32 channels), where XLA transposes both operands first;
  `one_channel_input_grad` places the stem's input-gradient shares, which XLA did as k*k padded planes.
- `frame_gather`: the top-K selection's product with the uint8 frames, and its gradient, where XLA works on
  a float copy of all frames.

All run on XLA's intra-op threads and add their per-thread partial sums in a fixed order (deterministic).

The kernels are built with the system's C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`) against the FFI
headers that jaxlib ships, and cached under `$MER_JAX_KERNEL_CACHE` (default `~/.cache/mer_jax/kernels`),
keyed by the sources, the jaxlib version and the CPU. Without a compiler, or with `MER_JAX_NATIVE_KERNELS=0`,
`available()` is False and the model keeps its XLA-op forms: same values, slower training."""

from __future__ import annotations

import contextlib
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
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(pathlib.Path(__file__).with_name(name)
                for name in ("cpu_kernels.h", "cpu_kernels_convs.cc", "cpu_kernels_sums.cc"))
FORWARD_TARGET, BACKWARD_TARGET = "mer_jax_depthwise_forward", "mer_jax_depthwise_backward"
ONE_CHANNEL_KERNEL_GRAD_TARGET = "mer_jax_one_channel_kernel_grad"
ONE_CHANNEL_INPUT_GRAD_TARGET = "mer_jax_one_channel_input_grad"
CONV_KERNEL_GRAD_TARGET = "mer_jax_conv_kernel_grad"
CHANNEL_SUMS_TARGET = "mer_jax_channel_sums"
FRAME_GATHER_TARGET = "mer_jax_frame_gather"
FRAME_GATHER_SELECTION_GRAD_TARGET = "mer_jax_frame_gather_selection_grad"
ENABLE_VARIABLE = "MER_JAX_NATIVE_KERNELS"


def enabled() -> bool:
  """False when the user turned the native kernels off (`MER_JAX_NATIVE_KERNELS=0`)."""
  return os.environ.get(ENABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


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
  base = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir(),
          *(str(path) for path in SOURCES if path.suffix == ".cc")]
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
    logging.warning("No C++ compiler found (set $CXX or install g++): depthwise convs and BatchNorm on the "
                    "CPU use their slower XLA-op forms.")
    return None
  import jaxlib
  key = hashlib.sha256(b"\0".join([*(path.read_bytes() for path in SOURCES), jaxlib.__version__.encode(),
                                   compiler.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:16]
  path = cache_dir() / f"cpu_kernels-{key}.so"
  if not path.exists():
    try:
      _compile(compiler, path)
    except (OSError, RuntimeError) as error:
      logging.warning("CPU kernels not built, using the XLA-op forms: %s", error)
      return None
  return path


@functools.lru_cache(maxsize=None)
def _register() -> bool:
  import ctypes
  path = library_path()
  if path is None:
    return False
  library = ctypes.cdll.LoadLibrary(str(path))
  for target, symbol in ((FORWARD_TARGET, library.MerJaxDepthwiseForward),
                         (BACKWARD_TARGET, library.MerJaxDepthwiseBackward),
                         (ONE_CHANNEL_KERNEL_GRAD_TARGET, library.MerJaxOneChannelKernelGrad),
                         (ONE_CHANNEL_INPUT_GRAD_TARGET, library.MerJaxOneChannelInputGrad),
                         (CONV_KERNEL_GRAD_TARGET, library.MerJaxConvKernelGrad),
                         (CHANNEL_SUMS_TARGET, library.MerJaxChannelSums),
                         (FRAME_GATHER_TARGET, library.MerJaxFrameGather),
                         (FRAME_GATHER_SELECTION_GRAD_TARGET, library.MerJaxFrameGatherSelectionGrad)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
  return True


@contextlib.contextmanager
def xla_op_forms():
  """While tracing inside this block, the model takes its XLA-op forms, not the FFI kernels (same math). For
  FLOP counts: XLA's cost analysis counts nothing inside an FFI call. Trace a fresh function in it (jax
  caches traces by function)."""
  previous = os.environ.get(ENABLE_VARIABLE)
  os.environ[ENABLE_VARIABLE] = "0"
  try:
    yield
  finally:
    if previous is None:
      os.environ.pop(ENABLE_VARIABLE, None)
    else:
      os.environ[ENABLE_VARIABLE] = previous


def available() -> bool:
  """Whether the kernels can run here: enabled, built, registered with XLA."""
  return enabled() and _register()


def applies(*arrays: jax.Array) -> bool:
  """Whether the model should call the kernels for these operands: on one CPU device, all float32,
  kernels available. (An FFI call has no partitioning rule: on a mesh of several devices XLA would gather
  the whole batch to each, so the XLA-op forms, which it partitions, are kept there.)"""
  return (jax.default_backend() == "cpu" and jax.device_count() == 1
          and all(a.dtype == jnp.float32 for a in arrays) and available())


def describe() -> str:
  """For the launch log: which form CPU training runs (the FFI kernels or the XLA-op forms), and how to get the
  fast one."""
  if not enabled():
    return f"XLA ops ({ENABLE_VARIABLE}=0)"
  if jax.device_count() > 1:
    return "XLA ops (several devices: XLA partitions those over the mesh, not the FFI kernels)"
  if available():
    return "FFI kernels"
  return "XLA ops (could not build the CPU kernels: install a C++ compiler, e.g. g++, for faster CPU training)"


def output_shape(x_shape, kernel_size: int, stride: int, pad: int) -> tuple[int, int, int, int]:
  batch, height, width, channels = x_shape
  return (batch, (height + 2 * pad - kernel_size) // stride + 1, (width + 2 * pad - kernel_size) // stride + 1,
          channels)


def forward(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise: (N, H, W, C) float32 x (k, k, 1, C) -> (N, Ho, Wo, C), zero padding `pad`."""
  shape = output_shape(x.shape, kernel.shape[0], stride, pad)
  call = jax.ffi.ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  return call(x, kernel, stride=np.int64(stride), pad=np.int64(pad))


def backward(x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int,
             pad: int) -> tuple[jax.Array, jax.Array]:
  """Depthwise: (input gradient (N, H, W, C), kernel gradient (k, k, 1, C)) in one pass over each image."""
  call = jax.ffi.ffi_call(BACKWARD_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                            jax.ShapeDtypeStruct(kernel.shape, jnp.float32)),
                          vmap_method="sequential")
  return call(x, kernel, output_grad, stride=np.int64(stride), pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C), float32, on the FFI kernels."""
  return forward(x, kernel, stride, pad)


def _depthwise_conv_forward(x, kernel, stride, pad):
  return forward(x, kernel, stride, pad), (x, kernel)


def _depthwise_conv_backward(stride, pad, residuals, output_grad):
  x, kernel = residuals
  return backward(x, kernel, output_grad, stride, pad)


depthwise_conv.defvjp(_depthwise_conv_forward, _depthwise_conv_backward)


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., C) float32 twice -> (sum of a, sum of a * b) over all positions, each (C,) float32."""
  channels = a.shape[-1]
  out = jax.ShapeDtypeStruct((channels,), jnp.float32)
  return jax.ffi.ffi_call(CHANNEL_SUMS_TARGET, (out, out), vmap_method="sequential")(a, b)


def one_channel_kernel_grad(x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int,
                            pad: int) -> jax.Array:
  """Kernel gradient (k, k, 1, C) of a conv from one input channel, x (N, H, W, 1) float32, given its output
  gradient (N, Ho, Wo, C); `kernel` gives the shape."""
  call = jax.ffi.ffi_call(ONE_CHANNEL_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, kernel, output_grad, stride=np.int64(stride), pad=np.int64(pad))



def one_channel_input_grad(tap_grads: jax.Array, stride: int, pad: int, height: int, width: int) -> jax.Array:
  """Input gradient (N, H, W, 1) of a grey-input conv from its taps' shares (N, Ho, Wo, k*k): each share
  added to the pixel its tap read (`mobilenet_v3.single_channel_input_grad`'s placing of the k*k planes)."""
  call = jax.ffi.ffi_call(ONE_CHANNEL_INPUT_GRAD_TARGET,
                          jax.ShapeDtypeStruct((tap_grads.shape[0], height, width, 1), jnp.float32),
                          vmap_method="sequential")
  return call(tap_grads, stride=np.int64(stride), pad=np.int64(pad))


def conv_kernel_grad(x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int, pad: int) -> jax.Array:
  """Kernel gradient (k, k, Ci, Co) of a conv, x (N, H, W, Ci) float32, from its output gradient
  (N, Ho, Wo, Co); `kernel` gives the shape. For convs over few channels, where XLA:CPU's conv gradient
  transposes both operands first."""
  call = jax.ffi.ffi_call(CONV_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, kernel, output_grad, stride=np.int64(stride), pad=np.int64(pad))

def _frame_gather(selection: jax.Array, frames: jax.Array) -> jax.Array:
  batch, slots, _ = selection.shape
  pixels = int(np.prod(frames.shape[2:]))
  call = jax.ffi.ffi_call(FRAME_GATHER_TARGET, jax.ShapeDtypeStruct((batch, slots, pixels), jnp.float32),
                          vmap_method="sequential")
  return call(selection, frames).reshape((batch, slots) + frames.shape[2:])


@jax.custom_vjp
def frame_gather(selection: jax.Array, frames: jax.Array) -> jax.Array:
  """(B, K, T) float32 selection, (B, T, ...) uint8 frames -> (B, K, ...) float32: each slot's weighted sum
  of the frames, read as bytes. Differentiable in the selection (the frames are integers)."""
  return _frame_gather(selection, frames)


def _frame_gather_forward(selection, frames):
  return _frame_gather(selection, frames), (selection, frames)


def _frame_gather_backward(residuals, output_grad):
  selection, frames = residuals
  batch, slots, _ = selection.shape
  call = jax.ffi.ffi_call(FRAME_GATHER_SELECTION_GRAD_TARGET, jax.ShapeDtypeStruct(selection.shape, jnp.float32),
                          vmap_method="sequential")
  selection_grad = call(selection, frames, output_grad.reshape(batch, slots, -1))
  return selection_grad, np.zeros(frames.shape, jax.dtypes.float0)


frame_gather.defvjp(_frame_gather_forward, _frame_gather_backward)
