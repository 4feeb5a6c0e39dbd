"""MobileNetV3-Small: torchvision's table, exact parameter count, BatchNorm train/eval behaviour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mer_jax.ops.cpu import kernels as cpu_kernels
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
      8, 24, 64, 32, 40, 72, 144]


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
  np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], 0.99 * old_mean + 0.01 * batch_mean,
                             rtol=1e-5, atol=1e-6)


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


def test_depthwise_conv_equals_grouped_conv_forward_and_backward():
  """The shifted-slice depthwise conv (fast on XLA CPU) is the same math as a grouped nn.Conv."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 6)), jnp.float32)
  for kernel_size, stride in ((3, 1), (3, 2), (5, 2), (5, 1)):
    ours = mobilenet_v3.DepthwiseConv(kernel_size, stride)
    variables = ours.init(jax.random.key(0), x)
    pad = (kernel_size - 1) // 2
    grouped = nn.Conv(6, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                      feature_group_count=6, use_bias=False)
    assert variables["params"]["kernel"].shape == (kernel_size, kernel_size, 1, 6)

    def loss(module, params, x):
      return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

    np.testing.assert_allclose(ours.apply(variables, x), grouped.apply(variables, x), atol=1e-5)
    for ours_grad, grouped_grad in zip(jax.grad(loss, argnums=(1, 2))(ours, variables["params"], x),
                                       jax.grad(loss, argnums=(1, 2))(grouped, variables["params"], x)):
      np.testing.assert_allclose(jax.tree.leaves(ours_grad), jax.tree.leaves(grouped_grad), atol=1e-4)


@pytest.mark.parametrize("size,kernel_size,stride", [(4, 5, 1), (8, 5, 2), (8, 3, 2), (11, 3, 2), (7, 5, 1),
                                                     (10, 3, 1)])
def test_depthwise_kernel_grad_matches_autodiff_of_shifted_slices(size, kernel_size, stride):
  """The hand-written gradients (of the XLA-op form: both the fully unrolled path for <= 16 output
  positions and the column-sum path; odd and even inputs; stride-2 phases; and of the model's choice,
  the FFI kernels on this CPU) equal autodiff of the plain formulation."""
  rng = np.random.default_rng(size * 10 + kernel_size + stride)
  x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 4)), jnp.float32)
  pad = (kernel_size - 1) // 2

  def loss(conv, x, kernel):
    return jnp.sum(jnp.sin(conv(x, kernel, stride, pad)) * jnp.arange(4.0))

  reference = jax.grad(loss, argnums=(1, 2))(mobilenet_v3.shifted_slices_conv, x, kernel)
  for conv in (mobilenet_v3.shifted_slices_depthwise_conv, mobilenet_v3.depthwise_conv):
    ours = jax.grad(loss, argnums=(1, 2))(conv, x, kernel)
    np.testing.assert_allclose(ours[0], reference[0], atol=1e-5)
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(ours[1]).max()) > 0.1  # a real gradient, not zeros on both sides
  # bf16 compute: the kernel gradient keeps the kernel's dtype and stays close to the float32 one.
  bf16 = jax.grad(loss, argnums=2)(mobilenet_v3.depthwise_conv, x.astype(jnp.bfloat16),
                                   kernel.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  scale = float(jnp.abs(reference[1]).max())
  np.testing.assert_allclose(np.asarray(bf16, np.float32), reference[1], rtol=0.1, atol=0.1 * scale)


@pytest.mark.parametrize("height,width,kernel_size,stride", [(7, 8, 5, 2), (14, 11, 5, 2), (9, 4, 3, 2),
                                                             (5, 6, 5, 1), (28, 27, 3, 2)])
def test_depthwise_input_grad_gather_form_matches_autodiff(height, width, kernel_size, stride):
  """The phase-by-phase gather-form input gradient equals autodiff's scatter form, odd and even, H != W."""
  rng = np.random.default_rng(height * width + kernel_size)
  x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 3)), jnp.float32)
  pad = (kernel_size - 1) // 2
  outputs, vjp = jax.vjp(lambda inputs: mobilenet_v3.shifted_slices_conv(inputs, kernel, stride, pad), x)
  output_grad = jnp.asarray(rng.normal(size=outputs.shape), jnp.float32)
  (expected,) = vjp(output_grad)
  got = mobilenet_v3.depthwise_input_grad(output_grad, kernel, stride, pad, height, width)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(expected).max()) > 0.5


