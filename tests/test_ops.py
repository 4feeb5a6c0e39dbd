"""The ops seam (mer_jax/ops): every form computes the reference form's values and gradients, the C++ kernels
build, cache and fall back, `choose` picks the form a run needs, and the exported (reference) graph holds no
custom call and no sort."""

import dataclasses
import functools
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax import ops
from mer_jax.models import layers
from mer_jax.ops import reference
from mer_jax.ops import xla
from mer_jax.ops import cpu_ffi
from mer_jax.ops.cpu import build
from mer_jax.ops.cpu import kernels
from tests.conftest import skip_or_fail

FFI_TARGETS = (
  build.FORWARD_TARGET,
  build.BACKWARD_TARGET,
  build.ONE_CHANNEL_KERNEL_GRAD_TARGET,
  build.ONE_CHANNEL_INPUT_GRAD_TARGET,
  build.CONV_KERNEL_GRAD_TARGET,
  build.CHANNEL_SUMS_TARGET,
  build.FRAME_GATHER_TARGET,
  build.FRAME_GATHER_SELECTION_GRAD_TARGET,
)


@pytest.fixture
def kernels_built():
  """For tests of the C++ kernels themselves: skip where they cannot be built (fail in CI)."""
  if not build.available():
    skip_or_fail(f"the CPU kernels cannot be built here: {build.unavailable_reason()}")


def _normal(rng, shape, scale=1.0, offset=0.0):
  return jnp.asarray(rng.normal(size=shape) * scale + offset, jnp.float32)


def _loss(y):
  """A nonlinear loss with fixed, varied weights: the output gradient differs at every position."""
  weights = jnp.cos(0.7 * jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape) + 0.5
  return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)


def _value_and_grads(fn, *args):
  """fn(*args) and the gradients of `_loss` of it with respect to every argument, jitted."""

  def loss(*args):
    y = fn(*args)
    return _loss(y), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return y, grads


def assert_close(got, want, rtol=1e-5, atol_fraction=1e-5):
  """Equal up to float32 summation order: `atol_fraction` of the largest expected magnitude."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_fraction * float(np.abs(want).max()) + 1e-7)


def _traced(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


# ----------------------------------------------------------------------------- depthwise convs

# Kernels 3 and 5, strides 1 and 2, odd, even and non-square maps; channel counts through every block path of
# the C++ kernels (45 = 32 + 8 + 5, 16 = 2 x 8, 3 = scalars only); output maps of <= 16 positions (the xla
# form's fully unrolled kernel gradient) and larger ones (its column sums).
DEPTHWISE_CASES = [
  ((3, 9, 7, 45), 3, 2),
  ((2, 8, 8, 16), 3, 1),
  ((2, 7, 7, 40), 5, 1),
  ((2, 14, 11, 24), 5, 2),
  ((1, 4, 4, 3), 5, 1),
  ((2, 5, 6, 72), 3, 2),
  ((2, 3, 3, 8), 5, 2),
  ((3, 8, 8, 4), 5, 2),
  ((3, 11, 11, 4), 3, 2),
  ((3, 10, 10, 4), 3, 1),
]


def _depthwise_inputs(shape, kernel_size):
  rng = np.random.default_rng(sum(shape) + kernel_size)
  return _normal(rng, shape), _normal(rng, (kernel_size, kernel_size, 1, shape[-1]))


@functools.cache
def _reference_depthwise(shape, kernel_size, stride):
  x, kernel = _depthwise_inputs(shape, kernel_size)
  return _value_and_grads(lambda x, k: reference.depthwise_conv(x, k, stride, (kernel_size - 1) // 2), x, kernel)


@pytest.mark.parametrize("shape,kernel_size,stride", DEPTHWISE_CASES)
def test_depthwise_conv_values_and_gradients_equal_the_reference(ops_form, shape, kernel_size, stride):
  x, kernel = _depthwise_inputs(shape, kernel_size)
  pad = (kernel_size - 1) // 2
  got, got_grads = _value_and_grads(lambda x, k: ops_form.depthwise_conv(x, k, stride, pad), x, kernel)
  want, want_grads = _reference_depthwise(shape, kernel_size, stride)
  assert got.shape == kernels.output_shape(shape, kernel_size, stride, pad)
  assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads):
    assert_close(got_grad, want_grad)
  assert float(jnp.abs(want_grads[1]).max()) > 0.1  # a real gradient, not zeros on both sides


def test_depthwise_conv_in_bfloat16_keeps_the_dtypes_and_stays_close(ops_form):
  """bf16 compute (cpu_ffi: its xla fallback): outputs and gradients keep bf16, near the float32 reference."""
  x, kernel = _depthwise_inputs((3, 8, 8, 4), 5)
  conv = lambda form: lambda x, k: form.depthwise_conv(x, k, 2, 2)
  got, got_grads = _value_and_grads(conv(ops_form), x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  want, want_grads = _value_and_grads(conv(ops.REFERENCE), x, kernel)
  assert got.dtype == got_grads[0].dtype == got_grads[1].dtype == jnp.bfloat16
  for a, b in zip((got, *got_grads), (want, *want_grads)):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.1 * float(jnp.abs(b).max()))


def _autodiff_grad(fn, argnum, x, kernel, output_grad):
  """Plain autodiff's gradient of fn(x, kernel) with respect to argument `argnum`, jitted."""
  return jax.jit(lambda x, kernel, g: jax.vjp(fn, x, kernel)[1](g)[argnum])(x, kernel, output_grad)


