"""A run's config: resolved once before training, written to WORKDIR/config.json, read back by every tool.

Resolving sets what follows from config.data (the heads from its tasks and class lists, the primary task, the best
metric's task); config.json then holds the run as trained. Reading it back fills the fields that an older version
did not write from configs/default.py's values (`default_config.json`, the package's snapshot of them).
"""

from __future__ import annotations

import copy
import importlib.resources
import json

import ml_collections
from absl import logging
from etils import epath

from mer_jax import errors
from mer_jax.data import labels
from mer_jax.training import checkpoint as checkpoint_lib

CONFIG_FILE = "config.json"


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the run's full config to WORKDIR/config.json, so export, predict, evaluate and report need only
  the workdir. Returns the path."""
  path = epath.Path(checkpoint_lib.absolute_path(workdir)) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  # Key order is kept: the order of config.model.tasks is meaningful (the first is the primary task).
  path.write_text(config.to_json_best_effort(indent=2))
  return str(path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (WORKDIR/config.json, written by train_and_evaluate).

  Fields that config.json lacks (it was written by an older version) come from configs/default.py's values
  (`default_config_dict`), and are logged; lists become tuples again, as the config files write them.
  """
  path = epath.Path(checkpoint_lib.absolute_path(workdir)) / CONFIG_FILE
  if not path.exists():
    raise errors.PathNotFound(
      f"{path} not found: {workdir} is not a training workdir written by this version "
      "(python launch.py --config ... --workdir ...). Pass the config file explicitly."
    )
  config = json.loads(path.read_text())
  filled = fill_missing_fields(config, default_config_dict())
  if filled:
    logging.info("%s predates config fields %s: using configs/default.py's values for them.", path, ", ".join(filled))

  def tuples(node):
    if isinstance(node, dict):
      return {key: tuples(value) for key, value in node.items()}
    if isinstance(node, list):
      return tuple(tuples(value) for value in node)
    return node

  return ml_collections.ConfigDict(tuples(config))


# configs/default.py's get_config() in config.json's form, shipped inside the package: mer_jax never imports the
# top-level `configs`. tests/test_configs.py checks it against configs/default.py and says how to regenerate it.
DEFAULT_CONFIG_FILE = "default_config.json"

# Mappings that are data, not fields (keyed by task, split or column role): taken whole when absent, never merged
# into, so that a run's own tasks, splits and columns stay exactly as it wrote them (merging MELD's 'dev' and 'test'
# into a corpus's own csv_files would no longer match its prepared data).
WHOLE_FIELDS = frozenset(
  {
    "model.tasks",
    "task_weights",
    "data.csv_files",
    "data.clip_folders",
    "data.columns",
    "data.classes",
    "data.label_columns",
  }
)


def default_config_dict() -> dict:
  """configs/default.py's get_config() as JSON values (lists, not tuples), from the package's snapshot."""
  return json.loads(importlib.resources.files("mer_jax.training").joinpath(DEFAULT_CONFIG_FILE).read_text())


def fill_missing_fields(config: dict, defaults: dict, prefix: str = "") -> list[str]:
  """Adds to `config` (in place, recursively) the fields of `defaults` it lacks; a field it has always wins.

  Returns the dotted names of the fields added (a missing sub-config counts once, by its own name).
  """
  filled = []
  for key, default in defaults.items():
    name = f"{prefix}{key}"
    if key not in config:
      config[key] = copy.deepcopy(default)
      filled.append(name)
    elif isinstance(config[key], dict) and isinstance(default, dict) and name not in WHOLE_FIELDS:
      filled.extend(fill_missing_fields(config[key], default, f"{name}."))
  return filled


