"""mer_jax: efficient, explainable multimodal emotion recognition (video + audio + text) in JAX/Flax.

    import mer_jax
    model = mer_jax.load("runs/demo")          # a training workdir, an export folder, model.onnx or model*.tflite
    prediction = model.predict(video="clip.mp4", text="Oh my God!")

`import mer_jax` stays cheap: it pulls in neither JAX nor TensorFlow. `load` and the result types
(`Prediction`, `TaskPrediction`, `ChosenFrame`, `Model`) come from mer_jax.inference.api on first use; the
subpackages are imported on their own (`from mer_jax.models import emotion_model`).
"""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (dynamic version)

_API_NAMES = ("Model", "Prediction", "TaskPrediction", "ChosenFrame")


def load(path, *, config=None, step=None, threads=None):
  """The trained model at `path`, ready to predict (mer_jax.inference.api.load: a workdir runs with JAX, an .onnx /
  .tflite file or export folder with onnxruntime / LiteRT and no JAX)."""
  from mer_jax.inference import api

  return api.load(path, config=config, step=step, threads=threads)


def __getattr__(name: str):
  if name in _API_NAMES:  # the result types, imported on first use (mer_jax.inference.api reads media libraries)
    from mer_jax.inference import api

    return getattr(api, name)
  raise AttributeError(f"module 'mer_jax' has no attribute {name!r}")


__all__ = ["ChosenFrame", "Model", "Prediction", "TaskPrediction", "__version__", "load"]
