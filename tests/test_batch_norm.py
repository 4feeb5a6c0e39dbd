"""mer_jax.models.batch_norm.BatchNorm is nn.BatchNorm: same variables, outputs, running statistics and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.models import batch_norm
from mer_jax.ops.cpu import kernels as cpu_kernels


def _pair(momentum=0.99, epsilon=1e-3, dtype=jnp.float32):
  return (batch_norm.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon, dtype=dtype),
          nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=epsilon, dtype=dtype))


# (2, 4, 4, 5): the fully unrolled path (16 positions per image); (3, 6, 9, 5): columns only, H != W.
@pytest.mark.parametrize("shape", [(2, 4, 4, 5), (3, 6, 9, 5), (4, 1, 1, 3)])
def test_matches_flax_batchnorm_in_train_and_eval(shape, form):
  rng = np.random.default_rng(sum(shape))
  # A channel offset and spread so that mean and variance both matter.
  x = jnp.asarray(rng.normal(size=shape) * np.arange(1, shape[-1] + 1) + 3.0, jnp.float32)
  ours, flax_bn = _pair()
  variables = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  variables = {"params": {"scale": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)},
               "batch_stats": variables["batch_stats"]}

  out, updates = ours.apply(variables, x, mutable=["batch_stats"])
  expected, expected_updates = flax_bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  traced = str(jax.make_jaxpr(lambda x: ours.apply(variables, x, mutable=["batch_stats"]))(x))
  assert (cpu_kernels.CHANNEL_SUMS_TARGET in traced) == (form == "kernels")
  for name in ("mean", "var"):
    np.testing.assert_allclose(updates["batch_stats"][name], expected_updates["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)
  # The running mean moved by (1 - momentum) of the batch mean: real statistics, not the initial zeros.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.01 * np.mean(np.asarray(x), axis=(0, 1, 2)),
                             rtol=1e-5)

  eval_variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  np.testing.assert_allclose(
      batch_norm.BatchNorm(use_running_average=True, epsilon=1e-3).apply(eval_variables, x),
      nn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(eval_variables, x), rtol=1e-5, atol=1e-5)

  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(module, params, x):
    y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * weights)

  ours_grads = jax.grad(loss, argnums=(1, 2))(ours, variables["params"], x)
  assert (cpu_kernels.CHANNEL_SUMS_TARGET in str(jax.make_jaxpr(
      lambda p, x: jax.grad(loss, argnums=(1, 2))(ours, p, x))(variables["params"], x))) == (form == "kernels")
  flax_grads = jax.grad(loss, argnums=(1, 2))(flax_bn, variables["params"], x)
  for got, want in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(flax_grads)):
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_statistics():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 3)) + 1.0, jnp.bfloat16)
  ours, flax_bn = _pair(dtype=jnp.bfloat16)
  variables = flax_bn.init(jax.random.key(0), x)
  out, updates = ours.apply(variables, x, mutable=["batch_stats"])
  expected, expected_updates = flax_bn.apply(variables, x, mutable=["batch_stats"])
  assert out.dtype == jnp.bfloat16 and updates["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=0.05)
  np.testing.assert_allclose(updates["batch_stats"]["var"], expected_updates["batch_stats"]["var"], rtol=1e-3)


def test_channel_moments_and_their_gradient(form):
  moments = batch_norm.kernel_channel_moments if form == "kernels" else batch_norm.column_channel_moments
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 7, 4)), jnp.float32)
  total, square_total = moments(x)
  np.testing.assert_allclose(total, np.sum(np.asarray(x), axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(square_total, np.sum(np.asarray(x) ** 2, axis=(0, 1, 2)), rtol=1e-5)

  def loss(moments, x):
    first, second = moments(x)
    return jnp.sum(first * jnp.arange(4.0)) + jnp.sum(second * jnp.arange(1.0, 5.0))

  reference = lambda x: (jnp.sum(x, axis=(0, 1, 2)), jnp.sum(x * x, axis=(0, 1, 2)))
  np.testing.assert_allclose(jax.grad(loss, argnums=1)(moments, x),
                             jax.grad(loss, argnums=1)(reference, x), rtol=1e-5, atol=1e-5)