@pytest.mark.parametrize(
  "height,width,kernel_size,stride", [(7, 8, 5, 2), (14, 11, 5, 2), (9, 4, 3, 2), (5, 6, 5, 1), (28, 27, 3, 2)]
)
def test_xla_depthwise_input_grad_gather_form_equals_autodiff(height, width, kernel_size, stride):
  """The xla form's phase-by-phase gather-form input gradient equals autodiff's scatter form, odd and even, H != W."""
  rng = np.random.default_rng(height * width + kernel_size)
  x, kernel = _normal(rng, (2, height, width, 3)), _normal(rng, (kernel_size, kernel_size, 1, 3))
  pad = (kernel_size - 1) // 2
  output_grad = _normal(rng, kernels.output_shape(x.shape, kernel_size, stride, pad))
  expected = _autodiff_grad(
    lambda x, kernel: xla.shifted_slices_conv(x, kernel, stride, pad), 0, x, kernel, output_grad
  )
  got = jax.jit(xla.depthwise_input_grad, static_argnums=(2, 3, 4, 5))(output_grad, kernel, stride, pad, height, width)
  assert_close(got, expected)
  assert float(jnp.abs(expected).max()) > 0.5


@pytest.mark.parametrize(
  "size,kernel_size,stride", [(4, 5, 1), (8, 5, 2), (8, 3, 2), (11, 3, 2), (7, 5, 1), (10, 3, 1)]
)
def test_xla_depthwise_kernel_grad_equals_autodiff(size, kernel_size, stride):
  """The xla form's kernel gradient (fully unrolled for <= 16 output positions, else column sums; stride-2
  phases) equals autodiff of the shifted slices."""
  rng = np.random.default_rng(size * 10 + kernel_size + stride)
  x, kernel = _normal(rng, (3, size, size, 4)), _normal(rng, (kernel_size, kernel_size, 1, 4))
  pad = (kernel_size - 1) // 2
  output_grad = _normal(rng, kernels.output_shape(x.shape, kernel_size, stride, pad))
  expected = _autodiff_grad(
    lambda x, kernel: xla.shifted_slices_conv(x, kernel, stride, pad), 1, x, kernel, output_grad
  )
  got = jax.jit(xla.depthwise_kernel_grad, static_argnums=(2, 3, 4))(x, output_grad, kernel_size, stride, pad)
  assert_close(got, expected)
  assert float(jnp.abs(expected).max()) > 0.1


# ----------------------------------------------------------------------------- 1x1 convs


@pytest.mark.parametrize("shape,features", [((2, 5, 7, 6), 10), ((3, 4, 4, 45), 16)])
def test_pointwise_conv_values_and_gradients_equal_the_reference(ops_form, shape, features):
  rng = np.random.default_rng(features)
  x, kernel = _normal(rng, shape), _normal(rng, (shape[-1], features))
  got, got_grads = _value_and_grads(ops_form.pointwise_conv, x, kernel)
  want, want_grads = _value_and_grads(ops.REFERENCE.pointwise_conv, x, kernel)
  assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads):
    assert_close(got_grad, want_grad)
  assert float(jnp.abs(want_grads[1]).max()) > 0.1
  # bf16 compute: the kernel gradient keeps the kernel's dtype.
  bf16 = jax.grad(lambda k: jnp.sum(ops_form.pointwise_conv(x.astype(jnp.bfloat16), k) ** 2))(
    kernel.astype(jnp.bfloat16)
  )
  assert bf16.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- convs through layers.Conv


