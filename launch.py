"""Train and evaluate: `python launch.py --config configs/demo.py --workdir runs/demo`.

Config fields can be overridden on the command line: `--config.num_train_steps=20 --config.batch_size=8`.
Prepared data that is missing is made first when the config says how (`config.data.prepare`: 'demo'
generates and prepares the demo corpus, 'meld' prepares MELD.Raw, 'meld_text' MELD's CSVs alone, from
config.data.source_dir / $MELD_DIR).

Several processes (one per host, or several on one machine): on a TPU pod, under SLURM or Open MPI,
or with $JAX_COORDINATOR_ADDRESS set, jax.distributed finds its settings itself; elsewhere pass
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
to every process (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). See docs/TPU.md.
"""

import dataclasses
import json
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (a get_config() module).", lock_config=True)
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
flags.DEFINE_bool("verbose_checkpointing", False, "Show orbax's INFO logs (one screen per save).")
flags.mark_flags_as_required(["config", "workdir"])


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def initialize_distributed() -> None:
  """jax.distributed.initialize() when this job runs as several processes; must precede any JAX use."""
  import jax

  explicit = bool(FLAGS.coordinator_address) or (FLAGS.num_processes or 1) > 1
  detected = (
    _int_env("SLURM_NTASKS") > 1
    or _int_env("OMPI_COMM_WORLD_SIZE") > 1
    or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
  )
  if not (explicit or detected):
    return
  # Cross-process collectives on CPU need an implementation (gloo ships with jaxlib); the setting
  # only concerns the CPU backend, so it is harmless on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
    )
  else:
    jax.distributed.initialize()
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


def _builder_config(config):
  """The builder config to prepare: the registered one named config.data.builder_config when its
  frames fit config.data (same count, at least as large); otherwise the `config.data.prepare` one ('demo' /
  'meld') renamed, with config.data's frame count and size (e.g. a tiny corpus for tests). config.data.prepare_workers
  (optional) sets the clip-decoding processes."""
  from data import meld_format

  registered = {c.name: c for c in meld_format.BUILDER_CONFIGS}
  data = config.data
  name = data.builder_config
  wanted = dict(num_frames=int(data.num_frames), frame_size=int(data.frame_size))
  if name in registered:
    builder_config = registered[name]
    # Larger prepared frames are fine: the input pipeline resizes them down to config.data.frame_size.
    if builder_config.num_frames != wanted["num_frames"] or builder_config.frame_size < wanted["frame_size"]:
      raise ValueError(
        f"Builder config {name!r} prepares {builder_config.num_frames} frames of {builder_config.frame_size} px "
        f"but config.data asks for {wanted['num_frames']} of {wanted['frame_size']} px; set "
        f"config.data.builder_config to a new name (e.g. '{name}_{wanted['num_frames']}x{wanted['frame_size']}') "
        "to prepare data with these settings."
      )
  else:
    builder_config = dataclasses.replace(
      registered[data.prepare], name=name, max_audio_seconds=float(data.max_audio_seconds), **wanted
    )
  if data.get("prepare_workers"):
    builder_config = dataclasses.replace(builder_config, num_workers=int(data.prepare_workers))
  return builder_config


def _prepare(config, data_dir: str) -> None:
  from data import make_demo_corpus
  from data import prepare
  from data import sources

  kind = config.data.prepare
  source = os.path.expanduser(config.data.source_dir or (os.environ.get("MELD_DIR", "") if kind == "meld" else ""))
  if kind == "demo":
    if not source:
      raise ValueError("config.data.source_dir is empty: where should the demo corpus be generated?")
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
    raise ValueError(f"config.data.prepare={kind!r}; use 'demo', 'meld', 'meld_text' or '' (data prepared beforehand).")
  logging.info("Preparing %s into %s; this happens once.", source, data_dir)
  _, report_path = prepare.prepare(source, data_dir, _builder_config(config))
  logging.info("Prepared (report: %s):\n%s", report_path, prepare.summary(report_path))


def prepare_data_if_missing(config, workdir: str) -> None:
  """Makes the prepared dataset when it is missing and config.data.prepare says how."""
  import jax
  from mer_jax.data import input_pipeline
  from mer_jax.training import train

  data_dir = train.resolve_data_dir(config, workdir)
  try:
    input_pipeline.load_builder(config, data_dir)
    return
  except FileNotFoundError:
    if not config.data.get("prepare"):
      raise
  if jax.process_index() == 0:
    _prepare(config, data_dir)
  if jax.process_count() > 1:  # the others wait, then read it (the data_dir must be shared storage)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("prepare_data")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  initialize_distributed()
  from mer_jax.training import host_memory

  advice = host_memory.advice()  # the faster malloc is opt-in, set before Python starts: say what it would gain
  logging.info("Host malloc: %s%s", host_memory.describe(), f" ({advice})" if advice else "")
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")  # tf.data only: the accelerators belong to JAX
  if not FLAGS.verbose_checkpointing:
    _quiet_orbax()
  from mer_jax.training import checkpoint
  from mer_jax.training import train

  config = FLAGS.config
  try:
    prepare_data_if_missing(config, FLAGS.workdir)
  except FileNotFoundError as e:  # no data and no way to make it: the message says what to do
    logging.error("%s", e)
    sys.exit(2)
  try:
    result = train.train_and_evaluate(config, FLAGS.workdir)
  except (train.NonFiniteLossError, checkpoint.IncompatibleCheckpointError) as e:
    logging.error("%s", e)
    sys.exit(1)
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
  app.run(main)
