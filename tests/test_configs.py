"""Every config file's get_config() builds, and the model it describes initialises (abstractly)."""

import glob
import importlib
import os

import jax
import pytest

from mer_jax.models import emotion_model as model_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_NAMES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not os.path.basename(p).startswith("_"))


def test_there_are_configs():
  assert {"default", "base", "tiny"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_get_config_builds_a_model(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key in ("model", "data", "seed", "batch_size", "eval_batch_size"):
    assert key in config, f"configs/{name}.py lacks {key}"
  assert 1 <= config.model.top_k <= config.data.num_frames
  assert set(config.model.tasks) == set(config.data.tasks)
  model = model_lib.EmotionModel(config.model)
  batch = model_lib.zeros_batch(config, 2)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, batch, train=False))
  logits, explanation = jax.eval_shape(lambda v: model.apply(v, batch, train=False), shapes)
  for task, classes in config.model.tasks.items():
    assert logits[task].shape == (2, classes)
  assert explanation["selected_indices"].shape == (2, config.model.top_k)
  if config.model.size == "edge":
    assert model_lib.count_parameters(shapes["params"]) < 10_000_000
  # The docstring holds the exact launch command.
  module = importlib.import_module(f"configs.{name}")
  assert f"configs/{name}.py" in (module.__doc__ or ""), f"configs/{name}.py docstring lacks its launch command"