def _conv_pair(features, kernel_size, stride, use_bias, ops_form):
  pad = (kernel_size - 1) // 2
  return (
    layers.Conv(features, kernel_size, stride, use_bias=use_bias, ops=ops_form),
    nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
    ),
  )


def _check_conv_against_nn_conv(ours, theirs, x, seed):
  """Same variables (shapes and initial values), outputs, and kernel, bias and input gradients as nn.Conv."""
  variables, their_variables = ours.init(jax.random.key(seed), x), theirs.init(jax.random.key(seed), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, their_variables)
  np.testing.assert_array_equal(variables["params"]["kernel"], their_variables["params"]["kernel"])
  params = jax.tree.map(lambda v: v + 0.1, variables["params"])  # a non-zero bias
  got, got_grads = _value_and_grads(lambda p, x: ours.apply({"params": p}, x), params, x)
  want, want_grads = _value_and_grads(lambda p, x: theirs.apply({"params": p}, x), params, x)
  assert_close(got, want)
  for got_grad, want_grad in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert_close(got_grad, want_grad, atol_fraction=1e-5)
  assert float(jnp.abs(want_grads[0]["kernel"]).max()) > 0.1 and float(jnp.abs(want_grads[1]).max()) > 0.01
  return params


# The stem and the frame trunks' first convs: kernels 3, 5 and 7, strides 1 and 2, odd and non-square maps,
# output channels through every block path of the kernels (45 = 32 + 8 + 5, 3 = singles), with and without bias.
@pytest.mark.parametrize(
  "height,width,features,kernel_size,stride,use_bias",
  [
    (12, 12, 6, 3, 2, False),
    (9, 7, 45, 3, 2, True),
    (8, 11, 16, 3, 1, True),
    (10, 10, 6, 5, 2, False),
    (11, 6, 3, 5, 1, True),
    (13, 10, 8, 7, 2, True),
    (9, 9, 6, 7, 1, False),
  ],
)
def test_grey_conv_through_layers_conv_equals_nn_conv(ops_form, height, width, features, kernel_size, stride, use_bias):
  x = _normal(np.random.default_rng(height * width + kernel_size), (3, height, width, 1))
  ours, theirs = _conv_pair(features, kernel_size, stride, use_bias, ops_form)
  params = _check_conv_against_nn_conv(ours, theirs, x, seed=features)
  traced = _traced(jax.grad(lambda p, x: _loss(ours.apply({"params": p}, x)), argnums=(0, 1)), params, x)
  # The kernel-gradient kernel unrolls taps up to 5 x 5; a larger kernel takes XLA's conv gradient.
  kernel_grad_on_kernel = ops_form.name == "cpu_ffi" and kernel_size <= cpu_ffi.LARGEST_GREY_KERNEL_GRAD
  assert (build.ONE_CHANNEL_KERNEL_GRAD_TARGET in traced) == kernel_grad_on_kernel
  assert (build.ONE_CHANNEL_INPUT_GRAD_TARGET in traced) == (ops_form.name == "cpu_ffi")


# The frame trunks' later convs (few channels, stride 2) and convs over 3 to 16 input channels (the kernel's
# blocks of 4 input channels and single ones), kernels 3 and 5.
@pytest.mark.parametrize(
  "shape,features,kernel_size,stride",
  [
    ((3, 9, 7, 5), 45, 3, 2),
    ((2, 8, 8, 3), 16, 3, 1),
    ((2, 11, 10, 6), 24, 5, 2),
    ((4, 14, 14, 8), 16, 3, 2),
    ((2, 7, 7, 16), 32, 3, 2),
    ((2, 8, 8, 5), 6, 3, 1),
  ],
)
def test_conv_over_few_channels_through_layers_conv_equals_nn_conv(ops_form, shape, features, kernel_size, stride):
  x = _normal(np.random.default_rng(sum(shape)), shape)
  ours, theirs = _conv_pair(features, kernel_size, stride, True, ops_form)
  params = _check_conv_against_nn_conv(ours, theirs, x, seed=features)
  traced = _traced(jax.grad(lambda p, x: _loss(ours.apply({"params": p}, x)), argnums=(0, 1)), params, x)
  assert (build.CONV_KERNEL_GRAD_TARGET in traced) == (ops_form.name == "cpu_ffi")


# ----------------------------------------------------------------------------- BatchNorm sums


