"""Every config file's get_config() builds, and the model it describes initialises (abstractly); the package's
snapshot of configs/default.py is current, and old config.json files load with its values for missing fields.

Regenerate the snapshot (after changing configs/default.py), from the repository root:
  python -m tests.test_configs --write-defaults
"""

import glob
import importlib
import json
import os
import sys

import jax
import pytest

from configs import default
from mer_jax import ops as ops_lib
from mer_jax.models import emotion_model as model_lib
from mer_jax.training import run_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULTS_SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(run_config.__file__)), run_config.DEFAULT_CONFIG_FILE)
WRITE_DEFAULTS = "python -m tests.test_configs --write-defaults"
CONFIG_NAMES = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
  if not os.path.basename(p).startswith("_")
)


# The arguments a config's get_config takes (configs/NAME.py:ARGUMENT); '' = none.
CONFIG_ARGUMENTS = {"meld": ("", "accelerator"), "meld_text": ("", "edge")}
CONFIGS = [(name, argument) for name in CONFIG_NAMES for argument in CONFIG_ARGUMENTS.get(name, ("",))]


def get_config(name: str, argument: str = ""):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(argument) if argument else module.get_config()


def test_there_are_configs():
  assert {"default", "base", "tiny"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name,argument", CONFIGS)
def test_get_config_builds_a_model(name, argument):
  config = get_config(name, argument)
  for key in ("model", "data", "seed", "batch_size", "eval_batch_size"):
    assert key in config, f"configs/{name}.py lacks {key}"
  assert 1 <= config.model.top_k <= config.data.num_frames
  assert set(config.model.tasks) == set(config.data.tasks)
  # The heads are those config.data's tasks and classes ask for: training resolves them to the same values.
  assert run_config.resolve_tasks(config).model.tasks.to_dict() == config.model.tasks.to_dict()
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


# Each config's steps at its batch size for the train split it is tuned on (the demo corpus: 2,000 clips; MELD: 9,989
# utterances): the step counts these configs had before they were given in epochs, so trained results stay the same
# (meld_text: 4 passes since issue 25, was 6).
# (config, argument, train examples) -> (steps per epoch, train steps, warmup, eval every, checkpoint every)
RESOLVED_STEPS = {
  ("default", "", 2000): (63, 3000, 200, 500, 500),
  ("base", "", 2000): (63, 3000, 200, 500, 500),
  ("demo", "", 2000): (63, 1200, 50, 100, 100),
  ("tiny", "", 2000): (500, 3000, 200, 500, 500),
  ("meld", "", 9989): (313, 10000, 500, 1000, 1000),
  ("meld", "accelerator", 9989): (20, 639, 32, 64, 64),
  ("meld_text", "", 9989): (313, 1248, 125, 312, 312),
  ("meld_text", "edge", 9989): (313, 1248, 125, 312, 312),
}


@pytest.mark.parametrize("name,argument,examples", sorted(RESOLVED_STEPS))
def test_configs_resolve_to_their_tuned_steps(name, argument, examples):
  config = get_config(name, argument)
  resolved = run_config.resolve_steps(config, examples)
  fields = [steps_field for steps_field, _ in run_config.EPOCH_FIELDS]
  per_epoch = run_config.steps_per_epoch(examples, config.batch_size)
  assert (per_epoch, *(resolved[field] for field in fields)) == RESOLVED_STEPS[(name, argument, examples)]
  assert all(config[field] == run_config.FROM_EPOCHS for field in fields)  # a copy: the config stays in epochs
  assert run_config.steps_resolved(resolved) and not run_config.steps_resolved(config)


def test_steps_follow_the_batch_size_and_explicit_steps_win(caplog):
  config = get_config("meld")
  small, large = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  large.batch_size = 512
  with caplog.at_level("INFO"):
    small, large = run_config.resolve_steps(small, 512 * 20), run_config.resolve_steps(large, 512 * 20)
  assert "10240 train examples / global batch 512 = 20 steps per epoch; num_train_steps=639" in caplog.text
  for steps_field, _ in run_config.EPOCH_FIELDS:  # the same epochs: 16x fewer steps of a 16x larger batch
    assert small[steps_field] == pytest.approx(16 * large[steps_field], rel=0.01), steps_field
  # Steps set explicitly (--config.num_train_steps=2 in the tests) win; warmup may be 0; the rest from epochs.
  config.num_train_steps, config.warmup_steps = 2, 0
  resolved = run_config.resolve_steps(config, 9989)
  assert (resolved.num_train_steps, resolved.warmup_steps, resolved.eval_every_steps) == (2, 0, 1000)
  config.eval_every_epochs = 0.001  # never fewer than 1 step between evaluations
  assert run_config.resolve_steps(config, 9989).eval_every_steps == 1
  config.num_train_steps, config.num_epochs = -1, 0.0
  with pytest.raises(ValueError, match=r"config.num_train_steps=-1 .* --config.num_epochs"):
    run_config.resolve_steps(config, 9989)
  with pytest.raises(ValueError, match="has no examples"):
    run_config.resolve_steps(config, 0)
  with pytest.raises(ValueError, match="unknown variant"):
    get_config("meld", "tpu")


def test_the_accelerator_recipe_scales_batch_and_learning_rates():
  cpu, accelerator = get_config("meld"), get_config("meld", "accelerator")
  assert (accelerator.batch_size, accelerator.model.dtype) == (512, "bfloat16")
  assert accelerator.learning_rate == pytest.approx(4 * cpu.learning_rate)  # sqrt(512 / 32)
  assert accelerator.scorer_word_learning_rate == pytest.approx(4 * cpu.scorer_word_learning_rate)
  for _, epochs_field in run_config.EPOCH_FIELDS:
    assert accelerator[epochs_field] == cpu[epochs_field], epochs_field


def test_step_options_of_a_config_in_epochs_read_it_at_the_demo_size():
  """Benchmarks build steps from a config file without data: its epochs are read at the demo corpus's size."""
  from mer_jax.training import options

  step_options = options.step_options(get_config("default"), ops=ops_lib.REFERENCE)
  assert (step_options.num_train_steps, step_options.warmup_steps) == (3000, 200)


def test_heads_follow_the_data_tasks_and_classes():
  """Overriding config.data.tasks and config.data.classes is enough: the heads (config.model.tasks) follow."""
  config = importlib.import_module("configs.tiny").get_config()
  config.data.tasks = ("valence", "arousal")
  config.data.classes = {"valence": ("Low", "High"), "arousal": ("calm", "medium", "excited")}
  resolved = run_config.resolve_tasks(config)
  assert resolved.model.tasks.to_dict() == {"valence": 2, "arousal": 3}
  assert resolved.best_metric == "valence/weighted_f1"  # emotion is not trained: the first task of data.tasks
  assert dict(config.model.tasks) == {"emotion": 7, "sentiment": 3}  # a copy: the caller's config is kept
  config.data.tasks = ("valence", "dominance")
  with pytest.raises(ValueError, match=r"no class list for the tasks \['dominance'\].*config.data.classes.dominance"):
    run_config.resolve_tasks(config)
  config.data.tasks = ("valence",)
  config.data.classes.valence = ("low", "LOW ")
  with pytest.raises(ValueError, match="names \\['low'\\] twice"):
    run_config.resolve_tasks(config)


def default_snapshot_text() -> str:
  """configs/default.py's get_config() in the form the trainer writes to config.json (run_config.save_run_config)."""
  return default.get_config().to_json_best_effort(indent=2) + "\n"


def write_default_snapshot() -> None:
  """Writes mer_jax/training/default_config.json, the package's copy of configs/default.py's values."""
  with open(DEFAULTS_SNAPSHOT, "w") as f:
    f.write(default_snapshot_text())


def test_default_snapshot_is_current():
  with open(DEFAULTS_SNAPSHOT) as f:
    snapshot = f.read()
  assert snapshot == default_snapshot_text(), (
    f"{os.path.relpath(DEFAULTS_SNAPSHOT)} differs from configs/default.py's get_config(); regenerate it from "
    f"the repository root with: {WRITE_DEFAULTS}"
  )
  assert run_config.default_config_dict() == json.loads(default.get_config().to_json_best_effort())


def test_old_run_config_gets_missing_fields_from_defaults(tmp_path, caplog):
  """A config.json from an older version: absent fields come from configs/default.py, present ones stay."""
  config = json.loads(default.get_config().to_json_best_effort())
  del config["model"]["frame_relevance"], config["model"]["text_dropout"], config["model"]["scorer"]["vocab_size"]
  del config["modality_dropout"], config["frame_relevance_weight"], config["model"]["audio"]
  config["model"]["width"] = 64  # present fields win, even where the default differs
  config["model"]["tasks"] = {"emotion": 7}  # task-keyed mappings are kept as the run wrote them
  config["task_weights"] = {"emotion": 2.0}
  config["data"]["prepare"] = "demo"  # fields the defaults lack stay
  (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(config))
  expected = default.get_config()
  with caplog.at_level("INFO"):
    loaded = run_config.load_run_config(str(tmp_path))
  assert "model.frame_relevance, model.text_dropout, model.scorer.vocab_size, model.audio" in caplog.text
  assert "modality_dropout" in caplog.text and "frame_relevance_weight" in caplog.text
  assert loaded.model.frame_relevance is expected.model.frame_relevance
  assert loaded.model.text_dropout == expected.model.text_dropout
  assert loaded.model.scorer.vocab_size == expected.model.scorer.vocab_size
  assert loaded.model.audio.to_dict() == expected.model.audio.to_dict()
  assert loaded.modality_dropout == expected.modality_dropout
  assert loaded.frame_relevance_weight == expected.frame_relevance_weight
  assert loaded.model.width == 64
  assert loaded.model.tasks.to_dict() == {"emotion": 7}
  assert loaded.task_weights.to_dict() == {"emotion": 2.0}
  assert loaded.data.prepare == "demo"
  assert loaded.model.modalities == ("video", "audio", "text")  # lists become tuples, as in the config files


def test_fill_missing_fields_names_what_it_filled():
  config = {"a": 1, "model": {"x": 2, "sub": {}}, "task_weights": {"emotion": 1.0}}
  defaults = {
    "a": 0,
    "b": 3,
    "model": {"x": 0, "y": 4, "sub": {"z": 5}, "new": {"w": 6}},
    "task_weights": {"emotion": 1.0, "sentiment": 0.5},
  }
  assert run_config.fill_missing_fields(config, defaults) == ["b", "model.y", "model.sub.z", "model.new"]
  assert config == {
    "a": 1,
    "b": 3,
    "model": {"x": 2, "y": 4, "sub": {"z": 5}, "new": {"w": 6}},
    "task_weights": {"emotion": 1.0},
  }
  config["model"]["new"]["w"] = 7
  assert defaults["model"]["new"]["w"] == 6  # copies, not shared


def test_mer_jax_does_not_import_configs():
  """mer_jax reads configs/default.py's values from its snapshot: the top-level `configs` is not installed."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(run_config.__file__)))
  offenders = []
  for root, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          for number, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith(("import configs", "from configs")):
              offenders.append(f"{os.path.relpath(path, os.path.dirname(package))}:{number}: {stripped}")
  assert not offenders, "mer_jax imports the top-level configs package:\n  " + "\n  ".join(offenders)


if __name__ == "__main__":
  if sys.argv[1:] != ["--write-defaults"]:
    sys.exit(f"usage: {WRITE_DEFAULTS}")
  write_default_snapshot()
  print(f"wrote {DEFAULTS_SNAPSHOT}")
