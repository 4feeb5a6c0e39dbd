"""Compact text encoder and the TextEncoder switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.models import text_encoder

SMALL = dict(vocab_size=50, features=16, num_layers=1, num_heads=2, mlp_dim=32, max_length=8)


def test_padding_does_not_change_valid_states_and_pooling_is_masked():
  encoder = text_encoder.TextEncoder("compact", SMALL)
  ids = jnp.asarray([[5, 6, 7, 0, 0, 0]], jnp.int32)
  mask = ids > 0
  variables = encoder.init(jax.random.key(0), ids, mask, train=False)
  states, pooled = encoder.apply(variables, ids, mask, train=False)
  states_2, pooled_2 = encoder.apply(variables, ids.at[0, 4].set(9), mask, train=False)
  np.testing.assert_allclose(states[0, :3], states_2[0, :3], atol=1e-5)
  np.testing.assert_allclose(pooled, pooled_2, atol=1e-5)
  np.testing.assert_allclose(pooled[0], states[0, :3].mean(0), atol=1e-5)
  # Word order matters (learned positions).
  swapped, _ = encoder.apply(variables, jnp.asarray([[7, 6, 5, 0, 0, 0]]), mask, train=False)
  assert not np.allclose(states[0, 0], swapped[0, 2], atol=1e-4)


def test_dropout_only_in_training():
  encoder = text_encoder.TextEncoder("compact", SMALL)
  ids = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
  mask = jnp.ones_like(ids, bool)
  variables = encoder.init(jax.random.key(0), ids, mask, train=False)
  eval_a = encoder.apply(variables, ids, mask, train=False)[0]
  eval_b = encoder.apply(variables, ids, mask, train=False)[0]
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = encoder.apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.key(1)})[0]
  train_b = encoder.apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.key(2)})[0]
  assert not np.allclose(train_a, train_b)


def test_errors_name_the_fix():
  encoder = text_encoder.TextEncoder("compact", SMALL)
  ids = jnp.ones((1, 9), jnp.int32)
  with pytest.raises(ValueError, match="max_length"):
    encoder.init(jax.random.key(0), ids, ids > 0, train=False)
  with pytest.raises(ValueError, match="compact' or 'minilm"):
    text_encoder.TextEncoder("bert-large").init(jax.random.key(0), ids, ids > 0, train=False)


def test_minilm_kind_has_minilm_width():
  encoder = text_encoder.TextEncoder("minilm")
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), ids, ids > 0, train=False))
  assert shapes["params"]["minilm"] is not None
  out = jax.eval_shape(lambda v: encoder.apply(v, ids, ids > 0, train=False), shapes)
  assert out[0].shape == (1, 4, 384) and out[1].shape == (1, 384)
  assert text_encoder.text_features("minilm", None) == 384


def test_the_pooled_vector_is_the_utterances_whose_tokens_read_the_context():
  """[CLS] utterance [SEP] context [SEP]: the pooled vector averages the first segment only, and the context still
  changes it through attention."""
  sep = 102
  encoder = text_encoder.TextEncoder("compact", dict(SMALL, vocab_size=120), "utterance")
  ids = jnp.asarray([[101, 5, 6, sep, 7, 8, sep, 0]], jnp.int32)
  mask = ids > 0
  np.testing.assert_array_equal(text_encoder.utterance_mask(ids, mask), [[1, 1, 1, 1, 0, 0, 0, 0]])
  no_context = jnp.asarray([[101, 5, 6, sep, 0, 0, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(text_encoder.utterance_mask(no_context, no_context > 0), no_context > 0)
  variables = encoder.init(jax.random.key(0), ids, mask, train=False)
  states, pooled = encoder.apply(variables, ids, mask, train=False)
  np.testing.assert_allclose(pooled[0], states[0, :4].mean(0), atol=1e-5)
  _, other_context = encoder.apply(variables, ids.at[0, 4].set(9), mask, train=False)
  assert not np.allclose(pooled, other_context, atol=1e-4)
  # pool 'all' (the default, and every run trained before the option) averages both segments.
  _, pooled_all = text_encoder.TextEncoder("compact", dict(SMALL, vocab_size=120)).apply(
    variables, ids, mask, train=False
  )
  np.testing.assert_allclose(pooled_all[0], states[0, :7].mean(0), atol=1e-5)
  with pytest.raises(ValueError, match="'all' or 'utterance'"):
    text_encoder.pooling_mask("cls", ids, mask)
