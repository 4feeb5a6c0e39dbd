"""One cross-attention layer: text tokens (queries) attend to the audiovisual tokens (keys and values).

A single key would make the softmax trivial (every weight 1), so the keys are the fused token followed by the
K selected frame tokens and the S audio segment tokens: (B, 1 + K + S, D). The fused token is always valid, so
no query ever faces an all-masked row even when both video and audio are missing. The attention weights are
returned for explanation: (B, heads, L, 1 + K + S).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax import ops as ops_lib
from mer_jax.models import layers


class TextToAudioVisualAttention(nn.Module):
  """(B, L, D) text states, (B, N, D) keys, (B, L) text mask, (B, N) key mask -> (B, L, D), weights."""

  num_heads: int = 4
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, text_states, key_tokens, text_mask, key_mask, *, train: bool):
    features = text_states.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"Model width {features} is not divisible by {self.num_heads} attention heads.")
    head_dim = features // self.num_heads
    queries = nn.LayerNorm(dtype=self.dtype, name="query_norm")(text_states)
    keys = nn.LayerNorm(dtype=self.dtype, name="key_norm")(key_tokens)

    def project(name, x):
      return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)(x)

    q, k, v = project("query", queries), project("key", keys), project("value", keys)
    logits = jnp.einsum("blhd,bnhd->bhln", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    attended = jnp.einsum("bhln,bnhd->blhd", weights.astype(self.dtype), v)
    attended = nn.DenseGeneral(features, axis=(-2, -1), dtype=self.dtype, name="out")(attended)
    # No MLP after the attention: the classifier's hidden layer follows right after pooling, and the
    # edge model's FLOPs budget is better spent on the backbone.
    x = text_states + layers.Dropout(self.dropout_rate, deterministic=not train, ops=self.ops)(attended)
    x = x * text_mask[..., None].astype(x.dtype)
    return x, weights
