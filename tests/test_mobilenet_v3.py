"""MobileNetV3-Small: torchvision's table, exact parameter count, BatchNorm train/eval behaviour, the same
loss and gradients under every ops form (the ops themselves: tests/test_ops.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax import ops
from mer_jax.models import mobilenet_v3


@pytest.fixture(scope="module")
def backbone_and_variables():
  backbone = mobilenet_v3.MobileNetV3Small()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 1)), jnp.float32)
  return backbone, backbone.init(jax.random.key(0), images, train=False), images


def test_parameter_count_is_torchvision_small_with_grey_stem(backbone_and_variables):
  _, variables, _ = backbone_and_variables
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  # torchvision mobilenet_v3_small().features has 927,008 parameters with an RGB stem; 1 channel saves 16*3*3*2.
  assert params == 926_720
  assert params == 927_008 - 16 * 3 * 3 * 2


def test_block_table_and_squeeze_channels(backbone_and_variables):
  _, variables, _ = backbone_and_variables
  params = variables["params"]
  assert len(mobilenet_v3.SMALL_BLOCKS) == 11
  assert params["stem"]["conv"]["kernel"].shape == (3, 3, 1, 16)
  # The first block has no expansion conv (expanded == input channels) but has SE with 8 squeeze channels.
  assert "expand" not in params["block0"]
  assert params["block0"]["se"]["fc1"]["kernel"].shape == (1, 1, 16, 8)
  # Depthwise convs have one input channel per group.
  assert params["block3"]["depthwise"]["conv"]["kernel"].shape == (5, 5, 1, 96)
  assert params["block8"]["se"]["fc1"]["kernel"].shape == (1, 1, 288, 72)
  assert params["last"]["conv"]["kernel"].shape == (1, 1, 96, 576)
  assert [mobilenet_v3.make_divisible(c // 4) for c in (16, 96, 240, 120, 144, 288, 576)] == [
    8,
    24,
    64,
    32,
    40,
    72,
    144,
  ]


def test_output_shape_and_total_stride():
  backbone = mobilenet_v3.MobileNetV3Small()
  images = jnp.zeros((3, 112, 112, 1))
  variables = backbone.init(jax.random.key(0), images, train=False)
  features = backbone.apply(variables, images, train=False)
  assert features.shape == (3, 576)
  # 5 stride-2 stages (stem + 4 blocks): 112 -> 4 spatial.
  assert sum(spec.stride == 2 for spec in mobilenet_v3.SMALL_BLOCKS) + 1 == 5


def test_batchnorm_eval_uses_running_stats_and_train_updates_them(backbone_and_variables):
  backbone, variables, images = backbone_and_variables
  out_eval_1 = backbone.apply(variables, images, train=False)
  out_eval_single = backbone.apply(variables, images[:1], train=False)
  # Eval mode: each example is independent of the rest of the batch.
  np.testing.assert_allclose(out_eval_1[:1], out_eval_single, atol=1e-5)
  out_train, updates = backbone.apply(variables, images, train=True, mutable=["batch_stats"])
  out_train_single, _ = backbone.apply(variables, images[:1], train=True, mutable=["batch_stats"])
  # Train mode: batch statistics couple the examples.
  assert not np.allclose(out_train[:1], out_train_single, atol=1e-4)
  old_mean = variables["batch_stats"]["stem"]["bn"]["mean"]
  new_mean = updates["batch_stats"]["stem"]["bn"]["mean"]
  assert not np.allclose(old_mean, new_mean)


def test_running_mean_update_follows_torch_momentum():
  layer = mobilenet_v3.ConvBatchNorm(features=4, kernel=1)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 5, 5, 3)), jnp.float32)
  variables = layer.init(jax.random.key(0), x, train=False)
  kernel = variables["params"]["conv"]["kernel"]
  batch_mean = jnp.mean(jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0]), axis=(0, 1, 2))
  _, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  old_mean = variables["batch_stats"]["bn"]["mean"]
  # torch momentum 0.01 == flax momentum 0.99: running = 0.99 * running + 0.01 * batch.
  np.testing.assert_allclose(
    updates["batch_stats"]["bn"]["mean"], 0.99 * old_mean + 0.01 * batch_mean, rtol=1e-5, atol=1e-6
  )


def test_symmetric_padding_like_torch():
  conv = mobilenet_v3.ConvBatchNorm(features=1, kernel=3, stride=2)
  x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
  variables = conv.init(jax.random.key(0), x, train=False)
  params = dict(variables["params"])
  params["conv"] = {"kernel": jnp.ones((3, 3, 1, 1))}
  y = conv.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
  # torch pads 1 on every side, so output (0, 0) covers input rows/cols -1..1 and sees the corner pixel.
  assert y.shape == (1, 2, 2, 1)
  assert float(y[0, 0, 0, 0]) > 0.9 and float(jnp.abs(y[0, 1, 1, 0])) < 1e-6


@pytest.fixture(scope="module")
def reference_loss_and_grads(backbone_and_variables):
  _, variables, images = backbone_and_variables
  return _backbone_loss_and_grads(ops.REFERENCE, variables, images)


def _backbone_loss_and_grads(ops_form, variables, images):
  backbone = mobilenet_v3.MobileNetV3Small(ops=ops_form)

  def loss(params):
    features, _ = backbone.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jnp.sin(features))

  convs = str(jax.make_jaxpr(jax.grad(loss))(variables["params"])).count("conv_general_dilated")
  return jax.jit(jax.value_and_grad(loss))(variables["params"]), convs


def test_backbone_train_loss_and_gradients_are_equal_under_every_form(
  backbone_and_variables, reference_loss_and_grads, non_reference_form
):
  """Training takes the form's depthwise, 1x1 and grey-stem convs and BatchNorm sums; the loss and every
  parameter gradient equal the reference form's."""
  ops_form = non_reference_form
  _, variables, images = backbone_and_variables
  (got_loss, got_grads), convs = _backbone_loss_and_grads(ops_form, variables, images)
  (want_loss, want_grads), reference_convs = reference_loss_and_grads
  assert convs < reference_convs  # the runs really took different paths
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  # The project BatchNorms' bias gradients are zero up to rounding (the next block's BatchNorm removes any
  # constant shift): their bound is a small fraction of the largest gradient, not of their own noise.
  largest = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(want_grads))
  for got, expected in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(jnp.abs(expected).max()) + 1e-6 * largest)
