"""The edge EmotionModel re-implemented in PyTorch: the reference that benchmarks/run.py races JAX against.

Same architecture as mer_jax/models/emotion_model.py, layer for layer: same sizes, same parameter count (asserted in
tests/test_torch_reference.py), same batch contract, and `load_flax_variables` ports a Flax variable tree
into it so the two forward passes can be compared number for number. Only the edge model (compact text
encoder, `selection='topk'`) is covered; PyTorch is a benchmark-only dependency (requirements-bench.txt),
never needed by the library.

Written the way a PyTorch user would: NCHW convolutions, `nn.Conv2d(groups=C)` depthwise convs, eager
execution, and the straight-through top-k as a `torch.autograd.Function`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mer_jax.data.tokenizer import SEP_ID
from mer_jax.models import mobilenet_v3

# Flax defaults, which torch's differ from.
LAYER_NORM_EPSILON = 1e-6  # flax nn.LayerNorm (torch: 1e-5)
TORCH_BN_MOMENTUM = 0.01  # torch convention; flax's momentum 0.99 is the same EMA
PIXEL_MEAN, PIXEL_SCALE = 127.5, 64.0  # mer_jax/models/emotion_model.py


def gelu(x: torch.Tensor) -> torch.Tensor:
  """flax nn.gelu defaults to the tanh approximation."""
  return F.gelu(x, approximate="tanh")


def layer_norm(features: int) -> nn.LayerNorm:
  return nn.LayerNorm(features, eps=LAYER_NORM_EPSILON)


def utterance_mask(token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """`text_encoder.utterance_mask`: the mask on the first segment ([CLS] utterance [SEP]) only."""
  is_separator = token_ids == SEP_ID
  first = torch.where(is_separator.any(1), is_separator.int().argmax(1), token_ids.shape[1])
  return mask & (torch.arange(token_ids.shape[1])[None, :] <= first[:, None])


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
  """Mean over `dim` where the broadcastable bool `mask` is True; 0 where nothing is valid."""
  weights = mask.to(values.dtype)
  return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


# ----------------------------------------------------------------------------- MobileNetV3-Small


class ConvBatchNorm(nn.Module):
  """Conv2d (no bias, symmetric padding) -> BatchNorm2d(eps 1e-3, momentum 0.01) -> optional activation."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: str | None = None,
  ):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(out_channels, eps=mobilenet_v3.BATCHNORM_EPSILON, momentum=TORCH_BN_MOMENTUM)
    self.act = {None: nn.Identity(), "relu": nn.ReLU(), "hardswish": nn.Hardswish()}[activation]

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


class SqueezeExcitation(nn.Module):
  def __init__(self, channels: int, squeeze_channels: int):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
    self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

  def forward(self, x):
    scale = x.mean((2, 3), keepdim=True)
    return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))


