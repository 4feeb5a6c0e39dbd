"""Train and evaluate: `python launch.py --config configs/demo.py --workdir runs/demo`.

Config fields can be overridden on the command line: `--config.num_train_steps=20 --config.batch_size=8`; a
field that does not exist is an error, except a new task or split in the mappings keyed by them
(`--config.data.classes.valence='("low", "high")'`, see OPEN_MAPPINGS). Prepared data that is missing is made
first when the config says how (`config.data.prepare`: 'demo' generates and prepares the demo corpus, 'meld'
prepares MELD.Raw, 'meld_text' MELD's CSVs alone, from config.data.source_dir / $MELD_DIR; 'csv' a corpus of
one's own laid out as config.data says, docs/OWN_DATA.md). The model's heads follow config.data.tasks and
config.data.classes. A mistake the user can fix (a missing folder, a config key that does not exist, a value
that cannot be used) ends the command with one line, `error: ...`, and exit status 2.

Several processes (one per host, or several on one machine): `--distributed=auto` (the default) calls
jax.distributed.initialize() on a Cloud TPU VM (gcloud or queued resources), a GKE TPU slice, a multislice job,
a SLURM step, Open MPI and a Kubernetes indexed Job, where JAX finds its settings itself; elsewhere pass
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
to every process (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). `--distributed=on` always
initialises, `off` never (mer_jax/training/distributed.py). A process that loses a peer stops with an error and
exit status 1; restarting every process resumes from the last checkpoint. Compiled steps are kept in a persistent
cache (`--compilation_cache_dir`, default $MER_JAX_CACHE/jax_compilation_cache; '' turns it off), so a restart
does not compile again. See docs/TPU.md.
"""

import dataclasses
import difflib
import json
import logging as py_logging
import os
import re
import sys

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_module

from mer_jax import errors
from mer_jax.data import labels
from mer_jax.training import compile_cache
from mer_jax.training import distributed

