"""The PyTorch reference (benchmarks/torch_reference.py) is the same model as mer_jax: parameter counts,
shapes, K-hot selection, the straight-through gradient and, with ported weights, the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
  "torch", reason="PyTorch is a benchmark-only dependency: pip install -r requirements-bench.txt"
)

from benchmarks import torch_reference, torch_train, workers  # noqa: E402
from configs import default, demo, tiny  # noqa: E402
from mer_jax import ops  # noqa: E402
from mer_jax.models import emotion_model as model_lib  # noqa: E402


def flax_params(config):
  model = model_lib.EmotionModel(config.model)
  return jax.eval_shape(
    lambda: model.init({"params": jax.random.key(0)}, model_lib.zeros_batch(config, 1), train=False)
  )["params"]


def module_counts(params) -> dict:
  return {name: model_lib.count_parameters(tree) for name, tree in params.items()}


@pytest.mark.parametrize("config_module", [default, tiny, demo], ids=["edge", "tiny", "demo"])
def test_parameter_counts_equal_module_by_module(config_module):
  config = config_module.get_config()
  params = flax_params(config)
  torch_model = torch_reference.TorchEmotionModel(config.model, config.data.num_mel_bins)
  torch_counts = {
    name: torch_reference.count_parameters(child)
    for name, child in torch_model.named_children()
    if torch_reference.count_parameters(child)
  }
  assert torch_counts == module_counts(params)
  assert torch_reference.count_parameters(torch_model) == model_lib.count_parameters(params)
  if config_module is default:
    assert torch_counts["backbone"] == 926_720  # torchvision's MobileNetV3-Small, 1 grey channel


def tiny_batch(config, size=3):
  batch = workers.make_batch(config, size, seed=4)
  batch["has_video"][:] = [True, True, False, True][:size]
  batch["has_audio"][:] = [True, False, True, True][:size]
  return batch


def test_forward_shapes():
  config = tiny.get_config()
  model = torch_reference.TorchEmotionModel(config.model, config.data.num_mel_bins).eval()
  batch = tiny_batch(config)
  with torch.no_grad():
    logits, explanation = model(torch_reference.batch_to_torch(workers.model_inputs(batch)))
  assert {task: tuple(v.shape) for task, v in logits.items()} == {"emotion": (3, 7), "sentiment": (3, 3)}
  t, k, width = config.data.num_frames, config.model.top_k, config.model.width
  heads, length = config.model.attention.num_heads, config.data.max_text_length
  assert tuple(explanation["frame_scores"].shape) == (3, t)
  assert tuple(explanation["selected_indices"].shape) == (3, k)
  assert tuple(explanation["gate"].shape) == (3, width)
  assert tuple(explanation["attention"].shape) == (3, heads, length, 1 + k + config.model.audio.num_segments)
  assert explanation["reliability_audio"][1] == 0 and explanation["reliability_video"][2] == 0


def test_straight_through_topk_is_k_hot_in_time_order_with_jax_ties():
  scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
  selection = torch_reference.StraightThroughTopK.apply(scores, 3, 1.0)
  assert tuple(selection.shape) == (2, 3, 5)
  assert torch.all(selection.sum(-1) == 1) and set(selection.unique().tolist()) == {0.0, 1.0}
  assert selection.argmax(-1).tolist() == [[1, 2, 3], [0, 1, 2]]
  want = ops.REFERENCE.straight_through_topk(jnp.asarray(scores.numpy()), 3, 1.0)
  np.testing.assert_array_equal(selection.numpy(), np.asarray(want))


def test_straight_through_gradient_matches_jax_custom_vjp():
  rng = np.random.default_rng(0)
  scores, cotangent = rng.normal(size=(4, 12)).astype(np.float32), rng.normal(size=(4, 3, 12)).astype(np.float32)
  scores_t = torch.tensor(scores, requires_grad=True)
  torch_reference.StraightThroughTopK.apply(scores_t, 3, 0.7).backward(torch.tensor(cotangent))
  _, vjp = jax.vjp(lambda s: ops.REFERENCE.straight_through_topk(s, 3, 0.7), jnp.asarray(scores))
  np.testing.assert_allclose(scores_t.grad.numpy(), np.asarray(vjp(jnp.asarray(cotangent))[0]), atol=1e-6)


def test_ported_flax_weights_give_the_same_outputs():
  config = tiny.get_config()
  variables = model_lib.init_variables(config, jax.random.key(1))
  batch = tiny_batch(config)
  inputs = workers.model_inputs(batch)
  apply = jax.jit(lambda v, b: model_lib.EmotionModel(config.model).apply(v, b, train=False))
  logits, explanation = apply(variables, inputs)
  model = torch_reference.TorchEmotionModel(config.model, config.data.num_mel_bins)
  torch_reference.load_flax_variables(model, variables)
  with torch.no_grad():
    torch_logits, torch_explanation = model.eval()(torch_reference.batch_to_torch(inputs))
  for task in logits:
    np.testing.assert_allclose(torch_logits[task].numpy(), np.asarray(logits[task]), atol=1e-5)
  np.testing.assert_array_equal(
    torch_explanation["selected_indices"].numpy(), np.asarray(explanation["selected_indices"])
  )
  for key in ("frame_scores", "gate", "reliability_video", "reliability_audio"):
    np.testing.assert_allclose(torch_explanation[key].numpy(), np.asarray(explanation[key]), atol=1e-5)
  # Rows of padded text queries differ by design (see SelfAttention); every valid query row agrees.
  valid = batch["text_mask"][:, None, :, None]
  np.testing.assert_allclose(
    torch_explanation["attention"].numpy() * valid, np.asarray(explanation["attention"]) * valid, atol=1e-5
  )


def test_torch_train_step_learns_and_updates_batch_norm():
  config = tiny.get_config()
  config.warmup_steps, config.learning_rate = 0, 3e-3
  trainer = torch_train.TorchTrainer(config, channels_last=True)
  batch = torch_reference.batch_to_torch(tiny_batch(config, 4))
  before = trainer.model.backbone.stem.bn.running_mean.clone()
  losses = [float(trainer.step(batch)["loss"]) for _ in range(8)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert not torch.equal(before, trainer.model.backbone.stem.bn.running_mean)
