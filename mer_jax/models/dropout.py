"""Dropout whose keep mask is a hash of each element's index, computed inside the loop that applies it.

flax's nn.Dropout draws its mask with `jax.random.bernoulli`: threefry2x32 over every element, which
XLA:CPU runs as a rolled loop (5 iterations of ~10 small kernels) and writes out as a separate array. The
edge model draws seven such masks per train step; with all dropout removed the step took 0.972 of the time
(docs/PERFORMANCE.md). Here the module's dropout key (flax's `make_rng`, as nn.Dropout) is read as two
32-bit words, and each element's 32-bit draw is a counter-based hash of its flat index and those words
(murmur3's finaliser twice): plain integer arithmetic that XLA fuses into the multiply. The draws are
uniform and, across elements and keys, uncorrelated to the tests' resolution (tests/test_dropout.py), and
the same key gives the same mask on every backend.

Same interface and semantics as nn.Dropout (`rate`, `deterministic`, kept values scaled by 1 / (1 - rate),
rate 1 drops everything); no parameters, so checkpoints are unaffected.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hashed_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """(shape) uint32 draws from a PRNG key: hash of (flat index, the key's two words)."""
  words = jax.random.key_data(key).reshape(-1)[:2].astype(jnp.uint32)
  index = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape) if shape else jnp.uint32(0)
  return _mix(_mix(index * _GOLDEN ^ words[0]) ^ words[1])


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """(shape) bool, each True with probability 1 - rate (to 2**-32)."""
  threshold = np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
  return hashed_bits(key, shape) >= threshold


class Dropout(nn.Module):
  """nn.Dropout with the hashed keep mask above; draws from the 'dropout' rng collection."""
  rate: float
  deterministic: Optional[bool] = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: Optional[bool] = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep = keep_mask(self.make_rng(self.rng_collection), self.rate, inputs.shape)
    return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros((), inputs.dtype))
