"""The cpu_ffi ops form: the XLA form with the C++ kernels of `mer_jax.ops.cpu` where a profile named XLA:CPU slow.

Chosen by `mer_jax.ops.choose` for one CPU device with a C++ compiler. The kernels take float32 (and uint8 frames);
any other dtype runs the XLA form of the same op, so a bf16 model still works. Same values and gradients as the
reference form (tests/test_ops.py); what each kernel gained: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mer_jax.ops import reference
from mer_jax.ops import xla
from mer_jax.ops.cpu import kernels

# The grey-input kernels unroll their taps: the input-gradient placing for kernels up to 7, the kernel gradient up
# to 5 (the model's are 3); larger kernels take the XLA form.
LARGEST_PLACED_KERNEL = 7
LARGEST_GREY_KERNEL_GRAD = 5


def _all_float32(*arrays: jax.Array) -> bool:
  return all(a.dtype == jnp.float32 for a in arrays)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (N, H, W, C) x (k, k, 1, C) -> (N, Ho, Wo, C): the kernels' one-pass forward and backward."""
  if _all_float32(x, kernel):
    return kernels.depthwise_conv(x, kernel, stride, pad)
  return xla.depthwise_conv(x, kernel, stride, pad)


def channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(N, H, W, C) -> (sum of x, sum of x^2) per channel, in one read of x."""
  if _all_float32(x):
    return _kernel_channel_moments(x)
  return xla.channel_moments(x)


@jax.custom_vjp
def _kernel_channel_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return kernels.channel_sums(x, x)


_kernel_channel_moments.defvjp(lambda x: (_kernel_channel_moments(x), x), xla._moments_backward)


def scale_and_shift(x: jax.Array, multiplier: jax.Array, shift: jax.Array) -> jax.Array:
  """(..., C) * (C,) + (C,), whose parameter gradients (sum g*x, sum g) come from one kernel pass."""
  if _all_float32(x, multiplier, shift):
    return _kernel_scale_and_shift(x, multiplier, shift)
  return reference.scale_and_shift(x, multiplier, shift)


@jax.custom_vjp
def _kernel_scale_and_shift(x: jax.Array, multiplier: jax.Array, shift: jax.Array) -> jax.Array:
  return x * multiplier + shift


def _scale_and_shift_backward(x_and_multiplier, output_grad):
  x, multiplier = x_and_multiplier
  shift_grad, multiplier_grad = kernels.channel_sums(output_grad, x)
  return output_grad * multiplier, multiplier_grad, shift_grad


_kernel_scale_and_shift.defvjp(lambda x, m, s: (_kernel_scale_and_shift(x, m, s), (x, m)), _scale_and_shift_backward)


def _place_tap_grads(tap_grads: jax.Array, stride: int, pad: int, height: int, width: int) -> jax.Array:
  kernel_size = int(round(tap_grads.shape[-1] ** 0.5))
  if _all_float32(tap_grads) and kernel_size <= LARGEST_PLACED_KERNEL:
    return kernels.one_channel_input_grad(tap_grads, stride, pad, height, width)
  return xla.place_tap_grads(tap_grads, stride, pad, height, width)


def _kernel_grad(ffi_kernel_grad, largest_kernel: int | None = None):
  """A conv's kernel gradient by `ffi_kernel_grad` for float32 operands (and kernels up to `largest_kernel`), else
  by XLA's conv gradient."""

  def kernel_grad(x, kernel, output_grad, stride, pad):
    fits = largest_kernel is None or kernel.shape[0] <= largest_kernel
    if fits and _all_float32(x, kernel, output_grad):
      return ffi_kernel_grad(x, kernel, output_grad, stride, pad)
    return xla.conv_kernel_grad(x, kernel, output_grad, stride, pad)

  return kernel_grad


grey_conv = xla.make_grey_conv(
  _place_tap_grads, _kernel_grad(kernels.one_channel_kernel_grad, LARGEST_GREY_KERNEL_GRAD)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """`reference.conv` (N, H, W, Ci) x (k, k, Ci, Co) -> (N, Ho, Wo, Co) whose kernel gradient is the kernels'
  (for the frame trunks' convs over few channels, where XLA:CPU transposes both operands first)."""
  return reference.conv(x, kernel, stride, pad)


def _conv_forward(x, kernel, stride, pad):
  return reference.conv(x, kernel, stride, pad), (x, kernel)


def _conv_backward(stride, pad, residuals, output_grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: reference.conv(x, kernel, stride, pad), x)
  kernel_grad = _kernel_grad(kernels.conv_kernel_grad)(x, kernel, output_grad, stride, pad)
  return input_vjp(output_grad)[0], kernel_grad


conv.defvjp(_conv_forward, _conv_backward)


def frame_gather(selection: jax.Array, frames: jax.Array) -> jax.Array:
  """P @ frames, (B, K, T) x (B, T, H, W, C) uint8 -> (B, K, H, W, C): the kernel reads the frames as bytes and
  skips zero weights, where XLA's dot works on a float copy of all T frames."""
  if frames.dtype == jnp.uint8 and _all_float32(selection):
    return kernels.frame_gather(selection, frames)
  return reference.einsum_frame_gather(selection, frames)
