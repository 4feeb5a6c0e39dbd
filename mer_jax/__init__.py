"""mer_jax: efficient, explainable multimodal emotion recognition (video + audio + text) in JAX/Flax.

The subpackages are imported on their own (`from mer_jax.models import emotion_model`), so that
`import mer_jax` stays cheap and pulls in neither JAX nor TensorFlow.
"""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it (dynamic version)