def test_pointwise_conv_equals_nn_conv_forward_and_backward():
  """The 1x1 conv with a channel-major weight gradient is nn.Conv's math and parameter: same kernel (shape
  and initial values), same outputs, same input and kernel gradients; bf16 keeps the kernel's dtype."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)
  ours, reference = mobilenet_v3.PointwiseConv(10), nn.Conv(10, (1, 1), use_bias=False)
  variables = ours.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (1, 1, 6, 10)}}
  np.testing.assert_array_equal(variables["params"]["kernel"], reference.init(jax.random.key(3), x)["params"]["kernel"])

  def loss(module, params, inputs):
    return jnp.sum(jnp.sin(module.apply({"params": params}, inputs)) * jnp.arange(10.0))

  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  ours_grads = jax.grad(loss, argnums=(1, 2))(ours, variables["params"], x)
  reference_grads = jax.grad(loss, argnums=(1, 2))(reference, variables["params"], x)
  np.testing.assert_allclose(ours_grads[0]["kernel"], reference_grads[0]["kernel"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_grads[1], reference_grads[1], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(ours_grads[0]["kernel"]).max()) > 0.1
  bf16 = jax.grad(lambda k: jnp.sum(mobilenet_v3.pointwise_conv(x.astype(jnp.bfloat16), k) ** 2))(
      variables["params"]["kernel"][0, 0].astype(jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("height,width,kernel_size,stride,use_bias", [
    (12, 12, 3, 2, False), (9, 7, 3, 2, True), (8, 11, 3, 1, True), (10, 10, 5, 2, False), (11, 6, 5, 1, True)])
def test_single_channel_conv_equals_nn_conv_forward_and_backward(height, width, kernel_size, stride, use_bias,
                                                                  form):
  """The grey-input conv as shifted slices (kernel and input gradients by FFI kernels, or by XLA) is nn.Conv's
  math and parameters: same variables (shapes and initial values), same outputs, same kernel, bias and input
  gradients, odd sizes included."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, height, width, 1)), jnp.float32)
  pad = (kernel_size - 1) // 2
  ours = mobilenet_v3.SingleChannelConv(6, kernel_size, stride, use_bias=use_bias)
  reference = nn.Conv(6, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                      use_bias=use_bias)
  variables = ours.init(jax.random.key(4), x)
  reference_variables = reference.init(jax.random.key(4), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference_variables)
  np.testing.assert_array_equal(variables["params"]["kernel"], reference_variables["params"]["kernel"])
  params = jax.tree.map(lambda v: v + 0.1, variables["params"])  # a non-zero bias

  def loss(module, params, inputs):
    return jnp.sum(jnp.sin(module.apply({"params": params}, inputs)) * jnp.arange(6.0))

  np.testing.assert_allclose(ours.apply({"params": params}, x), reference.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)
  traced = str(jax.make_jaxpr(lambda p, x: jax.grad(loss, argnums=(1, 2))(ours, p, x))(params, x))
  assert (cpu_kernels.ONE_CHANNEL_KERNEL_GRAD_TARGET in traced) == (form == "kernels")
  assert (cpu_kernels.ONE_CHANNEL_INPUT_GRAD_TARGET in traced) == (form == "kernels")
  ours_grads = jax.grad(loss, argnums=(1, 2))(ours, params, x)
  reference_grads = jax.grad(loss, argnums=(1, 2))(reference, params, x)
  for got, expected in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(ours_grads[0]["kernel"]).max()) > 0.1 and float(jnp.abs(ours_grads[1]).max()) > 0.1
  with pytest.raises(ValueError, match="N, H, W, 1"):
    ours.apply({"params": params}, jnp.zeros((1, height, width, 2)))


@pytest.mark.parametrize("shape,features,stride", [((3, 9, 7, 8), 16, 2), ((2, 8, 8, 5), 6, 1)])
def test_small_conv_equals_nn_conv_forward_and_backward(shape, features, stride, form):
  """SmallConv (the frame trunks' later convs; kernel gradient by the FFI kernel or by XLA) is nn.Conv: same
  variables, outputs, and kernel, bias and input gradients."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = mobilenet_v3.SmallConv(features, 3, stride)
  reference = nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
  variables, reference_variables = ours.init(jax.random.key(5), x), reference.init(jax.random.key(5), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference_variables)
  np.testing.assert_array_equal(variables["params"]["kernel"], reference_variables["params"]["kernel"])
  params = jax.tree.map(lambda v: v + 0.1, variables["params"])

  def loss(module, params, inputs):
    return jnp.sum(jnp.sin(module.apply({"params": params}, inputs)) * jnp.arange(features, dtype=jnp.float32))

  traced = str(jax.make_jaxpr(lambda p, x: jax.grad(loss, argnums=(1, 2))(ours, p, x))(params, x))
  assert (cpu_kernels.CONV_KERNEL_GRAD_TARGET in traced) == (form == "kernels")
  np.testing.assert_allclose(ours.apply({"params": params}, x), reference.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)
  ours_grads = jax.grad(loss, argnums=(1, 2))(ours, params, x)
  reference_grads = jax.grad(loss, argnums=(1, 2))(reference, params, x)
  for got, expected in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(reference_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  assert float(jnp.abs(ours_grads[0]["kernel"]).max()) > 0.1


def test_backbone_train_gradients_do_not_depend_on_the_cpu_paths(backbone_and_variables, monkeypatch):
  """On the CPU, training takes PointwiseConv for the 1x1 convs and SingleChannelConv for the grey stem; the
  nn.Conv path (other backends) gives the same loss and parameter gradients."""
  backbone, variables, images = backbone_and_variables

  def loss(params):
    features, _ = backbone.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                 train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(features))

  # PointwiseConv multiplies with dot_general; nn.Conv convolves: count the products in the gradient.
  products = lambda: str(jax.make_jaxpr(jax.grad(loss))(variables["params"])).count("dot_general")
  cpu_products = products()
  cpu_loss, cpu_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert products() < cpu_products  # the two runs really took different paths
  other_loss, other_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  np.testing.assert_allclose(cpu_loss, other_loss, rtol=1e-5)
  flat_cpu, flat_other = jax.tree.leaves(cpu_grads), jax.tree.leaves(other_grads)
  for got, expected in zip(flat_cpu, flat_other):
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(jnp.abs(expected).max()) + 1e-6)
