"""Text-guided Top-K frame selection: the straight-through selection and the gather compose with jit/vmap/grad,
the scorer follows the text and gives the same scores and gradients under every ops form. (The ops themselves,
exact K-hot forward and surrogate gradient included: tests/test_ops.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax import ops
from mer_jax.models import frame_selector as topk
from mer_jax.ops import reference


def random_scores(batch=3, frames=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, frames)), jnp.float32)


def test_forward_is_exactly_k_hot_on_the_top_scores_in_time_order():
  scores = random_scores()
  selection = ops.REFERENCE.straight_through_topk(scores, 4, 1.0)
  assert selection.shape == (3, 4, 12)
  assert set(np.unique(np.asarray(selection))) <= {0.0, 1.0}
  np.testing.assert_array_equal(selection.sum(-1), 1.0)  # one frame per slot
  chosen = np.asarray(selection.sum(1))
  assert np.all(chosen.sum(-1) == 4) and chosen.max() == 1.0  # K distinct frames
  top4 = np.sort(np.argsort(-np.asarray(scores), axis=-1)[:, :4], axis=-1)
  np.testing.assert_array_equal(np.argmax(np.asarray(selection), -1), top4)
  np.testing.assert_array_equal(reference.sort_free_topk_indices(scores, 4), top4)


def test_gradient_is_nonzero_and_equals_the_soft_surrogate_gradient():
  scores = random_scores()
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 12)), jnp.float32)
  hard_grad = jax.grad(lambda s: jnp.sum(ops.REFERENCE.straight_through_topk(s, 4, 0.5) * weights))(scores)
  soft_grad = jax.grad(lambda s: jnp.sum(reference.soft_selection_surrogate(s, 4, 0.5) * weights))(scores)
  assert float(jnp.abs(hard_grad).max()) > 1e-3
  np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-6, atol=1e-7)


def test_jit_vmap_grad_compose(ops_form):
  scores = random_scores(batch=2)
  frames = jnp.asarray(np.random.default_rng(2).integers(0, 255, (2, 12, 8, 8, 1)), jnp.uint8)

  def loss(s, f):
    return jnp.sum(ops_form.frame_gather(ops_form.straight_through_topk(s, 3, 1.0), f) ** 2)

  eager = jax.grad(loss)(scores, frames)
  jitted = jax.jit(jax.grad(loss))(scores, frames)
  # vmap over an extra leading axis of independent problems.
  vmapped = jax.vmap(jax.grad(loss))(scores[None], frames[None])[0]
  np.testing.assert_allclose(eager, jitted, rtol=1e-4)
  np.testing.assert_allclose(eager, vmapped, rtol=1e-4)
  assert float(jnp.abs(eager).sum()) > 0


def test_unchosen_frames_cannot_change_the_gathered_output(ops_form):
  scores = random_scores(batch=2)
  rng = np.random.default_rng(3)
  frames = jnp.asarray(rng.integers(0, 255, (2, 12, 8, 8, 1)), jnp.uint8)
  selection = ops_form.straight_through_topk(scores, 4, 1.0)
  gathered = ops_form.frame_gather(selection, frames)
  chosen = np.asarray(selection.sum(1)) > 0
  changed = np.where(chosen[:, :, None, None, None], np.asarray(frames), rng.integers(0, 255, frames.shape))
  gathered_changed = ops_form.frame_gather(selection, jnp.asarray(changed, jnp.uint8))
  np.testing.assert_array_equal(gathered, gathered_changed)
  # And the gathered frames are exactly the chosen ones, in time order.
  indices = np.asarray(reference.sort_free_topk_indices(scores, 4))
  np.testing.assert_array_equal(
    gathered, np.take_along_axis(np.asarray(frames, np.float32), indices[:, :, None, None, None], axis=1)
  )


def test_text_guided_selector_follows_the_text():
  """Two texts, same frames: the scorer's choice depends on the text vector."""
  selector = topk.TopKFrameSelector(k=2, scorer_channels=(4, 8, 8), scorer_query_dim=8, scorer_downscale=1)
  rng = np.random.default_rng(4)
  frames = jnp.asarray(rng.integers(0, 255, (1, 6, 16, 16, 1)), jnp.uint8)
  text_a = jnp.asarray(rng.normal(size=(1, 16)), jnp.float32)
  variables = selector.init(jax.random.key(0), frames, text_a, jnp.ones((1,), bool))
  _, scores_a, _ = selector.apply(variables, frames, text_a, jnp.ones((1,), bool))
  _, scores_b, _ = selector.apply(variables, frames, -text_a, jnp.ones((1,), bool))
  assert not np.allclose(scores_a, scores_b)
  _, scores_none, indices_none = selector.apply(variables, frames, text_a, jnp.zeros((1,), bool))
  np.testing.assert_array_equal(scores_none, 0.0)
  np.testing.assert_array_equal(indices_none, [[0, 1]])


