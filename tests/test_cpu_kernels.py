"""The FFI kernels (depthwise convs, channel sums, grey-input kernel gradient, frame gather): built from source
here, equal to the XLA-op forms, chosen by the model on the CPU."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.ops.cpu import kernels as cpu_kernels
from mer_jax.models import mobilenet_v3
from mer_jax.models import frame_selector as topk

needs_compiler = pytest.mark.skipif(cpu_kernels.find_compiler() is None, reason="no C++ compiler here")


def _inputs(shape, kernel_size, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, shape[-1])), jnp.float32)
  return x, kernel


# Channel counts cover every block path of the kernels: 4, 2 and 1 vectors of 8, and single channels
# (45 = 32 + 8 + 5, 16 = 2 x 8, 3 = scalars only). Odd, even and non-square maps; strides 1 and 2.
@needs_compiler
@pytest.mark.parametrize("shape,kernel_size,stride", [
    ((3, 9, 7, 45), 3, 2), ((2, 8, 8, 16), 3, 1), ((2, 7, 7, 40), 5, 1), ((2, 14, 11, 24), 5, 2),
    ((1, 4, 4, 3), 5, 1), ((2, 5, 6, 72), 3, 2), ((2, 3, 3, 8), 5, 2)])
def test_kernels_equal_the_xla_op_form(shape, kernel_size, stride):
  assert cpu_kernels.available()
  x, kernel = _inputs(shape, kernel_size, seed=sum(shape) + kernel_size)
  pad = (kernel_size - 1) // 2

  def loss(conv, x, kernel):  # a nonlinear loss, so the output gradient differs at every position
    y = conv(x, kernel, stride, pad)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1], dtype=y.dtype))

  expected = mobilenet_v3.shifted_slices_depthwise_conv(x, kernel, stride, pad)
  got = jax.jit(cpu_kernels.depthwise_conv, static_argnums=(2, 3))(x, kernel, stride, pad)
  assert got.shape == expected.shape == cpu_kernels.output_shape(shape, kernel_size, stride, pad)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  ours = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(cpu_kernels.depthwise_conv, x, kernel)
  reference = jax.grad(loss, argnums=(1, 2))(mobilenet_v3.shifted_slices_depthwise_conv, x, kernel)
  np.testing.assert_allclose(ours[0], reference[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5, atol=1e-3)
  assert float(jnp.abs(ours[0]).min()) >= 0 and float(jnp.abs(ours[1]).max()) > 0.1


@needs_compiler
def test_backward_is_deterministic_across_threads():
  """Images are split between threads; the kernel-gradient partials are added in a fixed order."""
  x, kernel = _inputs((64, 14, 14, 40), 5, seed=1)
  output_grad = jnp.asarray(np.random.default_rng(2).normal(size=(64, 7, 7, 40)), jnp.float32)
  backward = jax.jit(cpu_kernels.backward, static_argnums=(3, 4))
  first, second = backward(x, kernel, output_grad, 2, 2), backward(x, kernel, output_grad, 2, 2)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


# Grey inputs (Ci = 1: `one_channel_kernel_grad`) and several input channels (`conv_kernel_grad`: blocks of 4
# and single ones, 5 = 4 + 1, 3 = singles); output channels through every block path (45 = 32 + 8 + 5); odd
# and non-square maps; the frame trunks' shapes (8 -> 16, 16 -> 32, stride 2).
@needs_compiler
@pytest.mark.parametrize("kernel_grad,shape,out_channels,kernel_size,stride", [
    ("one_channel_kernel_grad", (2, 9, 7, 1), 45, 3, 2), ("one_channel_kernel_grad", (2, 8, 8, 1), 16, 3, 1),
    ("one_channel_kernel_grad", (3, 11, 12, 1), 8, 5, 2), ("one_channel_kernel_grad", (2, 6, 6, 1), 3, 3, 2),
    ("conv_kernel_grad", (3, 9, 7, 5), 45, 3, 2), ("conv_kernel_grad", (2, 8, 8, 3), 16, 3, 1),
    ("conv_kernel_grad", (2, 11, 10, 6), 24, 5, 2), ("conv_kernel_grad", (4, 14, 14, 8), 16, 3, 2),
    ("conv_kernel_grad", (2, 7, 7, 16), 32, 3, 2)])
def test_conv_kernel_grads_equal_the_conv_gradient(kernel_grad, shape, out_channels, kernel_size, stride):
  """The frame trunks' conv kernel gradients (stem, scorer, evidence trunk) equal autodiff of XLA's conv."""
  assert cpu_kernels.available()
  rng = np.random.default_rng(out_channels + kernel_size)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, shape[-1], out_channels)), jnp.float32)
  pad = (kernel_size - 1) // 2
  output, conv_vjp = jax.vjp(lambda kernel: mobilenet_v3.plain_conv(x, kernel, stride, pad), kernel)
  output_grad = jnp.asarray(rng.normal(size=output.shape), jnp.float32)
  got = jax.jit(getattr(cpu_kernels, kernel_grad), static_argnums=(3, 4))(x, kernel, output_grad, stride, pad)
  np.testing.assert_allclose(got, conv_vjp(output_grad)[0], rtol=1e-5, atol=1e-4)
  assert float(jnp.abs(got).max()) > 0.1


# Positions not a multiple of the kernel's 128-position tiles; channels through every block path; one
# (N, H, W, C) map as BatchNorm passes them; offsets so that sums of squares are large.
@needs_compiler
@pytest.mark.parametrize("shape", [(3, 5, 7, 45), (1000, 3), (2, 130, 72), (64, 14, 14, 40), (7, 1)])
def test_channel_sums_equal_float64_sums(shape):
  rng = np.random.default_rng(sum(shape))
  a = rng.normal(size=shape) * 2.0 + 5.0
  b = rng.normal(size=shape)
  sums = jax.jit(cpu_kernels.channel_sums)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  a32, b32 = np.asarray(a, np.float32).astype(np.float64), np.asarray(b, np.float32).astype(np.float64)
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(sums[0], a32.sum(axes), rtol=1e-6)
  np.testing.assert_allclose(sums[1], (a32 * b32).sum(axes), rtol=1e-5, atol=1e-3)
  again = jax.jit(cpu_kernels.channel_sums)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  for first, second in zip(sums, again):  # partial sums added in a fixed order
    np.testing.assert_array_equal(first, second)


# Pixels per frame not a multiple of the vector width (7 x 9 x 3 = 189); more slots than frames; one frame.
@needs_compiler
@pytest.mark.parametrize("batch,slots,frames,frame_shape", [
    (3, 4, 12, (16, 16, 1)), (2, 5, 3, (7, 9, 3)), (2, 2, 1, (5, 5, 1))])
def test_frame_gather_equals_the_einsum_and_its_selection_gradient(batch, slots, frames, frame_shape):
  rng = np.random.default_rng(batch * slots + frames)
  pixels = jnp.asarray(rng.integers(0, 256, (batch, frames) + frame_shape), jnp.uint8)
  selection = jnp.asarray(rng.normal(size=(batch, slots, frames)), jnp.float32)
  selection = selection.at[0, 0].set(0.0)  # a slot with no frame at all: zeros
  output_grad = jnp.asarray(rng.normal(size=(batch, slots) + frame_shape), jnp.float32)

  def vjp(gather, selection):
    out, pullback = jax.vjp(lambda s: gather(s, pixels), selection)
    return out, pullback(output_grad)[0]

  got, got_grad = jax.jit(functools.partial(vjp, cpu_kernels.frame_gather))(selection)
  expected, expected_grad = vjp(topk.einsum_gather_frames, selection)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(got[0, 0], 0.0)
  np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-2)
  assert float(jnp.abs(got_grad).max()) > 1.0
  # A one-hot selection (the hard top-K) copies the chosen frames exactly.
  one_hot = jax.nn.one_hot(rng.integers(0, frames, (batch, slots)), frames, dtype=jnp.float32)
  np.testing.assert_array_equal(cpu_kernels.frame_gather(one_hot, pixels),
                                topk.einsum_gather_frames(one_hot, pixels))


@needs_compiler
def test_the_model_gathers_uint8_frames_with_the_kernel_and_float_frames_with_the_einsum(monkeypatch):
  selection = jnp.ones((1, 2, 3), jnp.float32)
  trace = lambda frames: str(jax.make_jaxpr(lambda s, f: topk.gather_frames(s, f))(selection, frames))
  assert cpu_kernels.FRAME_GATHER_TARGET in trace(jnp.zeros((1, 3, 4, 4, 1), jnp.uint8))
  assert cpu_kernels.FRAME_GATHER_TARGET not in trace(jnp.zeros((1, 3, 4, 4, 1), jnp.float32))
  monkeypatch.setenv(cpu_kernels.ENABLE_VARIABLE, "0")
  assert cpu_kernels.FRAME_GATHER_TARGET not in trace(jnp.zeros((1, 3, 4, 4, 1), jnp.uint8))


def _traced(x, kernel):
  # A fresh function per call: jax caches traces by function, and the choice is made while tracing.
  return str(jax.make_jaxpr(lambda x, kernel: mobilenet_v3.depthwise_conv(x, kernel, 1, 1))(x, kernel))


@needs_compiler
def test_model_uses_the_kernels_on_the_cpu_and_not_when_turned_off(monkeypatch):
  x, kernel = _inputs((2, 8, 8, 16), 3, seed=3)
  assert cpu_kernels.FORWARD_TARGET in _traced(x, kernel)
  assert cpu_kernels.describe() == "FFI kernels"  # what launch.py logs
  # bf16 compute keeps the XLA-op form.
  assert cpu_kernels.FORWARD_TARGET not in _traced(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  monkeypatch.setenv(cpu_kernels.ENABLE_VARIABLE, "0")
  assert not cpu_kernels.available()
  assert cpu_kernels.describe() == "XLA ops (MER_JAX_NATIVE_KERNELS=0)"
  assert cpu_kernels.FORWARD_TARGET not in _traced(x, kernel)


@needs_compiler
def test_xla_op_forms_trace_no_ffi_call_and_restore_the_setting(monkeypatch):
  """FLOP counts (benchmarks) trace the model under xla_op_forms(): XLA's cost analysis sees into no FFI call."""
  monkeypatch.delenv(cpu_kernels.ENABLE_VARIABLE, raising=False)
  x, kernel = _inputs((2, 8, 8, 16), 3, seed=4)
  with cpu_kernels.xla_op_forms():
    assert "mer_jax_" not in _traced(x, kernel)
  assert cpu_kernels.FORWARD_TARGET in _traced(x, kernel)  # the setting is back
  monkeypatch.setenv(cpu_kernels.ENABLE_VARIABLE, "1")
  with cpu_kernels.xla_op_forms():
    assert not cpu_kernels.available()
  assert cpu_kernels.available()


@needs_compiler
def test_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MER_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  cpu_kernels.library_path.cache_clear()
  try:
    path = cpu_kernels.library_path()
    assert path is not None and path.parent == tmp_path / "cache" and path.stat().st_size > 0
    built_at = path.stat().st_mtime_ns
    cpu_kernels.library_path.cache_clear()
    assert cpu_kernels.library_path() == path and path.stat().st_mtime_ns == built_at  # not rebuilt

    # A compiler that fails: no library, a warning that says which form runs instead.
    monkeypatch.setenv("MER_JAX_KERNEL_CACHE", str(tmp_path / "other"))
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    cpu_kernels.library_path.cache_clear()
    with caplog.at_level(logging.WARNING):
      assert cpu_kernels.library_path() is None
    assert "XLA-op forms" in caplog.text and "broken compiler" in caplog.text
    assert not list((tmp_path / "other").glob("*.so"))
  finally:
    cpu_kernels.library_path.cache_clear()
