"""A trained run, loaded: its config and the weights of its best checkpoint, from the training workdir.

    run = runs.load_run("runs/demo")            # WORKDIR/config.json, best step (eval/best.json) else latest
    run = runs.load_run(workdir, "configs/demo.py", step=1200)

The one place that knows a workdir's layout for reading (config.json, checkpoints/, eval/best.json); export,
prediction, evaluation, explanation and the report all load a run through it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from mer_jax import errors
from mer_jax import storage
from mer_jax.training import checkpoint as checkpoint_lib
from mer_jax.training import run_config as run_config_lib

WORKDIR_HELP = "pass the folder given to python launch.py as --workdir (it holds config.json and checkpoints/)"


@dataclasses.dataclass
class Run:
  """A trained run: `config` as trained, `variables` ({'params', 'batch_stats'}) of checkpoint `step`.

  `source` says where the weights came from (workdir, checkpoint_step, chosen_as 'best' or 'given', the
  best.json summary), for the JSON the tools write; `best` is eval/best.json (None before the first eval).
  """

  workdir: str
  config: ml_collections.ConfigDict
  variables: Any
  step: int
  source: dict
  best: dict | None

  def data_dir(self) -> str:
    """Where the run's prepared data lives (config.data.data_dir, else WORKDIR/../data)."""
    from mer_jax.training import train

    return train.resolve_data_dir(self.config, self.workdir)


def split_size(config: ml_collections.ConfigDict, data_dir: str, split: str, flag: str = "--split") -> int:
  """The number of examples of `split` in the data prepared for `config` under `data_dir`. Raises PathNotFound
  when there is no prepared data there, InvalidInput when it has no such split (`flag` names the option)."""
  from mer_jax.data import input_pipeline

  try:
    splits = input_pipeline.dataset_info(config, data_dir)["splits"]
  except FileNotFoundError as error:  # load_builder: no prepared dataset; its message says how to prepare one
    if isinstance(error, errors.UserError):
      raise
    raise errors.PathNotFound(str(error)) from error
  if split not in splits:
    raise errors.InvalidInput(
      f"{flag} {split}: the data prepared under {data_dir} has no split {split!r}; use one of {sorted(splits)}."
    )
  return splits[split]


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (e.g. configs/demo.py, or configs/meld_text.py:edge for get_config('edge')), for
  runs without WORKDIR/config.json."""
  path, _, argument = path.partition(":")
  if not os.path.isfile(path):
    raise errors.PathNotFound(f"Config file {path} not found; pass --config configs/<name>.py.")
  spec = importlib.util.spec_from_file_location("mer_jax_config_file", path)
  if spec is None or spec.loader is None:
    raise errors.InvalidInput(f"Config file {path} is not a Python file with get_config(); pass configs/<name>.py.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def check_workdir(workdir: str) -> None:
  """Raises PathNotFound unless `workdir` (a local folder or a gs:// URL) holds config.json or checkpoints/."""
  path = storage.absolute_path(workdir)
  if any(storage.exists(os.path.join(path, name)) for name in (run_config_lib.CONFIG_FILE, "checkpoints")):
    return
  # On a bucket, a "folder" is there when anything is stored under its name.
  if not storage.is_dir(path):
    raise errors.PathNotFound(f"Workdir {workdir} not found; {WORKDIR_HELP}.")
  raise errors.PathNotFound(
    f"{workdir} is not a training workdir (no {run_config_lib.CONFIG_FILE} or checkpoints/); {WORKDIR_HELP}."
  )


def run_config(workdir: str, config_path: str | None = None) -> ml_collections.ConfigDict:
  """The config file `config_path` when given, else the config the run wrote (WORKDIR/config.json)."""
  if config_path:
    return load_config(config_path)
  check_workdir(workdir)
  path = os.path.join(storage.absolute_path(workdir), run_config_lib.CONFIG_FILE)
  if not storage.is_file(path):
    raise errors.PathNotFound(
      f"{workdir} has checkpoints/ but no {run_config_lib.CONFIG_FILE} (written by an older version); pass "
      "--config configs/<the run's config>.py."
    )
  return run_config_lib.load_run_config(workdir)


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(variables, source, best.json or None) of `step`; default: the best step, else the latest.

  Weights come from the train state the trainer saved (checkpoint.Checkpointer); `config` must be the one
  the run was trained with (Checkpointer.restore names the fields that differ).
  """
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  workdir = storage.absolute_path(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not storage.is_dir(directory):
    raise errors.PathNotFound(
      f"No checkpoints in {directory}; train first (python launch.py --config ... "
      f"--workdir {workdir}) or pass the workdir of a trained run."
    )
  best_path = os.path.join(workdir, "eval", "best.json")
  best = storage.read_json(best_path) if storage.is_file(best_path) else None
  checkpointer = checkpoint_lib.Checkpointer(
    directory, config, keep=config.get("keep_checkpoints", 3), best_metric=config.get("best_metric"), asynchronous=False
  )
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise errors.PathNotFound(
        f"{directory} holds no finished checkpoint yet; train longer or wait for the "
        "first save (config.checkpoint_every_steps)."
      )
    if step is None:
      step = best["step"] if best and best["step"] in steps else max(steps)
    if step not in steps:
      raise errors.PathNotFound(
        f"No checkpoint of step {step} in {directory}; pass --step with one of {sorted(steps)}, or leave it out."
      )
    options = train.step_options(config)
    state = checkpointer.restore(step, steps_lib.abstract_train_state(options, steps_lib.make_mesh(), config.seed))
  finally:
    checkpointer.close()
  source = {
    "workdir": workdir,
    "checkpoint_step": int(step),
    "chosen_as": "given" if best is None or step != best.get("step") else "best",
    "best": {k: best.get(k) for k in ("step", "split", "best_metric", "value")} if best else None,
  }
  return {"params": state.params, "batch_stats": state.batch_stats}, source, best


def load_run(workdir: str, config_path: str | None = None, step: int | None = None) -> Run:
  """The run in `workdir`: its config (WORKDIR/config.json, or the `config_path` file) and the weights of
  checkpoint `step` (default: the best step in eval/best.json, else the latest)."""
  check_workdir(workdir)
  config = run_config(workdir, config_path)
  variables, source, best = load_checkpoint(config, workdir, step)
  return Run(
    workdir=storage.absolute_path(workdir),
    config=config,
    variables=variables,
    step=source["checkpoint_step"],
    source=source,
    best=best,
  )
