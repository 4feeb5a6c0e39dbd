"""The command-line tools: predict, evaluate, explain, report, ablations (`python -m mer_jax.tools.<tool>`)."""

import functools
import os


def hide_accelerators_from_tensorflow() -> None:
  """tf.data is only the input pipeline here: TensorFlow must not take the GPUs that belong to JAX."""
  # Before TensorFlow loads: its C++ start-up warnings would bury a command's one-line error.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")


def check_output_folder(path: str, flag: str = "--out") -> None:
  """Raises InvalidInput when folder `path` (local or gs://) cannot be made or written: it, or the nearest existing
  path above it, is a file. Tools call it before the long work, so that the result is not lost at the end."""
  from mer_jax import errors
  from mer_jax import storage

  if storage.is_remote(path):  # a bucket makes any folder on write; only an object of that very name is in the way
    if storage.is_file(path):
      raise errors.InvalidInput(f"{flag} {path}: that is a file, not a folder; pass a folder path.")
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.InvalidInput(f"{flag} {path}: {existing} is a file, not a folder; pass a folder path.")


def run_command(main, argv=None) -> int:
  """A tool's console-script body: `main(argv)` with the GPUs kept for JAX; exit status 0 when it returns, 2 with
  one line on stderr when the user passed something unusable (`mer_jax.errors.UserError`). `argv` None: the
  command line."""
  from mer_jax import errors

  hide_accelerators_from_tensorflow()
  return errors.run_cli(functools.partial(main, argv))
