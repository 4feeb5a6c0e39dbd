"""Audio encoder: the mask is honoured, segments follow each example's own length."""

import jax
import jax.numpy as jnp
import numpy as np

from mer_jax.models import audio_encoder


def test_padding_content_does_not_change_the_encoding():
  encoder = audio_encoder.AudioEncoder(features=16, channels=(8, 8), num_segments=3)
  rng = np.random.default_rng(0)
  log_mel = rng.normal(size=(2, 40, 12)).astype(np.float32)
  mask = np.zeros((2, 40), bool)
  mask[0, :40] = True
  mask[1, :24] = True
  variables = encoder.init(jax.random.key(0), log_mel, mask)
  vector, tokens, token_mask = encoder.apply(variables, log_mel, mask)
  garbage = log_mel.copy()
  garbage[1, 24:] = 1e3 * rng.normal(size=(16, 12))
  vector_g, tokens_g, _ = encoder.apply(variables, garbage, mask)
  np.testing.assert_allclose(vector, vector_g, atol=1e-5)
  np.testing.assert_allclose(tokens, tokens_g, atol=1e-5)
  assert vector.shape == (2, 16) and tokens.shape == (2, 3, 16)
  np.testing.assert_array_equal(token_mask, True)
  # Real content does matter.
  changed = log_mel.copy()
  changed[1, :24] += 1.0 * rng.normal(size=(24, 12))
  assert not np.allclose(encoder.apply(variables, changed, mask)[0][1], vector[1], atol=1e-3)


def test_constant_audio_encodes_exactly_as_zeros_in_any_batch():
  # Silent or broken clips give a log-mel that is one constant (log of the floor) in every bin. Its
  # per-bin normalisation must be exactly zero: a rounded mean (37 frames of log(1e-6) average to 1 ulp
  # off) left residues that the first LayerNorm amplified where the trained conv's biases are nearly equal,
  # and exported models differed from JAX by up to 3.5e-3 on such clips.
  encoder = audio_encoder.AudioEncoder(features=16, channels=(8, 8), num_segments=3)
  rng = np.random.default_rng(1)
  log_mel = rng.normal(size=(8, 37, 12)).astype(np.float32)
  log_mel[3] = np.float32(np.log(1e-6))
  mask = np.ones((8, 37), bool)
  variables = encoder.init(jax.random.key(0), log_mel, mask)
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), variables)
  bias = params["params"]["conv0"]["bias"]
  params["params"]["conv0"]["bias"] = 0.1 + 1e-3 * rng.normal(size=bias.shape).astype(np.float32)
  single = encoder.apply(params, log_mel[3:4], mask[3:4])[0][0]
  np.testing.assert_array_equal(encoder.apply(params, np.zeros_like(log_mel[3:4]), mask[3:4])[0][0], single)
  np.testing.assert_array_equal(encoder.apply(params, log_mel, mask)[0][3], single)


def test_empty_audio_gives_zero_vector_and_masked_tokens():
  encoder = audio_encoder.AudioEncoder(features=8, channels=(8,), num_segments=2)
  log_mel = np.ones((1, 10, 4), np.float32)
  mask = np.zeros((1, 10), bool)
  variables = encoder.init(jax.random.key(0), log_mel, mask)
  vector, tokens, token_mask = encoder.apply(variables, log_mel, mask)
  np.testing.assert_array_equal(vector, 0.0)
  np.testing.assert_array_equal(token_mask, False)
  assert np.all(np.isfinite(tokens))


def test_segment_pool_averages_equal_spans_of_the_valid_part():
  values = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)
  mask = jnp.asarray([[True] * 6 + [False] * 2])
  tokens, token_mask = audio_encoder.segment_pool(values, mask, 3)
  np.testing.assert_allclose(tokens[0, :, 0], [0.5, 2.5, 4.5])
  np.testing.assert_array_equal(token_mask, [[True, True, True]])
  # Fewer valid steps than segments: the missing segments are masked, not NaN.
  tokens, token_mask = audio_encoder.segment_pool(values, jnp.asarray([[True] + [False] * 7]), 3)
  np.testing.assert_array_equal(token_mask, [[True, False, False]])
  assert np.all(np.isfinite(tokens))


def test_masked_mean():
  values = jnp.asarray([[1.0, 2.0, 100.0]])
  np.testing.assert_allclose(audio_encoder.masked_mean(values, jnp.asarray([[True, True, False]]), 1), [1.5])
