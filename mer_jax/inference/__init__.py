"""Prediction with a trained model: `api` (the typed Python API behind `mer_jax.load`) on top of `runners` (a clip
and its transcript -> model inputs, and the JAX / ONNX Runtime / LiteRT runners)."""
