"""Gated multimodal fusion (GMU, Arevalo et al. 2017) conditioned on text, with per-sample reliability heads.

    g   = sigmoid(W [v; a; t])            per-channel gate, (B, D)
    r_v = sigmoid(MLP_v([v; t]))          how much to trust video for this sample, (B,)
    r_a = sigmoid(MLP_a([a; t]))          how much to trust audio, (B,)
    fused = r_v * g * tanh(v') + r_a * (1 - g) * tanh(a')

A missing modality (has_video / has_audio False) has its reliability forced to exactly 0, so it contributes
nothing to the fused vector, and its features are zeroed before the gate so it cannot steer the gate either.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ReliabilityHead(nn.Module):
  """Small MLP -> sigmoid: (B, D_in) -> (B,)."""

  hidden: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    # Start trusting every modality (bias 2 -> r ~ 0.88) so early training is not starved of either.
    logit = nn.Dense(1, dtype=self.dtype, bias_init=nn.initializers.constant(2.0), name="out")(x)
    return nn.sigmoid(logit[..., 0].astype(jnp.float32))


class GatedFusion(nn.Module):
  """(B, Dv) video, (B, Da) audio, (B, Dt) text, (B,) presence flags -> fused (B, D) and explanation.

  Returns (fused, gate (B, D), reliability_video (B,), reliability_audio (B,)). With `use_gate=False` the gate
  is fixed at 0.5 and with `use_reliability=False` both reliabilities are 1 (ablations), presence masks still
  applied.
  """

  features: int
  use_gate: bool = True
  use_reliability: bool = True
  reliability_hidden: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video, audio, text, has_video, has_audio):
    video_present = has_video[:, None].astype(self.dtype)
    audio_present = has_audio[:, None].astype(self.dtype)
    video = video.astype(self.dtype) * video_present
    audio = audio.astype(self.dtype) * audio_present
    text = text.astype(self.dtype)
    video_hidden = jnp.tanh(nn.Dense(self.features, dtype=self.dtype, name="video_in")(video))
    audio_hidden = jnp.tanh(nn.Dense(self.features, dtype=self.dtype, name="audio_in")(audio))
    batch = video.shape[0]
    if self.use_gate:
      gate_input = jnp.concatenate([video, audio, text], axis=-1)
      gate = nn.sigmoid(nn.Dense(self.features, dtype=self.dtype, name="gate")(gate_input))
    else:
      gate = jnp.full((batch, self.features), 0.5, self.dtype)
    if self.use_reliability:
      reliability_video = ReliabilityHead(self.reliability_hidden, dtype=self.dtype, name="reliability_video")(
        jnp.concatenate([video, text], axis=-1)
      )
      reliability_audio = ReliabilityHead(self.reliability_hidden, dtype=self.dtype, name="reliability_audio")(
        jnp.concatenate([audio, text], axis=-1)
      )
    else:
      reliability_video = jnp.ones((batch,), jnp.float32)
      reliability_audio = jnp.ones((batch,), jnp.float32)
    reliability_video = reliability_video * has_video.astype(jnp.float32)
    reliability_audio = reliability_audio * has_audio.astype(jnp.float32)
    fused = (
      reliability_video[:, None].astype(self.dtype) * gate * video_hidden
      + reliability_audio[:, None].astype(self.dtype) * (1.0 - gate) * audio_hidden
    )
    return fused, gate, reliability_video, reliability_audio
