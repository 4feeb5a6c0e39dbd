"""Checkpoints of the train state with orbax, and the check that a checkpoint fits the current config.

Layout: `WORKDIR/checkpoints/<step>/{state,config}`; `config` is the JSON of `config.model` the step was
written with, so a restore with a different model fails early with a message that names the fields
that differ (instead of an opaque shape error from deep inside orbax). `WORKDIR/checkpoints/
model_config.json` holds the same JSON for people.

Kept: the last `keep` checkpoints, plus the best one by the eval metric passed to `save` (steps saved
without metrics only count as "latest"). Saves are asynchronous; `close()` waits for them.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from mer_jax import errors
from mer_jax import storage

# Model fields that change neither the parameter tree nor its shapes: a run may resume with new values.
RESUMABLE_MODEL_FIELDS = frozenset({"dtype", "dropout_rate", "selection_temperature", "ops"})


# Local paths made absolute (with ~ expanded); URLs such as gs://bucket/run are kept as they are.
absolute_path = storage.absolute_path


class IncompatibleCheckpointError(errors.InvalidInput):
  """The checkpoint in the workdir was written with a model config that does not fit this one (a user error: the
  message names the fields that differ and says to use a new workdir)."""


def model_config_dict(config: ml_collections.ConfigDict) -> dict:
  """`config.model` as plain JSON-safe values (tuples become lists)."""
  return json.loads(config.model.to_json())


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}.{key}"))
    return out
  return {prefix: tree}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Human-readable differences between two `model_config_dict`s, ignoring RESUMABLE_MODEL_FIELDS."""
  saved_flat, current_flat = _flatten(saved, "model"), _flatten(current, "model")
  differences = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key.split(".", 1)[1] in RESUMABLE_MODEL_FIELDS:
      continue
    old, new = saved_flat.get(key, "<absent>"), current_flat.get(key, "<absent>")
    if old != new:
      differences.append(f"config.{key}: checkpoint {old!r}, now {new!r}")
  return differences


class Checkpointer:
  """orbax CheckpointManager for `{'state': train state, 'config': model config JSON}` under `directory`."""

  def __init__(
    self,
    directory: str,
    config: ml_collections.ConfigDict,
    *,
    keep: int = 3,
    best_metric: str | None = None,
    asynchronous: bool = True,
  ):
    self.directory = absolute_path(directory)
    self.model_config = model_config_dict(config)
    preserve: list[Any] = [checkpoint_managers.LatestN(n=max(1, int(keep)))]
    if best_metric:
      preserve.append(
        checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: float(metrics[best_metric]), n=1, keep_checkpoints_without_metrics=False
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(preserve),
      enable_async_checkpointing=asynchronous,
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def saved_model_config(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return dict(restored["config"])

  def check_compatible(self, step: int) -> None:
    """Raises IncompatibleCheckpointError naming every model field that differs from step `step`'s."""
    differences = config_differences(self.saved_model_config(step), self.model_config)
    if differences:
      raise IncompatibleCheckpointError(
        f"The checkpoint at step {step} in {self.directory} was written with another model config:\n  "
        + "\n  ".join(differences)
        + "\nUse a new --workdir for this config, or restore the old values with --config.<field>=..."
      )

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the train state of `step` into `abstract_state`'s tree, shapes and shardings."""
    self.check_compatible(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:  # same config, other tree: e.g. code changed
      raise IncompatibleCheckpointError(
        f"The checkpoint at step {step} in {self.directory} does not fit the train state of this "
        f"code and config ({type(e).__name__}: {e}). Use a new --workdir."
      ) from e
    return restored["state"]

  def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> bool:
    """Starts an (asynchronous) save of `state` at `step`; `metrics` rank it for "best"."""
    if step in self.manager.all_steps():
      return False
    saved = self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.model_config)),
      metrics=metrics,
      force=True,
    )
    if jax.process_index() == 0:
      (epath.Path(self.directory) / "model_config.json").write_text(
        json.dumps(self.model_config, indent=2, sort_keys=True)
      )
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, sharding_fn: Callable[[Any], Any] | None = None) -> Any:
  """ShapeDtypeStructs (with shardings) of `tree`'s arrays: the target of a restore."""

  def leaf(x):
    sharding = sharding_fn(x) if sharding_fn is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, tree)


class PreemptionWatcher:
  """SIGTERM -> save a checkpoint and stop. One process: a signal flag (the previous handler comes
  back on `close`). Several: JAX's preemption sync point, so all processes stop at the same step."""

  def __init__(self):
    self.requested, self._previous = False, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint after this step, then stopping.")
    self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step where training should save and stop."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service off (jax_enable_preemption_service=False)
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
