"""EmotionModel: the six components assembled, one classification head per task.

    text    -> TextEncoder -> token states (B, L, Dt), pooled (B, Dt)
    frames  -> TopKFrameSelector(text) -> K frames -> MobileNetV3Small -> frame tokens (B, K, D)
    log-mel -> AudioEncoder -> audio vector (B, D), segment tokens (B, S, D)
    GatedFusion(video, audio, text) -> fused (B, D), gate, r_v, r_a
    TextToAudioVisualAttention(text -> [fused, frame tokens, audio tokens]) -> pooled text (B, D)
    heads([fused; pooled text]) -> logits per task

`EmotionModel(config.model)(batch, train=...)` returns (logits: task -> (B, classes), explanation: dict).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mer_jax import ops as ops_lib
from mer_jax.models import audio_encoder
from mer_jax.models import cross_attention
from mer_jax.models import fusion
from mer_jax.models import layers
from mer_jax.models import mobilenet_v3
from mer_jax.models import text_encoder
from mer_jax.models import frame_selector as topk

# Grey frames are normalised with fixed statistics: the backbone's BatchNorm handles the rest.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 64.0

MODALITIES = ("video", "audio", "text")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"Unknown config.model.dtype {name!r}; use one of {sorted(DTYPES)}.")
  return DTYPES[name]


class EmotionModel(nn.Module):
  """Multimodal emotion model; `config` is `config.model` (see configs/default.py), `ops` the ops form the run
  chose (`mer_jax.ops.choose`; the reference form when not given)."""

  config: ml_collections.ConfigDict
  ops: ops_lib.Ops = ops_lib.REFERENCE

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array], *, train: bool):
    config = self.config
    dtype = compute_dtype(config.dtype)
    width = config.width
    has_video = batch["has_video"].astype(bool)
    has_audio = batch["has_audio"].astype(bool)
    text_mask = batch["text_mask"].astype(bool)

    # Text. The scorer's word query reads the full transcript (`word_mask`); in training, text dropout hides
    # a whole transcript from the text encoder (only its first token stays) for a share of the clips.
    word_mask = text_mask
    text_mask = self._text_dropout(text_mask, train=train)
    pool = config.text.get("pool", "all")
    text_states, text_pooled = text_encoder.TextEncoder(
      config.text.kind, dict(config.text.compact), pool, dtype=dtype, ops=self.ops, name="text_encoder"
    )(batch["text_ids"], text_mask, train=train)
    modalities = tuple(config.modalities)
    if modalities == ("text",):
      pooled_tokens = text_encoder.pooling_mask(pool, batch["text_ids"], text_mask)
      return self._text_only(text_states, text_pooled, pooled_tokens, batch["frames"].shape[:2], train=train)
    if modalities != MODALITIES:
      raise ValueError(f"config.model.modalities={modalities!r}; use {MODALITIES!r} or ('text',).")
    if config.text_guided_selection:
      scorer_text = topk.WordQuery(config.scorer.vocab_size, config.scorer.query_dim, dtype=dtype, name="scorer_words")(
        batch["text_ids"], word_mask
      )
    else:  # ablation: the scorer's query never sees the text
      scorer_text = jnp.zeros((text_mask.shape[0], config.scorer.query_dim), dtype)

    # Video: text-guided choice of K frames, backbone on those only.
    frames = batch["frames"]
    size, num_frames = frames.shape[0], frames.shape[1]
    selector = topk.TopKFrameSelector(
      config.top_k,
      config.selection_temperature,
      tuple(config.scorer.channels),
      config.scorer.query_dim,
      config.scorer.downscale,
      dtype=dtype,
      ops=self.ops,
      name="frame_selector",
    )
    backbone = mobilenet_v3.MobileNetV3Small(dtype=dtype, ops=self.ops, name="backbone")
    frame_projection = nn.Dense(width, dtype=dtype, name="frame_projection")
    if config.selection == "topk":
      selected, frame_scores, selected_indices = selector(frames, scorer_text, has_video)
      chosen = selected.shape[1]
    elif config.selection == "soft":
      # Ablation: no hard choice, every frame goes through the backbone, weighted by softmax(scores).
      _, frame_scores, selected_indices = selector(frames, scorer_text, has_video)
      selected, chosen = frames.astype(dtype), num_frames
    else:
      raise ValueError(f"Unknown config.model.selection {config.selection!r}; use 'topk' or 'soft'.")
    images = (selected.reshape((size * chosen,) + selected.shape[2:]) - PIXEL_MEAN) / PIXEL_SCALE
    frame_tokens = frame_projection(backbone(images, train=train)).reshape(size, chosen, width)
    if config.selection == "soft":
      weights = jax.nn.softmax(frame_scores / config.selection_temperature, axis=-1).astype(dtype)
      video_vector = jnp.einsum("bt,btd->bd", weights, frame_tokens)
    else:
      video_vector = jnp.mean(frame_tokens, axis=1)
    relevance_logits = evidence_logits = None
    if config.frame_relevance:
      # What frames say on their own about the primary task (config.primary_task): every frame through a trunk as
      # cheap as the scorer's (its agreement with the clip's label is the scorer's training target), and
      # each chosen frame's backbone token (asking them for the label keeps the backbone learning while the
      # text alone can fit the training labels). See losses.frame_selection_loss. Training aids: inference
      # skips the evidence trunk, so it costs nothing when serving.
      primary_classes = config.tasks[config.primary_task]
      if train or self.is_initializing():
        evidence_logits = topk.FrameEvidence(
          primary_classes,
          tuple(config.scorer.channels),
          config.scorer.downscale,
          dtype=dtype,
          ops=self.ops,
          name="frame_evidence",
        )(frames)
      relevance_logits = nn.Dense(primary_classes, dtype=dtype, name="frame_relevance")(frame_tokens)

    # Audio.
    audio_vector, audio_tokens, audio_token_mask = audio_encoder.AudioEncoder(
      width,
      tuple(config.audio.channels),
      config.audio.kernel,
      config.audio.num_segments,
      dtype=dtype,
      name="audio_encoder",
    )(batch["audio"].astype(jnp.float32), batch["audio_mask"].astype(bool))
    audio_relevance_logits = None
    if config.get("audio_relevance", False) and (train or self.is_initializing()):
      # What the audio says on its own about the primary task (training aid, skipped when serving). Without it the
      # audio encoder learnt little while the frames answered most clips, and the model fell to 0.44 accuracy when
      # the video was gone (demo: audio alone can reach ~0.6). See losses.audio_relevance_loss.
      audio_relevance_logits = nn.Dense(config.tasks[config.primary_task], dtype=dtype, name="audio_relevance")(
        audio_vector
      )

    # Fusion.
    text_vector = nn.Dense(width, dtype=dtype, name="text_projection")(text_pooled)
    fused, gate, reliability_video, reliability_audio = fusion.GatedFusion(
      width, config.use_gate, config.use_reliability, dtype=dtype, name="fusion"
    )(video_vector, audio_vector, text_vector, has_video, has_audio)

    # Cross-attention: text tokens over [fused, frame tokens, audio segment tokens]. A modality's tokens are
    # scaled by its reliability, so distrusting a modality also quiets it here.
    frame_keys = frame_tokens * reliability_video[:, None, None].astype(dtype)
    audio_keys = audio_tokens.astype(dtype) * reliability_audio[:, None, None].astype(dtype)
    key_tokens = jnp.concatenate([fused[:, None, :], frame_keys, audio_keys], axis=1)
    key_mask = jnp.concatenate(
      [
        jnp.ones((size, 1), bool),
        jnp.broadcast_to(has_video[:, None], (size, chosen)),
        audio_token_mask & has_audio[:, None],
      ],
      axis=1,
    )
    text_tokens = nn.Dense(width, dtype=dtype, name="text_token_projection")(text_states)
    attended, attention = cross_attention.TextToAudioVisualAttention(
      config.attention.num_heads, config.dropout_rate, dtype=dtype, ops=self.ops, name="cross_attention"
    )(text_tokens, key_tokens, text_mask, key_mask, train=train)
    attended_pooled = audio_encoder.masked_mean(attended, text_mask[..., None], axis=1)

    # Heads.
    hidden = jnp.concatenate([fused, attended_pooled.astype(dtype)], axis=-1)
    logits = self._heads(hidden, train=train)
    explanation = {
      "frame_scores": frame_scores.astype(jnp.float32),
      "selected_indices": selected_indices,
      "gate": gate.astype(jnp.float32),
      "reliability_video": reliability_video,
      "reliability_audio": reliability_audio,
      "attention": attention,
    }
    if relevance_logits is not None:
      explanation["frame_relevance_logits"] = relevance_logits.astype(jnp.float32)  # (B, K, C), primary task
      if evidence_logits is not None:
        explanation["frame_evidence_logits"] = evidence_logits  # (B, T, C) float32, primary task; training only
    if audio_relevance_logits is not None:
      explanation["audio_relevance_logits"] = audio_relevance_logits.astype(jnp.float32)  # (B, C), training only
    return logits, explanation

  def _text_dropout(self, text_mask: jax.Array, *, train: bool) -> jax.Array:
    """(B, L) bool -> the mask the text encoder sees: with probability `config.text_dropout` (training only)
    a clip keeps only its first token, as if it had no transcript.

    A small corpus's transcripts are easy to memorise (the demo's edge model: train accuracy 0.99, dev 0.5),
    after which the training loss no longer asks anything of video or audio. Clips without their text make
    the classifier learn what the chosen frames and the audio say. The frame scorer still reads the words.
    """
    rate = float(self.config.text_dropout)
    if not train or rate <= 0.0:
      return text_mask
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (text_mask.shape[0], 1))
    first = jnp.arange(text_mask.shape[1]) == 0
    return text_mask & (keep | first[None, :])

  def _heads(self, hidden: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """(B, 2D) -> logits per task (B, classes) float32, through one shared hidden layer."""
    config, dtype = self.config, compute_dtype(self.config.dtype)
    hidden = nn.gelu(nn.Dense(config.width, dtype=dtype, name="head_hidden")(hidden))
    hidden = layers.Dropout(config.dropout_rate, deterministic=not train, ops=self.ops)(hidden)
    return {
      task: nn.Dense(classes, dtype=dtype, name=f"head_{task}")(hidden).astype(jnp.float32)
      for task, classes in config.tasks.items()
    }

  def _text_only(self, text_states, text_pooled, pooled_tokens, frame_shape, *, train: bool):
    """Text-only model (config.model.modalities = ('text',)): no scorer, backbone or audio encoder, which
    would only see the zeros of absent modalities (MELD's CSVs alone) and cost compute and compile time.
    The token states are pooled over `pooled_tokens` (B, L) (text_encoder.pooling_mask).

    The explanation keeps its shapes so evaluation and export code need no special case: frame scores 0,
    the first K frames, gate 0 and both reliabilities 0 (no video or audio was used).
    """
    config, dtype = self.config, compute_dtype(self.config.dtype)
    size, num_frames = frame_shape
    text_vector = nn.Dense(config.width, dtype=dtype, name="text_projection")(text_pooled)
    text_tokens = nn.Dense(config.width, dtype=dtype, name="text_token_projection")(text_states)
    tokens_pooled = audio_encoder.masked_mean(text_tokens, pooled_tokens[..., None], axis=1)
    logits = self._heads(jnp.concatenate([text_vector, tokens_pooled.astype(dtype)], axis=-1), train=train)
    zeros = jnp.zeros((size,), jnp.float32)
    explanation = {
      "frame_scores": jnp.zeros((size, num_frames), jnp.float32),
      "selected_indices": jnp.broadcast_to(jnp.arange(config.top_k, dtype=jnp.int32), (size, config.top_k)),
      "gate": jnp.zeros((size, config.width), jnp.float32),
      "reliability_video": zeros,
      "reliability_audio": zeros,
      "attention": jnp.zeros((size, config.attention.num_heads, pooled_tokens.shape[1], 1), jnp.float32),
    }
    return logits, explanation


def for_this_host(model_config: ml_collections.ConfigDict) -> EmotionModel:
  """EmotionModel with the ops form `model_config.ops` picks for this process's default backend and devices
  (`mer_jax.ops.choose`): for tools that run a trained model here."""
  return EmotionModel(model_config, ops=ops_lib.choose(model_config.ops, dtype=model_config.dtype))


def input_spec(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the model inputs for a full config (`config.model` + `config.data`)."""
  data = config.data
  num_audio_frames = audio_frame_count(data)
  return {
    "frames": jax.ShapeDtypeStruct((batch_size, data.num_frames, data.frame_size, data.frame_size, 1), jnp.uint8),
    "audio": jax.ShapeDtypeStruct((batch_size, num_audio_frames, data.num_mel_bins), jnp.float32),
    "audio_mask": jax.ShapeDtypeStruct((batch_size, num_audio_frames), jnp.bool_),
    "text_ids": jax.ShapeDtypeStruct((batch_size, data.max_text_length), jnp.int32),
    "text_mask": jax.ShapeDtypeStruct((batch_size, data.max_text_length), jnp.bool_),
    "has_video": jax.ShapeDtypeStruct((batch_size,), jnp.bool_),
    "has_audio": jax.ShapeDtypeStruct((batch_size,), jnp.bool_),
  }


def audio_frame_count(data_config: ml_collections.ConfigDict) -> int:
  """Number of log-mel frames F for `max_audio_seconds` (25 ms windows, 10 ms hops at 16 kHz)."""
  from mer_jax.data import features  # tf-based; imported lazily so the model itself never needs TensorFlow.

  return features.num_audio_frames(data_config.max_audio_seconds, data_config.sample_rate)


def zeros_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.Array]:
  """An all-zero batch with every modality present: for init, shape inference and export tracing."""
  batch = {name: jnp.zeros(spec.shape, spec.dtype) for name, spec in input_spec(config, batch_size).items()}
  batch["has_video"] = jnp.ones((batch_size,), bool)
  batch["has_audio"] = jnp.ones((batch_size,), bool)
  batch["text_mask"] = batch["text_mask"].at[:, 0].set(True)
  return batch


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
  """Initial {'params', 'batch_stats'}; pretrained text weights where the config asks
  (text_encoder.pretrained_text_params). The parameters do not depend on the ops form, so the reference form
  initialises them."""
  model = EmotionModel(config.model)
  # Jitted: op-by-op initialisation of the backbone's many small layers is several times slower on CPU.
  init = jax.jit(lambda rng, batch: model.init({"params": rng, "dropout": rng}, batch, train=False))
  variables = dict(init(rng, zeros_batch(config, batch_size)))
  params = dict(variables["params"])
  if "text_encoder" in params:
    pretrained = text_encoder.pretrained_text_params(config.model.text, params["text_encoder"])
    params["text_encoder"] = jax.tree.map(jnp.asarray, pretrained)
  variables["params"] = params
  return variables


def count_parameters(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