FLAGS = flags.FLAGS
# New keys are accepted while parsing so that a task or split can be added to a mapping keyed by them
# (OPEN_MAPPINGS); `check_overrides` then refuses every other key the config file does not define.
config_flags.DEFINE_config_file(
  "config", None, "Config file (a get_config() module).", lock_config=False, accept_new_attributes=True
)
# Config mappings keyed by task or split names (data, not fields): an override may add a key to them.
OPEN_MAPPINGS = ("data.classes", "data.label_columns", "data.csv_files", "data.clip_folders", "task_weights")
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and eval JSON go.")
flags.DEFINE_string(
  "coordinator_address",
  os.environ.get("JAX_COORDINATOR_ADDRESS"),
  "host:port of process 0, for several processes outside a TPU pod / SLURM / MPI.",
)
flags.DEFINE_integer(
  "num_processes",
  int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None,
  "Number of processes (with --coordinator_address).",
)
flags.DEFINE_integer(
  "process_id",
  int(os.environ.get("JAX_PROCESS_ID", -1)) if "JAX_PROCESS_ID" in os.environ else None,
  "This process's index (with --coordinator_address).",
)
flags.DEFINE_enum(
  "distributed",
  "auto",
  distributed.MODES,
  "jax.distributed.initialize(): 'auto' when the flags above are given or a multi-process environment is detected "
  "(Cloud TPU VM, GKE TPU, multislice, SLURM, Open MPI, Kubernetes indexed Job), 'on' always, 'off' never.",
)
flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  distributed.HEARTBEAT_TIMEOUT_SECONDS,
  "With several processes: a process that sends no heartbeat for this long counts as dead, and the others stop.",
)
flags.DEFINE_string(
  "compilation_cache_dir",
  compile_cache.default_dir(),
  "JAX's persistent compilation cache (a local folder or gs://...); '' turns it off.",
)
flags.DEFINE_bool("verbose_checkpointing", False, "Show orbax's INFO logs (one screen per save).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """jax.distributed.initialize() when --distributed and the environment say so (distributed.decide), then the
  persistent compilation cache; must precede any other JAX use. Logs one line saying which and why."""
  cloud_tpu_vm = FLAGS.distributed == "auto" and distributed.on_cloud_tpu_vm()
  decision = distributed.decide(
    FLAGS.distributed,
    coordinator_address=FLAGS.coordinator_address,
    num_processes=FLAGS.num_processes,
    process_id=FLAGS.process_id,
    cloud_tpu_vm=cloud_tpu_vm,
  )
  logging.info("jax.distributed: %s.", decision.reason)
  distributed.initialize(decision, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  import jax

  logging.info(compile_cache.enable(FLAGS.compilation_cache_dir))
  distributed.check_one_job()
  if jax.process_count() > 1:
    logging.info(
      "jax.distributed: process %d of %d, %d local / %d global devices.",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
    )


def _quiet_orbax() -> None:
  """orbax logs a screen of INFO lines per checkpoint; keep its warnings and errors only."""
  keep = lambda record: record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname
  logging.get_absl_handler().addFilter(keep)


def unknown_overrides(reference: ml_collections.ConfigDict, paths) -> list[str]:
  """The override paths (e.g. 'data.nonexistent') that name no field of `reference` (the config file's own
  get_config()), each with the fields it may have meant; a new key of an OPEN_MAPPINGS mapping is fine."""
  unknown = []
  for path in paths:
    node, parts = reference, path.split(".")
    for depth, key in enumerate(parts):
      parent = ".".join(parts[:depth])
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node = node[key]
        continue
      if parent in OPEN_MAPPINGS and depth == len(parts) - 1:
        break
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(key, known, n=3)
      where = f"config.{parent}" if parent else "the config"
      prefix = f"{parent}." if parent else ""
      hint = f" (did you mean {', '.join(f'--config.{prefix}{name}' for name in close)}?)" if close else ""
      unknown.append(f"--config.{path}: {where} has no field {key!r}{hint}")
      break
  return unknown


def check_overrides(argv) -> None:
  """Raises InvalidInput when a --config.X override in `argv` names a field that the config file does not define.

  Run before absl parses the flags: ml_collections would otherwise add the new key (accept_new_attributes) or
  fail with a KeyError and a traceback (a missing parent).
  """
  config_file, paths = None, []
  for index, arg in enumerate(argv):
    if re.match(r"^--?config(=|$)", arg):
      config_file = arg.split("=", 1)[1] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else None)
    elif match := re.match(r"^--?(?:no)?config\.([^=]+)", arg):
      paths.append(match.group(1))
  config_path = (config_file or "").split(":", 1)[0]  # configs/meld_text.py:edge -> the file
  if config_path and not os.path.isfile(config_path):
    raise errors.PathNotFound(
      f"--config {config_path} not found; pass a config file such as configs/demo.py (paths are relative to the "
      "folder you run launch.py from)."
    )
  if not config_file or not paths:
    return
  reference = config_flags_module.ConfigFileFlagParser("config", lock_config=False).parse(config_file)
  if not isinstance(reference, ml_collections.ConfigDict):
    return  # it failed to load: absl's parse says why
  unknown = unknown_overrides(reference, paths)
  if unknown:
    raise errors.InvalidInput(
      "; ".join(unknown) + ". A config key must exist in the config file (see it, or configs/default.py)."
    )


def parse_flags(argv):
  """absl's flag parsing, with a mistake in the flags or the config overrides as one line and exit status 2."""
  try:
    check_overrides(FLAGS.read_flags_from_files(argv[1:], force_gnu=False))
    remaining = FLAGS(argv)
    # Locked from here on, so a misspelt field in the code fails loudly too; a config file that failed to load
    # raises its OSError here (the message names the file).
    FLAGS.config.lock()
    labels.head_sizes(FLAGS.config.data)  # a task without a usable class list, said before JAX and TF load
  except (flags.Error, errors.UserError, OSError) as error:
    if "Error whilst parsing config file" in str(error):  # get_config() itself raised: a bug, keep its traceback
      raise
    print(errors.one_line(error), file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_STATUS)
  return remaining


def _builder_config(config):
  """The builder config that prepares config.data's data, named config.data.builder_config.

  A registered name ('demo', 'meld', ...) prepares that preset: its frames must fit config.data (same count, at
  least as large) and its layout, tasks and classes must agree with config.data's. Any other name reads clips as
  the preset config.data.prepare names ('csv', a corpus of one's own: as 'meld') with config.data's frame count
  and size, and takes the source layout, tasks and classes from config.data (csv_format.format_from_config).
  Raises InvalidInput.
  """
  from data import meld_format
  from mer_jax.data import csv_format

  registered = {c.name: c for c in meld_format.BUILDER_CONFIGS}
  data = config.data
  name = data.builder_config
  wanted = dict(num_frames=int(data.num_frames), frame_size=int(data.frame_size))
  if name in registered:
    builder_config = registered[name]
    # Larger prepared frames are fine: the input pipeline resizes them down to config.data.frame_size.
    if builder_config.num_frames != wanted["num_frames"] or builder_config.frame_size < wanted["frame_size"]:
      raise errors.InvalidInput(
        f"Builder config {name!r} prepares {builder_config.num_frames} frames of {builder_config.frame_size} px "
        f"but config.data asks for {wanted['num_frames']} of {wanted['frame_size']} px; set "
        f"config.data.builder_config to a new name (e.g. '{name}_{wanted['num_frames']}x{wanted['frame_size']}') "
        "to prepare data with these settings."
      )
    differences = csv_format.prepared_differences(builder_config.record(), data)
    if differences:
      raise errors.InvalidInput(
        f"config.data.builder_config={name!r} is a preset that prepares other data than config.data names: "
        f"{'; '.join(differences)}. Set --config.data.builder_config to a name of your own (e.g. 'mine') to "
        "prepare your data with config.data's layout, tasks and classes."
      )
  else:
    base = registered.get(data.get("prepare") or "meld", registered["meld"])
    builder_config = dataclasses.replace(
      csv_format.format_from_config(data, base),
      name=name,
      description=f"{base.description} Layout, tasks and classes from config.data.",
      max_audio_seconds=float(data.max_audio_seconds),
      **wanted,
    )
  return builder_config


PREPARE_KINDS = ("demo", "meld", "meld_text", "csv")
PREPARE_TIMEOUT_SECONDS = 24 * 3600  # how long the other processes wait for process 0 to prepare the data


def _prepare(config, data_dir: str) -> None:
  from data import make_demo_corpus
  from data import prepare
  from data import sources
  from mer_jax import storage

  kind = config.data.prepare
  if kind not in PREPARE_KINDS:
    raise errors.InvalidInput(
      f"config.data.prepare={kind!r}; use 'demo', 'meld', 'meld_text', 'csv' (a corpus of one's own) or '' (data "
      "prepared beforehand)."
    )
  builder_config = _builder_config(config)  # a mistake in config.data shows before any long work
  source = os.path.expanduser(config.data.source_dir or (os.environ.get("MELD_DIR", "") if kind == "meld" else ""))
  storage.require_local(source, "config.data.source_dir")  # clips are decoded here; data_dir may be gs://
  if kind == "demo":
    if not source:
      raise errors.InvalidInput("config.data.source_dir is empty: set it to where the demo corpus should be generated.")
    if not os.path.exists(os.path.join(source, "train_sent_emo.csv")):
      sizes = dict(config.data.get("demo_corpus") or {})
      logging.info("Generating the demo corpus in %s (%s); this happens once.", source, sizes)
      summary = make_demo_corpus.make_corpus(source, **sizes)
      logging.info("Demo corpus: %d bytes in %.0f s.", summary["bytes"], summary["seconds"])
  elif kind == "meld":
    sources.check_meld_source(source)
  elif kind == "meld_text":
    sources.check_meld_csvs(source)
  else:
    sources.check_csv_source(source, builder_config, (config.train_split, config.eval_split))
  logging.info("Preparing %s into %s; this happens once.", source, data_dir)
  workers = int(config.data.get("prepare_workers") or 0) or None  # clip-decoding processes; None: all cores
  _, report_path = prepare.prepare(source, data_dir, builder_config, workers)
  logging.info("Prepared (report: %s):\n%s", report_path, prepare.summary(report_path))


def prepare_data_if_missing(config, workdir: str) -> None:
  """Makes the prepared dataset when it is missing and config.data.prepare says how; PathNotFound when it is
  missing and config.data.prepare is ''."""
  import jax
  from mer_jax.data import input_pipeline
  from mer_jax.training import train

  data_dir = train.resolve_data_dir(config, workdir)
  train.check_data_dir_shared(config, data_dir, jax.process_count())  # before process 0 prepares it for all
  try:
    input_pipeline.load_builder(config, data_dir)
    return
  except FileNotFoundError as error:
    if not config.data.get("prepare"):
      raise errors.PathNotFound(
        f"{error} Or let launch.py prepare it: --config.data.prepare=csv --config.data.source_dir=DIR for a corpus "
        "of your own (docs/OWN_DATA.md)."
      ) from error
  if jax.process_index() == 0:
    _prepare(config, data_dir)
  # The others wait, then read it (the data_dir is shared storage); preparing MELD.Raw takes hours.
  distributed.barrier("mer_jax_prepare_data", timeout_seconds=PREPARE_TIMEOUT_SECONDS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    initialize_distributed()
  except errors.UserError as error:
    print(errors.one_line(error), file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_STATUS)
  from mer_jax.training import host_memory

  advice = host_memory.advice()  # the faster malloc is opt-in, set before Python starts: say what it would gain
  logging.info("Host malloc: %s%s", host_memory.describe(), f" ({advice})" if advice else "")
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # tf.data only: the accelerators belong to JAX
  if not FLAGS.verbose_checkpointing:
    _quiet_orbax()
  from mer_jax.training import run_config
  from mer_jax.training import train
  from mer_jax.training import steps as steps_lib

  try:
    config = run_config.resolve_tasks(FLAGS.config)  # the heads config.data asks for, checked before any long work
    prepare_data_if_missing(config, FLAGS.workdir)
    result = train.train_and_evaluate(config, FLAGS.workdir)
  except errors.UserError as error:  # the message says what to do
    print(errors.one_line(error), file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_STATUS)
  except steps_lib.NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(1)
  except distributed.LostPeerError as error:
    logging.error("%s", error)
    logging.flush()
    # At once: jax.distributed's exit handler would wait at a shutdown barrier that the lost process never
    # reaches, until the heartbeat timeout aborts this process.
    os._exit(1)
  best = result["best"]
  summary = {
    "step": result["step"],
    "losses": result["losses"],
    "preempted": result["preempted"],
    "best_step": best and best["step"],
    "best": best and {best["best_metric"]: best["value"]},
  }
  logging.info("Run summary: %s", json.dumps(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
