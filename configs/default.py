"""Default config: the edge model (< 10 M parameters) on the demo corpus.

Other configs start from this one and override what differs. Launch:
  python launch.py --config configs/default.py --workdir runs/default
"""

import ml_collections

from mer_jax import labels


def model_config(size: str = "edge") -> ml_collections.ConfigDict:
  """config.model for 'edge' (compact text encoder) or 'base' (pretrained MiniLM text encoder)."""
  if size not in ("edge", "base"):
    raise ValueError(f"Unknown model size {size!r}; use 'edge' or 'base'.")
  model = ml_collections.ConfigDict()
  model.size = size
  model.dtype = "float32"  # compute dtype; parameters stay float32. 'bfloat16' on GPU/TPU.
  model.width = 128 if size == "edge" else 256
  model.top_k = 4
  model.selection = "topk"  # 'soft' = ablation: softmax-weighted backbone over all T frames
  model.selection_temperature = 1.0
  model.text_guided_selection = True  # False = ablation: scorer query does not see the text
  model.use_gate = True
  model.use_reliability = True
  model.dropout_rate = 0.1
  model.scorer = ml_collections.ConfigDict(dict(channels=(8, 16, 32), query_dim=32, downscale=2))
  model.audio = ml_collections.ConfigDict(dict(channels=(32, 64, 96, 128), kernel=5, num_segments=4))
  model.attention = ml_collections.ConfigDict(dict(num_heads=4))
  model.text = ml_collections.ConfigDict()
  model.text.kind = "compact" if size == "edge" else "minilm"
  model.text.pretrained = size == "base"
  model.text.compact = ml_collections.ConfigDict(
      dict(vocab_size=30522, features=128, num_layers=2, num_heads=4, mlp_dim=192, max_length=128))
  model.tasks = ml_collections.ConfigDict({task: len(labels.TASK_CLASSES[task]) for task in ("emotion", "sentiment")})
  return model


def data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.builder = "meld_format"
  data.builder_config = "demo"
  data.source_dir = ""  # raw MELD-format corpus (CSVs + clip folders)
  data.data_dir = ""  # prepared TFDS data; '' = WORKDIR/../data or the config's default
  data.num_frames = 12
  data.frame_size = 112
  data.sample_rate = 16000
  data.max_audio_seconds = 4.0
  data.num_mel_bins = 64
  data.max_text_length = 64
  data.context_turns = 0
  data.tasks = ("emotion", "sentiment")
  data.shuffle_buffer = 1000
  data.augment = True
  return data


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config("edge")
  config.data = data_config()
  config.seed = 0
  config.batch_size = 32
  config.eval_batch_size = 64
  return config
