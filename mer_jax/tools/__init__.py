"""The command-line tools: predict, evaluate, explain, report, ablations (`python -m mer_jax.tools.<tool>`)."""


def hide_accelerators_from_tensorflow() -> None:
  """tf.data is only the input pipeline here: TensorFlow must not take the GPUs that belong to JAX."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")


def run_command(main) -> int:
  """A tool's console-script body: `main()` with the GPUs kept for JAX; exit status 0 when it returns, 2 with one
  line on stderr when the user passed something unusable (`mer_jax.errors.UserError`)."""
  from mer_jax import errors

  hide_accelerators_from_tensorflow()
  return errors.run_cli(main)
