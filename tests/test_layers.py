"""mer_jax.models.layers: Conv, BatchNorm and Dropout have their flax counterparts' variables and semantics under
every ops form, and Conv dispatches each shape to the op of the seam made for it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax import ops
from mer_jax.models import layers
from mer_jax.ops.cpu import build

# ----------------------------------------------------------------------------- Conv


def _recording_ops(calls: list):
  """The reference form, each conv op noting its name in `calls` when traced."""

  def record(name):
    op = getattr(ops.REFERENCE, name)
    return lambda *args: calls.append(name) or op(*args)

  names = ("depthwise_conv", "pointwise_conv", "grey_conv", "conv")
  return dataclasses.replace(ops.REFERENCE, name="recording", **{name: record(name) for name in names})


# (input channels, features, kernel, stride, groups) -> the op Conv must call, and nn.Conv's arguments.
@pytest.mark.parametrize(
  "in_channels,features,kernel_size,stride,groups,op",
  [
    (6, 6, 3, 2, 6, "depthwise_conv"),
    (6, 6, 5, 1, 6, "depthwise_conv"),
    (6, 10, 1, 1, 1, "pointwise_conv"),
    (6, 10, 1, 2, 1, "conv"),
    (1, 8, 3, 2, 1, "grey_conv"),
    (1, 8, 5, 1, 1, "grey_conv"),
    (5, 8, 3, 2, 1, "conv"),
  ],
)
def test_conv_dispatches_by_shape_with_nn_convs_variables_and_outputs(
  in_channels, features, kernel_size, stride, groups, op
):
  x = jnp.asarray(np.random.default_rng(in_channels).normal(size=(2, 9, 7, in_channels)), jnp.float32)
  calls = []
  ours = layers.Conv(features, kernel_size, stride, groups, use_bias=groups == 1, ops=_recording_ops(calls))
  pad = (kernel_size - 1) // 2
  theirs = nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=groups == 1,
  )
  variables = ours.init(jax.random.key(3), x)
  their_variables = theirs.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, their_variables)
  np.testing.assert_array_equal(variables["params"]["kernel"], their_variables["params"]["kernel"])
  calls.clear()
  params = jax.tree.map(lambda v: v + 0.1, variables["params"])
  np.testing.assert_allclose(
    ours.apply({"params": params}, x), theirs.apply({"params": params}, x), rtol=1e-5, atol=1e-5
  )
  assert calls == [op]


def test_conv_rejects_groups_it_does_not_support():
  x = jnp.zeros((1, 5, 5, 4))
  with pytest.raises(ValueError, match="groups=3 got 4 input channels"):
    layers.Conv(4, 3, groups=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="depthwise"):
    layers.Conv(8, 3, groups=2).init(jax.random.key(0), x)


def test_conv_computes_in_its_dtype(ops_form):
  x = jnp.ones((1, 6, 6, 4))
  conv = layers.Conv(4, 3, groups=4, dtype=jnp.bfloat16, ops=ops_form)
  variables = conv.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  assert conv.apply(variables, x).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- BatchNorm


def _batch_norm_pair(ops_form, momentum=0.99, epsilon=1e-3, dtype=jnp.float32):
  return (
    layers.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon, dtype=dtype, ops=ops_form),
    nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon, dtype=dtype),
  )


# (2, 4, 4, 5): the xla form's fully unrolled path (16 positions per image); (3, 6, 9, 5): columns only, H != W.
@pytest.mark.parametrize("shape", [(2, 4, 4, 5), (3, 6, 9, 5), (4, 1, 1, 3)])
def test_batch_norm_matches_flax_batchnorm_in_train_and_eval(ops_form, shape):
  rng = np.random.default_rng(sum(shape))
  # A channel offset and spread so that mean and variance both matter.
  x = jnp.asarray(rng.normal(size=shape) * np.arange(1, shape[-1] + 1) + 3.0, jnp.float32)
  ours, flax_bn = _batch_norm_pair(ops_form)
  variables = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  variables = {
    "params": {
      "scale": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
    },
    "batch_stats": variables["batch_stats"],
  }

  out, updates = ours.apply(variables, x, mutable=["batch_stats"])
  expected, expected_updates = flax_bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
      updates["batch_stats"][name], expected_updates["batch_stats"][name], rtol=1e-5, atol=1e-6
    )
  # The running mean moved by (1 - momentum) of the batch mean: real statistics, not the initial zeros.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.01 * np.mean(np.asarray(x), axis=(0, 1, 2)), rtol=1e-5)

  eval_variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  np.testing.assert_allclose(
    layers.BatchNorm(use_running_average=True, epsilon=1e-3, ops=ops_form).apply(eval_variables, x),
    nn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(eval_variables, x),
    rtol=1e-5,
    atol=1e-5,
  )

  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(module, params, x):
    y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * weights)

  ours_grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(ours, variables["params"], x)
  flax_grads = jax.grad(loss, argnums=(1, 2))(flax_bn, variables["params"], x)
  for got, want in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(flax_grads)):
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The statistics and the parameter gradients come from the kernels' channel sums exactly under cpu_ffi.
  traced = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0).lower(ours, variables["params"], x).as_text()
  assert (build.CHANNEL_SUMS_TARGET in traced) == (ops_form.name == "cpu_ffi")


def test_batch_norm_in_bfloat16_keeps_float32_statistics(ops_form):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 3)) + 1.0, jnp.bfloat16)
  ours, flax_bn = _batch_norm_pair(ops_form, dtype=jnp.bfloat16)
  variables = flax_bn.init(jax.random.key(0), x)
  out, updates = ours.apply(variables, x, mutable=["batch_stats"])
  expected, expected_updates = flax_bn.apply(variables, x, mutable=["batch_stats"])
  assert out.dtype == jnp.bfloat16 and updates["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=0.05)
  np.testing.assert_allclose(updates["batch_stats"]["var"], expected_updates["batch_stats"]["var"], rtol=1e-3)


# ----------------------------------------------------------------------------- Dropout


def _dropout(rate, ops_form, x, key, deterministic=False):
  return layers.Dropout(rate, ops=ops_form).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_fraction_and_scaling_match_nn_dropout(ops_form, rate):
  x, key = jnp.ones((32, 64, 128)), jax.random.key(3)
  ours = _dropout(rate, ops_form, x, key)
  kept = np.asarray(ours) != 0
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
  np.testing.assert_allclose(np.asarray(ours)[kept], 1 / (1 - rate), rtol=1e-6)
  # The same key gives the same mask, under jit too; another key another one.
  np.testing.assert_array_equal(ours, jax.jit(lambda x: _dropout(rate, ops_form, x, key))(x))
  other = np.asarray(_dropout(rate, ops_form, x, jax.random.key(4))) != 0
  assert other.mean() > 0 and not np.array_equal(other, kept)


def test_reference_dropout_is_exactly_nn_dropout():
  x, key = jnp.arange(600.0).reshape(20, 30), jax.random.key(8)
  np.testing.assert_array_equal(
    _dropout(0.3, ops.REFERENCE, x, key), nn.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
  )


def test_dropout_deterministic_and_edge_rates_as_nn_dropout(ops_form):
  x = jnp.arange(12.0).reshape(3, 4)
  key = jax.random.key(0)
  for rate in (0.0, 0.3, 1.0):
    for deterministic in (True, False):
      ours = _dropout(rate, ops_form, x, key, deterministic)
      if deterministic or rate in (0.0, 1.0):  # no randomness involved: exactly nn.Dropout
        np.testing.assert_array_equal(
          ours, nn.Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})
        )
  with pytest.raises(Exception):  # no rng given while training, as nn.Dropout
    layers.Dropout(0.3, ops=ops_form).apply({}, x, deterministic=False)


def test_dropout_gradient_flows_through_kept_elements_only(ops_form):
  x, key = jnp.ones((8, 16)), jax.random.key(5)
  grad = jax.grad(lambda x: _dropout(0.25, ops_form, x, key).sum())(x)
  mask = np.asarray(_dropout(0.25, ops_form, x, key)) != 0
  assert 0 < mask.mean() < 1
  np.testing.assert_allclose(np.asarray(grad), np.where(mask, 1 / 0.75, 0.0), rtol=1e-6)