class InvertedResidual(nn.Module):
  def __init__(self, in_channels: int, spec: mobilenet_v3.BlockSpec):
    super().__init__()
    self.spec, self.use_residual = spec, spec.stride == 1 and in_channels == spec.out
    if spec.expanded != in_channels:
      self.expand = ConvBatchNorm(in_channels, spec.expanded, 1, activation=spec.activation)
    self.depthwise = ConvBatchNorm(
      spec.expanded, spec.expanded, spec.kernel, spec.stride, groups=spec.expanded, activation=spec.activation
    )
    if spec.use_se:
      self.se = SqueezeExcitation(spec.expanded, mobilenet_v3.make_divisible(spec.expanded // 4))
    self.project = ConvBatchNorm(spec.expanded, spec.out, 1)

  def forward(self, x):
    y = self.expand(x) if hasattr(self, "expand") else x
    y = self.depthwise(y)
    if self.spec.use_se:
      y = self.se(y)
    y = self.project(y)
    return y + x if self.use_residual else y


class MobileNetV3Small(nn.Module):
  """(N, 1, H, W) float -> (N, 576): torchvision's block table, 1 grey input channel, no classifier."""

  def __init__(self, blocks=mobilenet_v3.SMALL_BLOCKS, last_channels: int = mobilenet_v3.LAST_CHANNELS):
    super().__init__()
    self.stem = ConvBatchNorm(1, mobilenet_v3.STEM_CHANNELS, 3, 2, activation="hardswish")
    channels = mobilenet_v3.STEM_CHANNELS
    for index, spec in enumerate(blocks):
      self.add_module(f"block{index}", InvertedResidual(channels, spec))
      channels = spec.out
    self.num_blocks = len(blocks)
    self.last = ConvBatchNorm(channels, last_channels, 1, activation="hardswish")

  def use_channels_last(self) -> None:
    """NHWC memory: torch's oneDNN convolutions are faster on CPU in it (inputs converted on entry)."""
    self.to(memory_format=torch.channels_last)
    self.channels_last = True

  def forward(self, images):
    if getattr(self, "channels_last", False):
      images = images.contiguous(memory_format=torch.channels_last)
    x = self.stem(images)
    for index in range(self.num_blocks):
      x = getattr(self, f"block{index}")(x)
    return self.last(x).mean((2, 3))


# ----------------------------------------------------------------------------- text-guided top-k


class StraightThroughTopK(torch.autograd.Function):
  """(B, T) scores -> (B, K, T) exact K-hot selection (time order); backward: grad of softmax(scores / tau)
  broadcast to every slot, as `Ops.straight_through_topk` (mer_jax/ops)."""

  @staticmethod
  def forward(ctx, scores, k: int, temperature: float):
    # A stable descending sort breaks ties by the lower index, as jax.lax.top_k (e.g. no-video rows).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    indices = torch.sort(order[:, :k], dim=-1).values
    ctx.save_for_backward(scores)
    ctx.temperature = temperature
    return F.one_hot(indices, scores.shape[-1]).to(scores.dtype)

  @staticmethod
  def backward(ctx, cotangent):
    (scores,) = ctx.saved_tensors
    soft = torch.softmax(scores / ctx.temperature, dim=-1)
    slot_sum = cotangent.sum(1)  # the surrogate is the same in every slot
    grad = soft * (slot_sum - (slot_sum * soft).sum(-1, keepdim=True)) / ctx.temperature
    return grad, None, None


class ScorerTrunk(nn.Module):
  """`topk._scorer_trunk`: centred pixels, average-pool, 3x3 stride-2 convs with hard-swish."""

  def __init__(self, channels=(8, 16, 32), downscale: int = 2):
    super().__init__()
    self.downscale, in_channels = downscale, 1
    for index, features in enumerate(channels):
      self.add_module(f"conv{index}", nn.Conv2d(in_channels, features, 3, 2, 1))
      in_channels = features
    self.num_convs, self.trunk_channels = len(channels), in_channels

  def trunk(self, frames):
    """(B, T, H, W, 1) uint8 -> (B*T, C, h, w)."""
    batch, num_frames, height, width, _ = frames.shape
    x = (frames.reshape(batch * num_frames, 1, height, width).float() - 127.5) / 64.0
    if self.downscale > 1:
      x = F.avg_pool2d(x, self.downscale)
    for index in range(self.num_convs):
      x = F.hardswish(getattr(self, f"conv{index}")(x))
    return x


class FrameScorer(ScorerTrunk):
  """(B, T, H, W, 1) uint8, (B, Dt) -> (B, T) scores: downscale, 3 strided convs, text query, logsumexp."""

  def __init__(self, text_features: int, channels=(8, 16, 32), query_dim: int = 32, downscale: int = 2):
    super().__init__(channels, downscale)
    self.query_dim = query_dim
    self.keys = nn.Linear(self.trunk_channels, query_dim)
    self.query = nn.Linear(text_features, query_dim)

  def forward(self, frames, text_vector):
    batch, num_frames = frames.shape[:2]
    x = self.trunk(frames)
    keys = self.keys(x.flatten(2).transpose(1, 2)).reshape(batch, num_frames, -1, self.query_dim)
    query = self.query(text_vector)
    cell_scores = torch.einsum("btnq,bq->btn", keys, query) / math.sqrt(self.query_dim)
    return torch.logsumexp(cell_scores, dim=-1)


class WordQuery(nn.Module):
  """`topk.WordQuery`: the sum of the real tokens' word vectors."""

  def __init__(self, vocab_size: int, features: int):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, features)

  def forward(self, token_ids, mask):
    return (self.embedding(token_ids) * mask[..., None]).sum(1)


class FrameEvidence(ScorerTrunk):
  """`topk.FrameEvidence`: each frame's primary-task logits from a trunk like the scorer's."""

  def __init__(self, num_classes: int, channels=(8, 16, 32), downscale: int = 2):
    super().__init__(channels, downscale)
    self.logits = nn.Linear(self.trunk_channels, num_classes)

  def forward(self, frames):
    batch, num_frames = frames.shape[:2]
    return self.logits(self.trunk(frames).mean((2, 3))).reshape(batch, num_frames, -1)


class TopKFrameSelector(nn.Module):
  def __init__(self, k: int, temperature: float, text_features: int, **scorer_kwargs):
    super().__init__()
    self.k, self.temperature = k, temperature
    self.scorer = FrameScorer(text_features, **scorer_kwargs)

  def forward(self, frames, text_vector, has_video):
    """-> selected (B, K, H, W) float, scores (B, T), indices (B, K). P @ frames in pixel space."""
    batch, num_frames = frames.shape[:2]
    scores = self.scorer(frames, text_vector)
    scores = torch.where(has_video[:, None], scores, torch.zeros_like(scores))
    selection = StraightThroughTopK.apply(scores, self.k, self.temperature)
    selected = torch.bmm(selection, frames.reshape(batch, num_frames, -1).float())
    return selected.reshape(batch, self.k, *frames.shape[2:4]), scores, selection.argmax(-1)


# ----------------------------------------------------------------------------- text, audio, fusion, attention


class MultiHeadProjection(nn.Linear):
  """flax DenseGeneral(features -> (heads, head_dim)): a Linear whose output is split into heads."""

  def __init__(self, features: int, num_heads: int):
    super().__init__(features, features)
    self.num_heads = num_heads

  def forward(self, x):
    return super().forward(x).unflatten(-1, (self.num_heads, -1))  # (B, N, H, hd)


class SelfAttention(nn.Module):
  """flax MultiHeadDotProductAttention: query/key/value/out projections with biases."""

  def __init__(self, features: int, num_heads: int):
    super().__init__()
    self.query = MultiHeadProjection(features, num_heads)
    self.key = MultiHeadProjection(features, num_heads)
    self.value = MultiHeadProjection(features, num_heads)
    self.out = nn.Linear(features, features)

  def forward(self, x, mask):
    q, k, v = (proj(x).transpose(1, 2) for proj in (self.query, self.key, self.value))  # (B, H, L, hd)
    # Key-only mask: rows of padded queries differ from flax's (there all-masked, uniform), but padded
    # positions never reach a valid token, the pooled vector or the cross-attention (masked there).
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return self.out(attended.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
  def __init__(self, features: int, num_heads: int, mlp_dim: int, dropout_rate: float):
    super().__init__()
    self.attention_norm, self.mlp_norm = layer_norm(features), layer_norm(features)
    self.attention = SelfAttention(features, num_heads)
    self.mlp_in, self.mlp_out = nn.Linear(features, mlp_dim), nn.Linear(mlp_dim, features)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x, mask):
    x = x + self.dropout(self.attention(self.attention_norm(x), mask))
    return x + self.dropout(self.mlp_out(gelu(self.mlp_in(self.mlp_norm(x)))))


class CompactTextEncoder(nn.Module):
  def __init__(
    self, vocab_size=30522, features=128, num_layers=2, num_heads=4, mlp_dim=256, max_length=128, dropout_rate=0.1
  ):
    super().__init__()
    self.token_embedding = nn.Embedding(vocab_size, features)
    self.position_embedding = nn.Parameter(torch.randn(max_length, features) * 0.02)
    self.num_layers, self.dropout = num_layers, nn.Dropout(dropout_rate)
    for index in range(num_layers):
      self.add_module(f"layer{index}", TransformerLayer(features, num_heads, mlp_dim, dropout_rate))
    self.final_norm = layer_norm(features)

  def forward(self, token_ids, mask):
    x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
    x = self.dropout(x)
    for index in range(self.num_layers):
      x = getattr(self, f"layer{index}")(x, mask)
    return self.final_norm(x)


def segment_pool(values, mask, num_segments: int):
  """(B, N, D), (B, N) bool -> tokens (B, S, D), token mask (B, S): as mer_jax.models.audio_encoder.segment_pool."""
  length = mask.sum(1, keepdim=True).float()
  positions = torch.arange(values.shape[1], dtype=torch.float32)[None, :]
  segment_of_step = torch.floor(positions * num_segments / length.clamp_min(1.0)).long()
  membership = (segment_of_step[:, :, None] == torch.arange(num_segments)[None, None, :]) & mask[:, :, None]
  membership = membership.to(values.dtype)
  counts = membership.sum(1)
  tokens = torch.einsum("bns,bnd->bsd", membership, values) / counts.clamp_min(1.0)[..., None]
  return tokens, counts > 0


class AudioEncoder(nn.Module):
  """(B, F, M) log-mel, (B, F) mask -> vector (B, D), tokens (B, S, D), token mask (B, S)."""

  def __init__(self, num_mel_bins: int, features=128, channels=(64, 96, 128, 128), kernel=5, num_segments=4):
    super().__init__()
    self.num_layers, self.num_segments, in_channels = len(channels), num_segments, num_mel_bins
    for index, out in enumerate(channels):
      self.add_module(f"conv{index}", nn.Conv1d(in_channels, out, kernel, 2, kernel // 2))
      self.add_module(f"norm{index}", layer_norm(out))
      in_channels = out
    self.project = nn.Linear(in_channels, features)

  def forward(self, log_mel, mask):
    weights = mask[..., None]
    shifted = (log_mel - log_mel[:, :1, :]) * weights  # as the JAX encoder: exact zeros for constant bins
    mean = masked_mean(shifted, weights, 1)[:, None, :]
    centred = (shifted - mean) * weights
    x = centred / torch.sqrt(masked_mean(centred.square(), weights, 1)[:, None, :] + 1e-3)
    for index in range(self.num_layers):
      x = x * mask[..., None]
      # Conv1d wants (B, C, F); LayerNorm over channels wants (B, F, C).
      x = getattr(self, f"conv{index}")(x.transpose(1, 2)).transpose(1, 2)
      x = gelu(getattr(self, f"norm{index}")(x))
      mask = mask[:, ::2]
    x = self.project(x)
    tokens, token_mask = segment_pool(x, mask, self.num_segments)
    return masked_mean(x, mask[..., None], 1), tokens, token_mask


class ReliabilityHead(nn.Module):
  def __init__(self, in_features: int, hidden: int = 64):
    super().__init__()
    self.hidden, self.out = nn.Linear(in_features, hidden), nn.Linear(hidden, 1)
    nn.init.constant_(self.out.bias, 2.0)

  def forward(self, x):
    return torch.sigmoid(self.out(gelu(self.hidden(x)))[..., 0])


class GatedFusion(nn.Module):
  def __init__(self, features: int, text_features: int, use_gate=True, use_reliability=True, hidden=64):
    super().__init__()
    self.features, self.use_gate, self.use_reliability = features, use_gate, use_reliability
    self.video_in, self.audio_in = nn.Linear(features, features), nn.Linear(features, features)
    if use_gate:
      self.gate = nn.Linear(2 * features + text_features, features)
    if use_reliability:
      self.reliability_video = ReliabilityHead(features + text_features, hidden)
      self.reliability_audio = ReliabilityHead(features + text_features, hidden)

  def forward(self, video, audio, text, has_video, has_audio):
    video, audio = video * has_video[:, None], audio * has_audio[:, None]
    video_hidden, audio_hidden = torch.tanh(self.video_in(video)), torch.tanh(self.audio_in(audio))
    batch = video.shape[0]
    gate = (
      torch.sigmoid(self.gate(torch.cat([video, audio, text], -1)))
      if self.use_gate
      else torch.full((batch, self.features), 0.5)
    )
    if self.use_reliability:
      r_v = self.reliability_video(torch.cat([video, text], -1))
      r_a = self.reliability_audio(torch.cat([audio, text], -1))
    else:
      r_v, r_a = torch.ones(batch), torch.ones(batch)
    r_v, r_a = r_v * has_video, r_a * has_audio
    fused = r_v[:, None] * gate * video_hidden + r_a[:, None] * (1.0 - gate) * audio_hidden
    return fused, gate, r_v, r_a


class CrossAttention(nn.Module):
  """Text tokens attend to [fused, frame tokens, audio tokens]; returns (B, L, D) and weights (B, H, L, N)."""

  def __init__(self, features: int, num_heads: int, dropout_rate: float):
    super().__init__()
    self.query_norm, self.key_norm = layer_norm(features), layer_norm(features)
    self.query = MultiHeadProjection(features, num_heads)
    self.key = MultiHeadProjection(features, num_heads)
    self.value = MultiHeadProjection(features, num_heads)
    self.out = nn.Linear(features, features)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, text_states, key_tokens, text_mask, key_mask):
    queries, keys = self.query_norm(text_states), self.key_norm(key_tokens)
    q, k, v = self.query(queries), self.key(keys), self.value(keys)
    logits = torch.einsum("blhd,bnhd->bhln", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    weights = torch.softmax(logits, -1)
    attended = self.out(torch.einsum("bhln,bnhd->blhd", weights, v).flatten(2))
    return (text_states + self.dropout(attended)) * text_mask[..., None], weights


# ----------------------------------------------------------------------------- the model


class TorchEmotionModel(nn.Module):
  """`EmotionModel` of mer_jax/models/emotion_model.py for `config.model` (edge: compact text, top-k selection).

  forward(batch of torch tensors per the batch contract) -> (logits: task -> (B, C), explanation dict).
  """

  def __init__(self, model_config: Any, num_mel_bins: int):
    super().__init__()
    config = model_config
    if (
      config.text.kind != "compact"
      or config.selection != "topk"
      or config.dtype != "float32"
      or tuple(config.get("modalities", ("video", "audio", "text"))) != ("video", "audio", "text")
    ):
      raise ValueError(
        "The PyTorch reference covers the edge model only (text.kind='compact', "
        "selection='topk', dtype='float32', all modalities); benchmark other variants in "
        "JAX alone."
      )
    width, compact = config.width, dict(config.text.compact)
    text_features = compact.get("features", 128)
    self.text_guided, self.top_k, self.width = config.text_guided_selection, config.top_k, width
    self.text_dropout = float(config.get("text_dropout", 0.0))
    self.text_pool = config.text.get("pool", "all")
    self.tasks = tuple(config.tasks.keys())
    self.text_encoder = nn.Module()
    self.text_encoder.compact = CompactTextEncoder(**compact, dropout_rate=config.dropout_rate)
    self.query_dim = config.scorer.query_dim
    self.frame_selector = TopKFrameSelector(
      config.top_k,
      config.selection_temperature,
      self.query_dim,
      channels=tuple(config.scorer.channels),
      query_dim=config.scorer.query_dim,
      downscale=config.scorer.downscale,
    )
    self.backbone = MobileNetV3Small()
    self.frame_projection = nn.Linear(mobilenet_v3.LAST_CHANNELS, width)
    if self.text_guided:
      self.scorer_words = WordQuery(config.scorer.vocab_size, self.query_dim)
    self.frame_relevance = self.frame_evidence = None
    if config.get("frame_relevance", False):
      primary_classes = config.tasks[config.primary_task]
      self.frame_relevance = nn.Linear(width, primary_classes)
      self.frame_evidence = FrameEvidence(primary_classes, tuple(config.scorer.channels), config.scorer.downscale)
    self.audio_encoder = AudioEncoder(
      num_mel_bins,
      width,
      tuple(config.audio.channels),
      config.audio.kernel,
      config.audio.num_segments,
    )
    self.audio_relevance = None
    if config.get("audio_relevance", False):
      self.audio_relevance = nn.Linear(width, config.tasks[config.primary_task])
    self.text_projection = nn.Linear(text_features, width)
    self.fusion = GatedFusion(width, width, config.use_gate, config.use_reliability)
    self.text_token_projection = nn.Linear(text_features, width)
    self.cross_attention = CrossAttention(width, config.attention.num_heads, config.dropout_rate)
    self.head_hidden = nn.Linear(2 * width, width)
    self.head_dropout = nn.Dropout(config.dropout_rate)
    for task, classes in config.tasks.items():
      self.add_module(f"head_{task}", nn.Linear(width, classes))

  def forward(self, batch: Mapping[str, torch.Tensor]):
    has_video, has_audio = batch["has_video"].bool(), batch["has_audio"].bool()
    word_mask = batch["text_mask"].bool()
    text_mask = word_mask
    if self.training and self.text_dropout > 0:  # `EmotionModel._text_dropout`: keep only the first token
      keep = torch.rand(text_mask.shape[0], 1) >= self.text_dropout
      first = torch.arange(text_mask.shape[1]) == 0
      text_mask = text_mask & (keep | first[None, :])
    text_states = self.text_encoder.compact(batch["text_ids"].long(), text_mask)
    pooled_tokens = text_mask
    if self.text_pool == "utterance":  # `text_encoder.pooling_mask`
      pooled_tokens = utterance_mask(batch["text_ids"].long(), text_mask)
    text_pooled = masked_mean(text_states, pooled_tokens[..., None], 1)
    scorer_text = (
      self.scorer_words(batch["text_ids"].long(), word_mask)
      if self.text_guided
      else torch.zeros(text_mask.shape[0], self.query_dim)
    )

    frames = batch["frames"]
    size = frames.shape[0]
    selected, frame_scores, selected_indices = self.frame_selector(frames, scorer_text, has_video)
    images = ((selected - PIXEL_MEAN) / PIXEL_SCALE).reshape(size * self.top_k, 1, *selected.shape[2:])
    frame_tokens = self.frame_projection(self.backbone(images)).reshape(size, self.top_k, self.width)
    video_vector = frame_tokens.mean(1)

    audio_vector, audio_tokens, audio_token_mask = self.audio_encoder(
      batch["audio"].float(), batch["audio_mask"].bool()
    )
    text_vector = self.text_projection(text_pooled)
    fused, gate, r_v, r_a = self.fusion(video_vector, audio_vector, text_vector, has_video, has_audio)

    key_tokens = torch.cat([fused[:, None], frame_tokens * r_v[:, None, None], audio_tokens * r_a[:, None, None]], 1)
    key_mask = torch.cat(
      [
        torch.ones(size, 1, dtype=torch.bool),
        has_video[:, None].expand(size, self.top_k),
        audio_token_mask & has_audio[:, None],
      ],
      1,
    )
    attended, attention = self.cross_attention(self.text_token_projection(text_states), key_tokens, text_mask, key_mask)
    attended_pooled = masked_mean(attended, text_mask[..., None], 1)
    hidden = self.head_dropout(gelu(self.head_hidden(torch.cat([fused, attended_pooled], -1))))
    logits = {task: getattr(self, f"head_{task}")(hidden) for task in self.tasks}
    explanation = {
      "frame_scores": frame_scores,
      "selected_indices": selected_indices,
      "gate": gate,
      "reliability_video": r_v,
      "reliability_audio": r_a,
      "attention": attention,
    }
    if self.frame_relevance is not None:
      explanation["frame_relevance_logits"] = self.frame_relevance(frame_tokens)
      if self.training:  # as the JAX model: a training aid, skipped at inference
        explanation["frame_evidence_logits"] = self.frame_evidence(frames)
    if self.audio_relevance is not None and self.training:  # as the JAX model: a training aid
      explanation["audio_relevance_logits"] = self.audio_relevance(audio_vector)
    return logits, explanation


def count_parameters(model: nn.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are buffers, as flax's batch_stats)."""
  return sum(p.numel() for p in model.parameters())


def batch_to_torch(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """numpy batch (the contract, host-only `id` dropped) -> torch tensors, sharing memory where possible."""
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k != "id"}


# ----------------------------------------------------------------------------- Flax -> torch weights


def _convert(flax_path: tuple[str, ...], value: np.ndarray, target: torch.Tensor) -> np.ndarray:
  """One Flax leaf -> the layout of the torch tensor it becomes."""
  leaf = flax_path[-1]
  if leaf == "kernel":
    if value.ndim == 4:  # Conv2d (kh, kw, in/groups, out) -> (out, in/groups, kh, kw)
      return value.transpose(3, 2, 0, 1)
    if value.ndim == 3 and target.ndim == 3:  # Conv1d (k, in, out) -> (out, in, k)
      return value.transpose(2, 1, 0)
    if value.ndim == 3 and flax_path[-2] == "out":  # DenseGeneral (H, hd, D) -> Linear (D, H*hd)
      return value.reshape(-1, value.shape[-1]).T
    if value.ndim == 3:  # DenseGeneral (D, H, hd) -> Linear (H*hd, D)
      return value.reshape(value.shape[0], -1).T
    return value.T  # Dense (in, out) -> Linear (out, in)
  return value.reshape(target.shape)  # biases (incl. (H, hd) ones), scales, embeddings, statistics


def load_flax_variables(model: TorchEmotionModel, variables: Mapping[str, Any]) -> None:
  """Copy a Flax {'params', 'batch_stats'} tree of `EmotionModel` into `model`; every tensor must be hit."""
  rename = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean", "var": "running_var"}
  state = model.state_dict()
  filled = set()

  def walk(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (key,))
      return
    name = ".".join(path[:-1] + (rename.get(path[-1], path[-1]),))
    if name not in state:
      raise KeyError(f"Flax variable {'/'.join(path)} has no torch counterpart {name}.")
    value = _convert(path, np.asarray(node, np.float32), state[name])
    if tuple(value.shape) != tuple(state[name].shape):
      raise ValueError(f"{name}: flax {np.shape(node)} -> {value.shape}, torch {tuple(state[name].shape)}.")
    state[name] = torch.from_numpy(np.array(value, np.float32))  # a writable copy
    filled.add(name)

  for collection in ("params", "batch_stats"):
    walk(variables.get(collection, {}), ())
  missing = [k for k in state if k not in filled and not k.endswith("num_batches_tracked")]
  if missing:
    raise KeyError(f"Torch tensors not set from the Flax tree: {missing[:10]}")
  model.load_state_dict(state)