# (2, 4, 4, 5): the xla form's fully unrolled path (16 positions per image); (3, 6, 9, 5): columns only,
# H != W; one position per image; channels through every block path of the kernel; large sums of squares.
@pytest.mark.parametrize("shape", [(2, 4, 4, 5), (3, 6, 9, 5), (4, 1, 1, 3), (3, 5, 7, 45), (2, 13, 10, 72)])
def test_channel_moments_equal_float64_sums_and_their_gradient_the_reference(ops_form, shape):
  rng = np.random.default_rng(sum(shape))
  x = _normal(rng, shape, scale=2.0, offset=5.0)
  total, square_total = jax.jit(ops_form.channel_moments)(x)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(total, x64.sum((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(square_total, (x64 * x64).sum((0, 1, 2)), rtol=1e-5)
  weights = _normal(rng, (2, shape[-1]))

  def loss(moments, x):
    first, second = moments(x)
    return jnp.sum(first * weights[0]) + jnp.sum(second * weights[1])

  assert_close(
    jax.jit(jax.grad(functools.partial(loss, ops_form.channel_moments)))(x),
    jax.grad(functools.partial(loss, ops.REFERENCE.channel_moments))(x),
  )


@pytest.mark.parametrize("shape", [(2, 4, 4, 5), (3, 6, 9, 45), (2, 3, 5, 16)])
def test_scale_and_shift_values_and_gradients_equal_the_reference(ops_form, shape):
  rng = np.random.default_rng(sum(shape))
  args = (_normal(rng, shape, offset=1.0), _normal(rng, shape[-1:]), _normal(rng, shape[-1:]))
  got, got_grads = _value_and_grads(ops_form.scale_and_shift, *args)
  want, want_grads = _value_and_grads(ops.REFERENCE.scale_and_shift, *args)
  assert_close(got, want)
  for got_grad, want_grad in zip(got_grads, want_grads):
    assert_close(got_grad, want_grad)
    assert float(jnp.abs(want_grad).max()) > 0.1


# ----------------------------------------------------------------------------- frame gather


# Pixels per frame not a multiple of the vector width (7 x 9 x 3 = 189); more slots than frames; one frame.
@pytest.mark.parametrize(
  "batch,slots,frames,frame_shape", [(3, 4, 12, (16, 16, 1)), (2, 5, 3, (7, 9, 3)), (2, 2, 1, (5, 5, 1))]
)
def test_frame_gather_and_its_selection_gradient_equal_the_reference(ops_form, batch, slots, frames, frame_shape):
  rng = np.random.default_rng(batch * slots + frames)
  pixels = jnp.asarray(rng.integers(0, 256, (batch, frames) + frame_shape), jnp.uint8)
  selection = _normal(rng, (batch, slots, frames)).at[0, 0].set(0.0)  # a slot with no frame at all: zeros
  output_grad = _normal(rng, (batch, slots) + frame_shape)

  def vjp(gather, selection):
    out, pullback = jax.vjp(lambda s: gather(s, pixels), selection)
    return out, pullback(output_grad)[0]

  got, got_grad = jax.jit(functools.partial(vjp, ops_form.frame_gather))(selection)
  want, want_grad = vjp(ops.REFERENCE.frame_gather, selection)
  assert got.dtype == jnp.float32
  assert_close(got, want)
  np.testing.assert_array_equal(got[0, 0], 0.0)
  assert_close(got_grad, want_grad)
  assert float(jnp.abs(got_grad).max()) > 1.0
  # A one-hot selection (the hard top-K) copies the chosen frames exactly.
  chosen = rng.integers(0, frames, (batch, slots))
  one_hot = jax.nn.one_hot(chosen, frames, dtype=jnp.float32)
  np.testing.assert_array_equal(
    ops_form.frame_gather(one_hot, pixels),
    np.take_along_axis(np.asarray(pixels, np.float32), chosen.reshape(chosen.shape + (1,) * len(frame_shape)), axis=1),
  )


def test_frame_gather_of_float_frames_equals_the_reference(ops_form):
  """Float frames (cpu_ffi: its einsum fallback) give the reference's values too."""
  rng = np.random.default_rng(9)
  frames, selection = _normal(rng, (2, 5, 6, 4, 1)), _normal(rng, (2, 3, 5))
  assert_close(ops_form.frame_gather(selection, frames), ops.REFERENCE.frame_gather(selection, frames))


# ----------------------------------------------------------------------------- straight-through top-K


def _scores_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(12, 12)).astype(np.float32)
  scores[:2] = 0.0  # samples without video: all scores equal, the first K frames win
  scores[2:6] = np.round(scores[2:6]) + 0.0  # many ties (+ 0.0: no -0.0, which top_k ranks below +0.0)
  return scores


def _expected_topk(scores, k):
  """The K highest scores in time order; equal scores: the lower index first (lax.top_k's rule)."""
  return np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_sort_free_topk_indices_equal_sorted_lax_top_k_with_ties(k):
  """The reference (export) form's top-k without sort or top_k chooses exactly lax.top_k's frames."""
  scores = _scores_with_ties()
  got = np.asarray(jax.jit(reference.sort_free_topk_indices, static_argnums=1)(scores, k))
  np.testing.assert_array_equal(got, np.asarray(xla.topk_indices(jnp.asarray(scores), k)))
  np.testing.assert_array_equal(got, _expected_topk(scores, k))
  np.testing.assert_array_equal(got[:2], np.tile(np.arange(k), (2, 1)))
  assert got.dtype == np.int32


def test_straight_through_topk_is_exactly_k_hot_and_its_gradient_the_soft_surrogates(ops_form):
  scores = jnp.asarray(_scores_with_ties())
  for k in (1, 4):
    selection = jax.jit(ops_form.straight_through_topk, static_argnums=(1, 2))(scores, k, 1.0)
    assert selection.shape == (12, k, 12) and selection.dtype == jnp.float32
    expected = jax.nn.one_hot(_expected_topk(np.asarray(scores), k), 12)
    np.testing.assert_array_equal(selection, expected)  # one frame per slot, K distinct frames, in time order
  weights = _normal(np.random.default_rng(1), (12, 4, 12))
  hard_grad = jax.grad(lambda s: jnp.sum(ops_form.straight_through_topk(s, 4, 0.5) * weights))(scores)
  soft_grad = jax.grad(lambda s: jnp.sum(reference.soft_selection_surrogate(s, 4, 0.5) * weights))(scores)
  assert float(jnp.abs(hard_grad).max()) > 1e-3
  np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- dropout masks


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_mask_keeps_one_minus_rate_and_follows_the_key(ops_form, rate):
  shape, key = (32, 64, 128), jax.random.key(3)
  mask = np.asarray(jax.jit(ops_form.dropout_keep_mask, static_argnums=(1, 2))(key, rate, shape))
  assert mask.dtype == bool and mask.shape == shape
  assert abs(mask.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / mask.size)
  np.testing.assert_array_equal(ops_form.dropout_keep_mask(key, rate, shape), mask)  # eager == jit
  other = np.asarray(ops_form.dropout_keep_mask(jax.random.key(4), rate, shape))
  assert other.mean() > 0 and not np.array_equal(other, mask)
  assert np.asarray(ops_form.dropout_keep_mask(key, 0.0, (4, 5))).all()


def test_reference_dropout_mask_is_exactly_nn_dropouts_draw():
  key = jax.random.key(7)
  np.testing.assert_array_equal(
    ops.REFERENCE.dropout_keep_mask(key, 0.3, (8, 33)), jax.random.bernoulli(key, 0.7, (8, 33))
  )


def test_xla_hashed_draws_are_uniform_and_uncorrelated():
  draws = np.asarray(xla.hashed_bits(jax.random.key(0), (1 << 20,)), np.float64) / 2.0**32
  # 2**20 uniform draws: mean 1/2 and variance 1/12 to a few standard errors, every decile ~10%.
  assert abs(draws.mean() - 0.5) < 5 * np.sqrt(1 / 12 / draws.size)
  assert abs(draws.var() - 1 / 12) < 0.002
  deciles = np.histogram(draws, bins=10, range=(0, 1))[0] / draws.size
  np.testing.assert_allclose(deciles, 0.1, atol=0.002)
  # Neighbouring elements (along the last axis and one row apart) and the same element under another key.
  other_key = np.asarray(xla.hashed_bits(jax.random.key(1), (1 << 20,)), np.float64) / 2.0**32
  for a, b in ((draws[:-1], draws[1:]), (draws[:-128], draws[128:]), (draws, other_key)):
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(draws.size)


# ----------------------------------------------------------------------------- choosing a form


def test_forms_are_hashable_frozen_and_named():
  assert ops.FORMS == {"reference": ops.REFERENCE, "xla": ops.XLA, "cpu_ffi": ops.CPU_FFI}
  assert len({hash(form) for form in ops.FORMS.values()}) == 3  # part of the compiled step's cache key
  with pytest.raises(dataclasses.FrozenInstanceError):
    ops.REFERENCE.conv = None
  for name, form in ops.FORMS.items():
    assert form.name == name and name in ops.describe(form)
  assert ops.REFERENCE.compiler_options() is None
  assert ops.XLA.compiler_options() == ops.CPU_FFI.compiler_options() == dict(xla.CPU_TRAIN_COMPILER_OPTIONS)


def test_auto_chooses_by_platform_devices_and_dtype():
  assert ops.choose("auto", platform="cpu", device_count=2) is ops.XLA  # an FFI call has no partitioning rule
  assert ops.choose("auto", platform="cpu", device_count=1, dtype="bfloat16") is ops.XLA
  on_tpu = ops.choose("auto", platform="tpu", device_count=1)
  assert on_tpu.name == "reference" and on_tpu.conv is ops.REFERENCE.conv and on_tpu.compiler_options() is None
  # Off the CPU the raw batch's log-mel and jitter take the forms that shard over the batch (device_features).
  assert on_tpu.feature_form == "accelerator" and ops.REFERENCE.feature_form == "cpu"
  # On GPU the reference form, compiled without Triton GEMM fusion (ops.interface.GPU_COMPILER_OPTIONS says why).
  on_gpu = ops.choose("auto", platform="gpu", device_count=1)
  assert on_gpu.name == "reference" and on_gpu.conv is ops.REFERENCE.conv and on_gpu.feature_form == "accelerator"
  for program in ("train", "forward"):
    assert on_gpu.compiler_options(program) == {"xla_gpu_enable_triton_gemm": False}
    assert ops.REFERENCE.compiler_options(program) is None
  if not build.available():
    skip_or_fail(f"the CPU kernels cannot be built here: {build.unavailable_reason()}")
  assert ops.choose("auto", platform="cpu", device_count=1) is ops.CPU_FFI
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert ops.choose_for_mesh("auto", mesh) is ops.CPU_FFI
  assert ops.choose_for_mesh("auto", mesh, "bfloat16") is ops.XLA


def test_explicit_choices_and_their_errors():
  assert ops.choose("reference", platform="cpu", device_count=4) is ops.REFERENCE
  assert ops.choose("xla", platform="cpu", device_count=4) is ops.XLA
  # The forms' own compiler options are XLA:CPU's: on GPU only the GPU ones, on TPU none.
  on_gpu = ops.choose("xla", platform="gpu", device_count=1)
  assert on_gpu.name == "xla" and on_gpu.compiler_options() == {"xla_gpu_enable_triton_gemm": False}
  assert ops.choose("xla", platform="tpu", device_count=1).compiler_options() is None
  assert "xla_gpu_enable_triton_gemm" not in ops.choose("xla", platform="cpu", device_count=1).compiler_options()
  assert on_gpu.depthwise_conv is ops.XLA.depthwise_conv
  with pytest.raises(ValueError, match="compiles for gpu"):
    ops.choose("cpu_ffi", platform="gpu", device_count=1)
  with pytest.raises(ValueError, match="2 devices"):
    ops.choose("cpu_ffi", platform="cpu", device_count=2)
  with pytest.raises(ValueError, match="'fast'.*auto, reference, xla, cpu_ffi"):
    ops.choose("fast", platform="cpu", device_count=1)


def test_the_gpu_compiler_options_are_known_to_this_jax():
  """XLA checks option names and value types at compile time, for every backend alike (its debug options are
  shared), so compiling on the CPU with the GPU options fails if XLA renames or retypes one."""
  options = ops.choose("auto", platform="gpu", device_count=1).compiler_options("forward")
  square = jax.jit(lambda x: x @ x, compiler_options=options).lower(jnp.ones((4, 4))).compile()
  np.testing.assert_allclose(square(jnp.ones((4, 4))), np.full((4, 4), 4.0))
  with pytest.raises(Exception, match="xla_gpu_enable_triton_gemm"):  # what a wrong value type gives
    jax.jit(lambda x: x, compiler_options={"xla_gpu_enable_triton_gemm": "false"}).lower(1.0).compile()


# ----------------------------------------------------------------------------- what the forms trace


def _tiny_train_gradient_hlo(form) -> str:
  """StableHLO of the tiny model's training-loss gradient under `form` (lowered, not compiled)."""
  from configs import tiny
  from mer_jax.models import emotion_model as model_lib

  config = tiny.get_config()
  model = model_lib.EmotionModel(config.model, ops=form)
  batch = model_lib.input_spec(config, 2)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), model_lib.zeros_batch(config, 2), train=False))

  def loss(params, batch_stats, batch):
    (logits, _), _ = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(1)},
    )
    return sum(jnp.sum(v) for v in logits.values())

  return _traced(jax.grad(loss), variables["params"], variables["batch_stats"], batch)


