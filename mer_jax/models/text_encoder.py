"""Compact trainable text encoder for the edge model, and the shared text interface of both sizes.

The edge model cannot afford MiniLM's 22.7 M parameters, so it learns a small pre-LN transformer over the same
WordPiece vocabulary (the MiniLM tokenizer is used for both sizes, so data preparation does not depend on the
model size). `TextEncoder` picks the compact encoder or MiniLM from the config and always returns
(token states (B, L, D_text), pooled vector (B, D_text)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax import ops as ops_lib
from mer_jax.data import tokenizer as tokenizer_lib
from mer_jax.models import layers
from mer_jax.models import minilm
from mer_jax.models.audio_encoder import masked_mean


class TransformerLayer(nn.Module):
  """Pre-LN self-attention + MLP block over (B, L, D) with a (B, L) key mask."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    attention_mask = nn.make_attention_mask(mask, mask)
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, dropout_rate=0.0, name="attention")(
      y, y, mask=attention_mask
    )
    x = x + layers.Dropout(self.dropout_rate, deterministic=not train, ops=self.ops)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(nn.gelu(y))
    return x + layers.Dropout(self.dropout_rate, deterministic=not train, ops=self.ops)(y)


class CompactTextEncoder(nn.Module):
  """(B, L) token ids + mask -> (B, L, D) token states. Learned positions, pre-LN layers, final LayerNorm."""

  vocab_size: int = 30522
  features: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  max_length: int = 128
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, token_ids, mask, *, train: bool):
    length = token_ids.shape[1]
    if length > self.max_length:
      raise ValueError(
        f"Text length {length} exceeds the encoder's max_length {self.max_length}; "
        "raise config.model.text.max_length or lower config.data.max_text_length."
      )
    x = nn.Embed(self.vocab_size, self.features, dtype=self.dtype, name="token_embedding")(token_ids)
    positions = self.param("position_embedding", nn.initializers.normal(0.02), (self.max_length, self.features))
    x = x + positions[None, :length].astype(self.dtype)
    x = layers.Dropout(self.dropout_rate, deterministic=not train, ops=self.ops)(x)
    for index in range(self.num_layers):
      x = TransformerLayer(
        self.num_heads, self.mlp_dim, self.dropout_rate, dtype=self.dtype, ops=self.ops, name=f"layer{index}"
      )(x, mask, train=train)
    return nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)


class TextEncoder(nn.Module):
  """Text tokens -> (states (B, L, D_text), pooled (B, D_text)); kind 'compact' or 'minilm'.

  The pooled vector is the masked mean of the token states (sentence-transformers' pooling for MiniLM), over all
  of them or, with pool 'utterance', over the first segment when a dialogue context follows it (`utterance_mask`).
  """

  kind: str = "compact"
  compact: dict | None = None  # CompactTextEncoder fields
  # Tokens the pooled vector averages: 'all' valid ones, or the 'utterance' segment only (`utterance_mask`).
  pool: str = "all"
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, token_ids, mask, *, train: bool):
    if self.kind == "compact":
      states = CompactTextEncoder(**(self.compact or {}), dtype=self.dtype, ops=self.ops, name="compact")(
        token_ids, mask, train=train
      )
    elif self.kind == "minilm":
      states = minilm.MiniLMEncoder(minilm.MiniLMConfig(), dtype=self.dtype, ops=self.ops, name="minilm")(
        token_ids, mask, train=train
      )
    else:
      raise ValueError(f"Unknown text encoder kind {self.kind!r}; use 'compact' or 'minilm'.")
    pooled = masked_mean(states, pooling_mask(self.pool, token_ids, mask)[..., None], axis=1)
    return states, pooled


def pooling_mask(pool: str, token_ids, mask):
  """The tokens config.model.text.pool says the text vector averages: 'all' -> `mask`, 'utterance' ->
  `utterance_mask`. 'all' is the default, so that runs trained before the option keep their outputs."""
  if pool == "all":
    return mask
  if pool == "utterance":
    return utterance_mask(token_ids, mask)
  raise ValueError(f"config.model.text.pool={pool!r}; use 'all' or 'utterance'.")


def utterance_mask(token_ids, mask):
  """(B, L) ids and mask -> (B, L) bool: the mask on the first segment only ([CLS] utterance [SEP]), so that the
  pooled vector is the utterance's, its tokens having read the dialogue context (the second segment) through
  attention; a mean over both let a long context drown the utterance. Without context: the mask itself."""
  is_separator = token_ids == tokenizer_lib.SEP_ID
  # argmax, not cumsum: ArgMax exports to every runtime the edge model ships to.
  first_separator = jnp.where(
    jnp.any(is_separator, axis=1), jnp.argmax(is_separator.astype(jnp.int32), axis=1), token_ids.shape[1]
  )
  return mask & (jnp.arange(token_ids.shape[1])[None, :] <= first_separator[:, None])


def text_features(kind: str, compact: dict | None) -> int:
  """Width of the text encoder's states for a config."""
  if kind == "minilm":
    return minilm.MiniLMConfig().hidden_size
  return (compact or {}).get("features", CompactTextEncoder.features)


def pretrained_text_params(text_config, params: dict) -> dict:
  """The text encoder's params (the `text_encoder` subtree) with what config.model.text.pretrained asks for put
  in: MiniLM's weights (kind 'minilm'), or MiniLM's word embeddings on their principal axes as the compact
  encoder's token embedding (kind 'compact', minilm.projected_word_embeddings). Replaced leaves are numpy
  float32; the rest is returned as given. Unchanged when pretrained is False."""
  if not text_config.get("pretrained", False):
    return params
  if text_config.kind == "minilm":
    return {**params, "minilm": jax.tree.map(np.asarray, minilm.load_pretrained_params())}
  compact = dict(params["compact"])
  features = compact["token_embedding"]["embedding"].shape[1]
  compact["token_embedding"] = {"embedding": minilm.projected_word_embeddings(features)}
  return {**params, "compact": compact}
