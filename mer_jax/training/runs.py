"""A trained run, loaded: its config and the weights of its best checkpoint, from the training workdir.

    run = runs.load_run("runs/demo")            # WORKDIR/config.json, best step (eval/best.json) else latest
    run = runs.load_run(workdir, "configs/demo.py", step=1200)

The one place that knows a workdir's layout for reading (config.json, checkpoints/, eval/best.json); export,
prediction, evaluation, explanation and the report all load a run through it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections

from mer_jax.training import checkpoint as checkpoint_lib


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


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (e.g. configs/demo.py), for runs without WORKDIR/config.json."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path} not found; pass --config configs/<name>.py.")
  spec = importlib.util.spec_from_file_location("mer_jax_config_file", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"Config file {path} is not a Python file with get_config(); pass configs/<name>.py.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check_workdir(workdir: str) -> None:
  path = checkpoint_lib.absolute_path(workdir)
  if "://" not in path and not os.path.isdir(path):
    raise FileNotFoundError(
      f"Workdir {workdir} not found; pass the workdir of a trained run (the --workdir "
      "given to python launch.py, with config.json and checkpoints/ in it)."
    )


def run_config(workdir: str, config_path: str | None = None) -> ml_collections.ConfigDict:
  """The config file `config_path` when given, else the config the run wrote (WORKDIR/config.json)."""
  if config_path:
    return load_config(config_path)
  _check_workdir(workdir)
  try:
    return checkpoint_lib.load_run_config(workdir)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"{error} (or pass --config configs/<the run's config>.py)") from error


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(variables, source, best.json or None) of `step`; default: the best step, else the latest.

  Weights come from the train state the trainer saved (checkpoint.Checkpointer); `config` must be the one
  the run was trained with (Checkpointer.restore names the fields that differ).
  """
  from mer_jax.training import train

  workdir = checkpoint_lib.absolute_path(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"No checkpoints in {directory}; train first (python launch.py --config ... "
      f"--workdir {workdir}) or pass the workdir of a trained run."
    )
  best_path = os.path.join(workdir, "eval", "best.json")
  best = None
  if os.path.isfile(best_path):
    with open(best_path) as f:
      best = json.load(f)
  checkpointer = checkpoint_lib.Checkpointer(
    directory, config, keep=config.get("keep_checkpoints", 3), best_metric=config.get("best_metric"), asynchronous=False
  )
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"{directory} holds no finished checkpoint yet; train longer or wait for the "
        "first save (config.checkpoint_every_steps)."
      )
    if step is None:
      step = best["step"] if best and best["step"] in steps else max(steps)
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; it has steps {sorted(steps)}.")
    options = train.step_options(config)
    state = checkpointer.restore(step, train.abstract_train_state(options, train.make_mesh(), config.seed))
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
  _check_workdir(workdir)
  config = run_config(workdir, config_path)
  variables, source, best = load_checkpoint(config, workdir, step)
  return Run(
    workdir=checkpoint_lib.absolute_path(workdir),
    config=config,
    variables=variables,
    step=source["checkpoint_step"],
    source=source,
    best=best,
  )
