"""mer_jax.models.dropout: nn.Dropout's semantics with a hashed keep mask whose draws behave like random ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.models import dropout


def test_draws_are_uniform_and_uncorrelated():
  draws = np.asarray(dropout.hashed_bits(jax.random.key(0), (1 << 20,)), np.float64) / 2.0 ** 32
  # 2**20 uniform draws: mean 1/2 and variance 1/12 to a few standard errors, every decile ~10%.
  assert abs(draws.mean() - 0.5) < 5 * np.sqrt(1 / 12 / draws.size)
  assert abs(draws.var() - 1 / 12) < 0.002
  deciles = np.histogram(draws, bins=10, range=(0, 1))[0] / draws.size
  np.testing.assert_allclose(deciles, 0.1, atol=0.002)
  # Neighbouring elements (along the last axis and one row apart) and the same element under another key.
  other_key = np.asarray(dropout.hashed_bits(jax.random.key(1), (1 << 20,)), np.float64) / 2.0 ** 32
  for a, b in ((draws[:-1], draws[1:]), (draws[:-128], draws[128:]), (draws, other_key)):
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(draws.size)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_fraction_and_scaling_match_nn_dropout(rate):
  x = jnp.ones((32, 64, 128))
  key = jax.random.key(3)
  ours = dropout.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
  kept = np.asarray(ours) != 0
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
  np.testing.assert_allclose(np.asarray(ours)[kept], 1 / (1 - rate), rtol=1e-6)
  # The same key gives the same mask, under jit too; another key another one.
  again = jax.jit(lambda x: dropout.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key}))(x)
  np.testing.assert_array_equal(ours, again)
  other = dropout.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert (np.asarray(other) != 0).mean() > 0 and not np.array_equal(np.asarray(other) != 0, kept)


def test_deterministic_and_edge_rates_as_nn_dropout():
  x = jnp.arange(12.0).reshape(3, 4)
  key = {"dropout": jax.random.key(0)}
  for rate in (0.0, 0.3, 1.0):
    for deterministic in (True, False):
      ours = dropout.Dropout(rate).apply({}, x, deterministic=deterministic, rngs=key)
      if deterministic or rate in (0.0, 1.0):  # no randomness involved: exactly nn.Dropout
        np.testing.assert_array_equal(ours, nn.Dropout(rate).apply({}, x, deterministic=deterministic, rngs=key))
  with pytest.raises(Exception):  # no rng given while training, as nn.Dropout
    dropout.Dropout(0.3).apply({}, x, deterministic=False)


def test_gradient_flows_through_kept_elements_only():
  x = jnp.ones((8, 16))
  key = {"dropout": jax.random.key(5)}
  grad = jax.grad(lambda x: dropout.Dropout(0.25).apply({}, x, deterministic=False, rngs=key).sum())(x)
  mask = np.asarray(dropout.Dropout(0.25).apply({}, x, deterministic=False, rngs=key)) != 0
  np.testing.assert_allclose(np.asarray(grad), np.where(mask, 1 / 0.75, 0.0), rtol=1e-6)
