"""The C++ CPU kernels as JAX functions: `jax.ffi.ffi_call`s of the targets `build` registers, with their VJPs.

- Depthwise convs: one pass per image for the forward (taps summed in registers) and one backward pass that gives
  both the input and the kernel gradient. XLA:CPU has no fast depthwise conv.
- `channel_sums`: per-channel sum of a and of a * b in one read (BatchNorm statistics and parameter gradients),
  where XLA:CPU rewrites long reductions into trees that cannot fuse their input.
- The frame trunks' convs: `one_channel_kernel_grad` (grey-input convs: all taps in one pass),
  `one_channel_input_grad` (places the stem's input-gradient shares) and `conv_kernel_grad` (convs over few
  channels, where XLA transposes both operands first).
- `frame_gather`: the top-K selection's product with the uint8 frames and its gradient, reading bytes.

All take float32 operands (uint8 frames for the gather), run on XLA's intra-op threads and add per-thread partial
sums in a fixed order (deterministic). The `cpu_ffi` ops form (`mer_jax.ops.cpu_ffi`) calls them; nothing else
should. Why each exists and what it gained: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.ops.cpu import build
from mer_jax.ops.cpu.build import (
  CHANNEL_SUMS_TARGET,
  CONV_KERNEL_GRAD_TARGET,
  FORWARD_TARGET,
  BACKWARD_TARGET,
  FRAME_GATHER_SELECTION_GRAD_TARGET,
  FRAME_GATHER_TARGET,
  ONE_CHANNEL_INPUT_GRAD_TARGET,
  ONE_CHANNEL_KERNEL_GRAD_TARGET,
)


def _ffi_call(target: str, result_shape_dtypes, **kwargs):
  """`jax.ffi.ffi_call` of one of the library's targets, building and registering the library first."""
  if not build.register():
    raise RuntimeError(f"The CPU kernels are not available: {build.unavailable_reason()}; use the 'xla' ops form.")
  return jax.ffi.ffi_call(target, result_shape_dtypes, **kwargs)


def output_shape(x_shape, kernel_size: int, stride: int, pad: int) -> tuple[int, int, int, int]:
  batch, height, width, channels = x_shape
  return (
    batch,
    (height + 2 * pad - kernel_size) // stride + 1,
    (width + 2 * pad - kernel_size) // stride + 1,
    channels,
  )


def forward(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise: (N, H, W, C) float32 x (k, k, 1, C) -> (N, Ho, Wo, C), zero padding `pad`."""
  shape = output_shape(x.shape, kernel.shape[0], stride, pad)
  call = _ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  return call(x, kernel, stride=np.int64(stride), pad=np.int64(pad))


def backward(
  x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int, pad: int
) -> tuple[jax.Array, jax.Array]:
  """Depthwise: (input gradient (N, H, W, C), kernel gradient (k, k, 1, C)) in one pass over each image."""
  call = _ffi_call(
    BACKWARD_TARGET,
    (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(kernel.shape, jnp.float32)),
    vmap_method="sequential",
  )
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
  return _ffi_call(CHANNEL_SUMS_TARGET, (out, out), vmap_method="sequential")(a, b)


def one_channel_kernel_grad(
  x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int, pad: int
) -> jax.Array:
  """Kernel gradient (k, k, 1, C) of a conv from one input channel, x (N, H, W, 1) float32, given its output
  gradient (N, Ho, Wo, C); `kernel` gives the shape."""
  call = _ffi_call(
    ONE_CHANNEL_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(kernel.shape, jnp.float32), vmap_method="sequential"
  )
  return call(x, kernel, output_grad, stride=np.int64(stride), pad=np.int64(pad))


def one_channel_input_grad(tap_grads: jax.Array, stride: int, pad: int, height: int, width: int) -> jax.Array:
  """Input gradient (N, H, W, 1) of a grey-input conv from its taps' shares (N, Ho, Wo, k*k): each share
  added to the pixel its tap read (`xla.grey_conv_input_grad`'s placing of the k*k planes)."""
  call = _ffi_call(
    ONE_CHANNEL_INPUT_GRAD_TARGET,
    jax.ShapeDtypeStruct((tap_grads.shape[0], height, width, 1), jnp.float32),
    vmap_method="sequential",
  )
  return call(tap_grads, stride=np.int64(stride), pad=np.int64(pad))


def conv_kernel_grad(x: jax.Array, kernel: jax.Array, output_grad: jax.Array, stride: int, pad: int) -> jax.Array:
  """Kernel gradient (k, k, Ci, Co) of a conv, x (N, H, W, Ci) float32, from its output gradient
  (N, Ho, Wo, Co); `kernel` gives the shape. For convs over few channels, where XLA:CPU's conv gradient
  transposes both operands first."""
  call = _ffi_call(CONV_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(kernel.shape, jnp.float32), vmap_method="sequential")
  return call(x, kernel, output_grad, stride=np.int64(stride), pad=np.int64(pad))


def _frame_gather(selection: jax.Array, frames: jax.Array) -> jax.Array:
  batch, slots, _ = selection.shape
  pixels = int(np.prod(frames.shape[2:]))
  call = _ffi_call(
    FRAME_GATHER_TARGET, jax.ShapeDtypeStruct((batch, slots, pixels), jnp.float32), vmap_method="sequential"
  )
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
  call = _ffi_call(
    FRAME_GATHER_SELECTION_GRAD_TARGET, jax.ShapeDtypeStruct(selection.shape, jnp.float32), vmap_method="sequential"
  )
  selection_grad = call(selection, frames, output_grad.reshape(batch, slots, -1))
  return selection_grad, np.zeros(frames.shape, jax.dtypes.float0)


frame_gather.defvjp(_frame_gather_forward, _frame_gather_backward)