def test_k_out_of_range_is_a_clear_error():
  selector = topk.TopKFrameSelector(k=7)
  frames = jnp.zeros((1, 6, 16, 16, 1), jnp.uint8)
  with pytest.raises(ValueError, match="top_k=7"):
    selector.init(jax.random.key(0), frames, jnp.zeros((1, 8)), jnp.ones((1,), bool))


def test_word_query_sums_the_vectors_of_the_real_tokens_only():
  query = topk.WordQuery(vocab_size=20, features=4)
  ids = jnp.asarray([[3, 7, 3, 9, 9], [1, 2, 3, 4, 5]])
  mask = jnp.asarray([[True, True, True, False, False], [False] * 5])
  variables = query.init(jax.random.key(0), ids, mask)
  table = np.asarray(variables["params"]["embedding"]["embedding"])
  vectors = np.asarray(query.apply(variables, ids, mask))
  np.testing.assert_allclose(vectors[0], 2 * table[3] + table[7], rtol=1e-6)  # a repeated word counts twice
  np.testing.assert_array_equal(vectors[1], 0.0)  # no tokens: a zero vector
  # Padding ids never matter, whatever they are.
  np.testing.assert_array_equal(query.apply(variables, ids.at[0, 3:].set(11), mask), vectors)


def test_frame_evidence_gives_each_frame_its_own_logits():
  evidence = topk.FrameEvidence(num_classes=3, channels=(4, 8, 8), downscale=1)
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 5, 16, 16, 1)), jnp.uint8)
  variables = evidence.init(jax.random.key(0), frames)
  logits = evidence.apply(variables, frames)
  assert logits.shape == (2, 5, 3) and logits.dtype == jnp.float32
  # A frame's logits depend on that frame alone.
  changed = evidence.apply(variables, frames.at[1, 2].set(0))
  np.testing.assert_array_equal(changed[0], logits[0])
  np.testing.assert_array_equal(changed[1, [0, 1, 3, 4]], logits[1, [0, 1, 3, 4]])
  assert not np.allclose(changed[1, 2], logits[1, 2])


@pytest.mark.parametrize(
  "shape, downscale", [((2, 3, 112, 112, 1), 2), ((1, 2, 13, 11, 1), 2), ((1, 2, 16, 16, 1), 4), ((1, 2, 8, 8, 1), 1)]
)
def test_downscaled_pixels_equal_average_pooling_of_centred_pixels(shape, downscale):
  """The strided-slice sum is nn.avg_pool (VALID: remainder rows/columns dropped) of (x - 127.5) / 64."""
  import flax.linen as nn

  frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  centred = (frames.reshape((-1,) + shape[2:]).astype(jnp.float32) - 127.5) / 64.0
  expected = nn.avg_pool(centred, (downscale, downscale), strides=(downscale, downscale))
  got = topk.downscaled_pixels(frames, downscale, jnp.float32)
  assert got.shape == (shape[0] * shape[1], shape[2] // downscale, shape[3] // downscale, 1)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
  assert float(jnp.std(got)) > 0.1  # varied pixels, not a constant image


def test_scorer_gives_equal_scores_and_gradients_under_every_form(ops_form):
  """The scorer's grey first conv and its later convs run as the form's grey_conv and conv; every form reads
  the same parameters and gives the reference form's scores and gradients."""
  rng = np.random.default_rng(5)
  frames = jnp.asarray(rng.integers(0, 256, (2, 3, 24, 20, 1)), jnp.uint8)
  text = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)

  def run(form):
    scorer = topk.FrameScorer(channels=(4, 8, 8), query_dim=8, downscale=2, ops=form)
    variables = scorer.init(jax.random.key(0), frames, text)

    def loss(params):
      scores = scorer.apply({"params": params}, frames, text)
      return jnp.sum(jnp.sin(scores) * jnp.arange(3.0)), scores

    (_, scores), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return variables, scores, grads

  variables, scores, grads = run(ops_form)
  reference_variables, reference_scores, reference_grads = run(ops.REFERENCE)
  assert jax.tree.structure(variables) == jax.tree.structure(reference_variables)
  for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(reference_variables)):
    np.testing.assert_array_equal(got, expected)
  np.testing.assert_allclose(scores, reference_scores, rtol=1e-5, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(grads["conv0"]["kernel"]).max()) > 1e-3