def resolve_tasks(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose heads are the ones config.data asks for, which training and config.json then hold.

  config.model.tasks = {task: number of classes} for config.data.tasks (`labels.head_sizes`), so a change of
  config.data.tasks or config.data.classes alone changes the heads; the default config.best_metric moves to the first task
  of config.data.tasks when its task is not trained (same metric). Raises InvalidInput when a task has no usable
  class list, or when a best_metric that was set names a task that is not trained.
  """
  sizes = labels.head_sizes(config.data)
  task, _, metric = str(config.best_metric).partition("/")
  default_metric = default_config_dict()["best_metric"]
  if task not in sizes and config.best_metric != default_metric:  # a typo must not pick another metric quietly
    raise errors.InvalidInput(
      f"config.best_metric={config.best_metric!r} names no trained task; use <task>/<accuracy|weighted_f1|macro_f1> "
      f"with a task of config.data.tasks {tuple(sizes)}."
    )
  resolved = config.copy_and_resolve_references()
  if config.model.tasks.to_dict() != sizes:
    logging.info(
      "Heads from config.data.tasks and config.data.classes: %s (config.model.tasks was %s).",
      sizes,
      dict(config.model.tasks),
    )
  with resolved.unlocked():  # the copy keeps the lock; a config file of its own may lack primary_task
    resolved.model.tasks = ml_collections.ConfigDict(sizes)
    resolved.model.primary_task = next(iter(sizes))  # config.data.tasks[0]: head_sizes keeps its order
  if task not in sizes:  # the default metric's task is not trained (own data): the same metric on the first task
    resolved.best_metric = f"{next(iter(sizes))}/{metric or 'weighted_f1'}"
    logging.info("config.best_metric=%r names no trained task: using %r.", config.best_metric, resolved.best_metric)
  return resolved


# ----------------------------------------------------------------------------- training length in epochs

# (steps field, epochs field). Configs give the epochs; training turns them into steps of the global batch for the
# train split it reads (`resolve_steps`), so a batch 16x larger trains the same epochs in 16x fewer steps. A steps
# field set explicitly (> 0; for warmup >= 0) wins, e.g. --config.num_train_steps=20 for a smoke run.
EPOCH_FIELDS = (
  ("num_train_steps", "num_epochs"),
  ("warmup_steps", "warmup_epochs"),
  ("eval_every_steps", "eval_every_epochs"),
  ("checkpoint_every_steps", "checkpoint_every_epochs"),
)
FROM_EPOCHS = -1  # a steps field's value meaning "from its epochs field"

# The train split's size that configs/default.py's epochs are read at where no data says it: the demo corpus's
# 2,000 train clips, which the default config trains on. Only StepOptions of a config that training never resolved
# use it (benchmarks, restoring a state's shapes); train_and_evaluate always resolves against its train split.
DEFAULT_TRAIN_EXAMPLES = 2000


def steps_per_epoch(num_train_examples: int, batch_size: int) -> int:
  """Steps of the global batch in one pass over the train split: ceil(examples / batch_size)."""
  return -(-int(num_train_examples) // int(batch_size))


def _given(steps_field: str, value) -> bool:
  """Whether a steps field holds a step count of its own (warmup may be 0 steps; the others need at least 1)."""
  return value is not None and (int(value) >= 0 if steps_field == "warmup_steps" else int(value) > 0)


def steps_resolved(config: ml_collections.ConfigDict) -> bool:
  """Whether every field of EPOCH_FIELDS holds steps (a config `resolve_steps` returned, or one set in steps)."""
  return all(_given(steps_field, config.get(steps_field)) for steps_field, _ in EPOCH_FIELDS)


def resolve_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> ml_collections.ConfigDict:
  """A copy of `config` whose steps fields (EPOCH_FIELDS) hold the steps the run takes, for a train split of
  `num_train_examples` read in global batches of config.batch_size.

  steps = round(epochs * steps_per_epoch) with steps_per_epoch = ceil(num_train_examples / batch_size); at least
  1 (warmup: 0). A steps field that already holds steps is kept, and its epochs field is then not read. Logs the
  result in one line; config.json records the resolved steps. Raises InvalidInput on an empty split, or when a
  field has neither steps nor positive epochs.
  """
  if int(num_train_examples) <= 0:
    raise errors.InvalidInput(
      f"The train split {config.get('train_split', 'train')!r} has no examples: prepare the data again, or set "
      "config.train_split to a split that has some."
    )
  per_epoch = steps_per_epoch(num_train_examples, config.batch_size)
  resolved = config.copy_and_resolve_references()
  parts, given = [], []
  with resolved.unlocked():
    for steps_field, epochs_field in EPOCH_FIELDS:
      steps = config.get(steps_field)
      if _given(steps_field, steps):
        given.append(steps_field)
        steps = int(steps)
      else:
        epochs, least = config.get(epochs_field), 0 if steps_field == "warmup_steps" else 1
        if epochs is None or float(epochs) < 0 or (least and float(epochs) == 0):
          raise errors.InvalidInput(
            f"config.{steps_field}={steps} asks for steps from config.{epochs_field}={epochs}; set "
            f"--config.{epochs_field} to a positive number of epochs, or --config.{steps_field} to steps."
          )
        steps = max(least, round(float(epochs) * per_epoch))
      resolved[steps_field] = steps
      parts.append(f"{steps_field}={steps} ({steps / per_epoch:.4g} epochs)")
  logging.info(
    "Steps: %d train examples / global batch %d = %d steps per epoch; %s%s.",
    num_train_examples,
    config.batch_size,
    per_epoch,
    ", ".join(parts),
    f"; set in steps: {', '.join(given)}" if given else "",
  )
  return resolved