def test_the_model_traces_the_ffi_targets_under_cpu_ffi_only(ops_form):
  """Under cpu_ffi the model's train gradient calls every kernel; under reference and xla no custom call."""
  hlo = _tiny_train_gradient_hlo(ops_form)
  if ops_form.name == "cpu_ffi":
    assert [target for target in FFI_TARGETS if target not in hlo] == []
  else:
    assert "custom_call" not in hlo and "mer_jax_" not in hlo


def test_cpu_ffi_keeps_the_xla_forms_for_other_dtypes(kernels_built):
  """bf16 convs and float frames take the xla / einsum forms; float32 and uint8 the kernels."""
  rng = np.random.default_rng(3)
  x, kernel = _normal(rng, (2, 8, 8, 16)), _normal(rng, (3, 3, 1, 16))
  conv = lambda x, k: ops.CPU_FFI.depthwise_conv(x, k, 1, 1)
  assert build.FORWARD_TARGET in _traced(conv, x, kernel)
  assert "custom_call" not in _traced(conv, x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  selection, frames = jnp.ones((1, 2, 3), jnp.float32), jnp.zeros((1, 3, 4, 4, 1), jnp.uint8)
  assert build.FRAME_GATHER_TARGET in _traced(ops.CPU_FFI.frame_gather, selection, frames)
  assert "custom_call" not in _traced(ops.CPU_FFI.frame_gather, selection, frames.astype(jnp.float32))
  assert "custom_call" not in _traced(ops.CPU_FFI.channel_moments, x.astype(jnp.bfloat16))


def _primitives(jaxpr) -> set[str]:
  """Names of every primitive in a jaxpr, sub-jaxprs (jit, custom_vjp, ...) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for item in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
          names |= _primitives(inner)
  return names


def test_the_exported_model_has_no_custom_call_and_no_sort():
  """The export traces the reference form: what TFLite's and ONNX's converters read (no FFI call, no sort or
  top_k, neither of which TF's StableHLO reader knows)."""
  from configs import tiny
  from mer_jax.export import contract
  from mer_jax.export import exporters as export
  from mer_jax.models import emotion_model as model_lib

  config = tiny.get_config()
  variables = jax.eval_shape(
    lambda: model_lib.EmotionModel(config.model).init(jax.random.key(0), model_lib.zeros_batch(config, 1), train=False)
  )
  specs = [model_lib.input_spec(config, 1)[name] for name in contract.INPUT_NAMES]
  serve = lambda variables, *inputs: export.serving_function(config, variables)(*inputs)
  primitives = _primitives(jax.make_jaxpr(serve)(variables, *specs).jaxpr)
  assert {"conv_general_dilated", "dot_general"} <= primitives
  assert not primitives & {"ffi_call", "sort", "top_k", "argsort"}, primitives
  hlo = _traced(serve, variables, *specs)
  assert not re.search(r"custom_call|stablehlo\.sort|top_k", hlo)


# ----------------------------------------------------------------------------- the C++ kernels themselves


def test_depthwise_backward_is_deterministic_across_threads(kernels_built):
  """Images are split between threads; the kernel-gradient partials are added in a fixed order."""
  rng = np.random.default_rng(1)
  x, kernel, output_grad = _normal(rng, (64, 14, 14, 40)), _normal(rng, (5, 5, 1, 40)), _normal(rng, (64, 7, 7, 40))
  backward = jax.jit(kernels.backward, static_argnums=(3, 4))
  first, second = backward(x, kernel, output_grad, 2, 2), backward(x, kernel, output_grad, 2, 2)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


# Positions not a multiple of the kernel's 128-position tiles; channels through every block path; one
# (N, H, W, C) map as BatchNorm passes them; offsets so that sums of squares are large.
@pytest.mark.parametrize("shape", [(3, 5, 7, 45), (1000, 3), (2, 130, 72), (64, 14, 14, 40), (7, 1)])
def test_channel_sums_equal_float64_sums_and_are_deterministic(kernels_built, shape):
  rng = np.random.default_rng(sum(shape))
  a = rng.normal(size=shape) * 2.0 + 5.0
  b = rng.normal(size=shape)
  sums = jax.jit(kernels.channel_sums)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  a32, b32 = np.asarray(a, np.float32).astype(np.float64), np.asarray(b, np.float32).astype(np.float64)
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(sums[0], a32.sum(axes), rtol=1e-6)
  np.testing.assert_allclose(sums[1], (a32 * b32).sum(axes), rtol=1e-5, atol=1e-3)
  again = jax.jit(kernels.channel_sums)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  for first, second in zip(sums, again):  # partial sums added in a fixed order
    np.testing.assert_array_equal(first, second)


# Grey inputs (Ci = 1: `one_channel_kernel_grad`) and several input channels (`conv_kernel_grad`: blocks of 4
# and single ones, 5 = 4 + 1, 3 = singles); output channels through every block path (45 = 32 + 8 + 5); odd
# and non-square maps; the frame trunks' shapes (8 -> 16, 16 -> 32, stride 2).
@pytest.mark.parametrize(
  "kernel_grad,shape,out_channels,kernel_size,stride",
  [
    ("one_channel_kernel_grad", (2, 9, 7, 1), 45, 3, 2),
    ("one_channel_kernel_grad", (2, 8, 8, 1), 16, 3, 1),
    ("one_channel_kernel_grad", (3, 11, 12, 1), 8, 5, 2),
    ("one_channel_kernel_grad", (2, 6, 6, 1), 3, 3, 2),
    ("conv_kernel_grad", (3, 9, 7, 5), 45, 3, 2),
    ("conv_kernel_grad", (2, 8, 8, 3), 16, 3, 1),
    ("conv_kernel_grad", (2, 11, 10, 6), 24, 5, 2),
    ("conv_kernel_grad", (4, 14, 14, 8), 16, 3, 2),
    ("conv_kernel_grad", (2, 7, 7, 16), 32, 3, 2),
  ],
)
def test_conv_kernel_grads_equal_the_conv_gradient(
  kernels_built, kernel_grad, shape, out_channels, kernel_size, stride
):
  """The frame trunks' conv kernel gradients (stem, scorer, evidence trunk) equal autodiff of XLA's conv."""
  rng = np.random.default_rng(out_channels + kernel_size)
  x, kernel = _normal(rng, shape), _normal(rng, (kernel_size, kernel_size, shape[-1], out_channels))
  pad = (kernel_size - 1) // 2
  output, conv_vjp = jax.vjp(lambda kernel: reference.conv(x, kernel, stride, pad), kernel)
  output_grad = _normal(rng, output.shape)
  got = jax.jit(getattr(kernels, kernel_grad), static_argnums=(3, 4))(x, kernel, output_grad, stride, pad)
  np.testing.assert_allclose(got, conv_vjp(output_grad)[0], rtol=1e-5, atol=1e-4)
  assert float(jnp.abs(got).max()) > 0.1


@pytest.fixture
def fresh_build(monkeypatch):
  """The build's caches cleared before and after: the test sees its own environment, later tests the real one."""
  build.library_path.cache_clear()
  build.register.cache_clear()
  yield monkeypatch
  build.library_path.cache_clear()
  build.register.cache_clear()


def test_build_is_cached_and_a_broken_compiler_falls_back_to_xla(kernels_built, fresh_build, tmp_path, caplog):
  monkeypatch = fresh_build
  monkeypatch.setenv("MER_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
  path = build.library_path()
  assert path is not None and path.parent == tmp_path / "cache" and path.stat().st_size > 0
  built_at = path.stat().st_mtime_ns
  build.library_path.cache_clear()
  assert build.library_path() == path and path.stat().st_mtime_ns == built_at  # not rebuilt

  # A compiler that fails: no library, a warning that says why; 'auto' runs the xla form and an explicit
  # 'cpu_ffi' says why it cannot.
  monkeypatch.setenv("MER_JAX_KERNEL_CACHE", str(tmp_path / "other"))
  broken = tmp_path / "broken-c++"
  broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
  broken.chmod(0o755)
  monkeypatch.setenv("CXX", str(broken))
  build.library_path.cache_clear()
  build.register.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert build.library_path() is None
  assert "CPU kernels not built" in caplog.text and "broken compiler" in caplog.text
  assert not list((tmp_path / "other").glob("*.so"))
  assert not build.available()
  assert ops.choose("auto", platform="cpu", device_count=1) is ops.XLA
  with pytest.raises(ValueError, match="cpu_ffi.*did not build"):
    ops.choose("cpu_ffi", platform="cpu", device_count=1)


def test_without_a_compiler_cpu_ffi_names_the_missing_compiler(fresh_build, caplog):
  monkeypatch = fresh_build
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(build.shutil, "which", lambda name: None)
  with caplog.at_level(logging.WARNING):
    assert not build.available()
  assert "No C++ compiler found" in caplog.text
  assert ops.choose("auto", platform="cpu", device_count=1) is ops.XLA
  with pytest.raises(ValueError, match="no C\\+\\+ compiler found"):
    ops.choose("cpu_ffi", platform="cpu", device_count=1)
