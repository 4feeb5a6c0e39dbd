"""Text -> audiovisual cross-attention: weights normalised over valid keys, masked keys ignored."""

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import cross_attention


def test_weights_sum_to_one_and_ignore_masked_keys():
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  text_mask = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2])
  key_mask = jnp.asarray([[True] * 7, [True, True, True, False, False, True, False]])
  layer = cross_attention.TextToAudioVisualAttention(num_heads=4)
  variables = layer.init(jax.random.key(0), text, keys, text_mask, key_mask, train=False)
  out, weights = layer.apply(variables, text, keys, text_mask, key_mask, train=False)
  assert out.shape == (2, 5, 16) and weights.shape == (2, 4, 5, 7)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(weights[1, :, :, 3], 0.0)
  np.testing.assert_array_equal(out[1, 3:], 0.0)  # padded text positions are zeroed
  # Masked keys' content cannot leak into the output.
  changed = keys.at[1, 3].set(100.0)
  out_changed, _ = layer.apply(variables, text, changed, text_mask, key_mask, train=False)
  np.testing.assert_allclose(out[1], out_changed[1], atol=1e-5)
  # More than one key: attention is not trivially 1.
  assert float(weights[0].max()) < 1.0


def test_output_attends_to_the_keys():
  rng = np.random.default_rng(1)
  text = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
  masks = (jnp.ones((1, 3), bool), jnp.ones((1, 4), bool))
  layer = cross_attention.TextToAudioVisualAttention(num_heads=2)
  variables = layer.init(jax.random.key(0), text, keys, *masks, train=False)
  out_a, _ = layer.apply(variables, text, keys, *masks, train=False)
  out_b, _ = layer.apply(variables, text, keys * 2 + 1, *masks, train=False)
  assert not np.allclose(out_a, out_b)
