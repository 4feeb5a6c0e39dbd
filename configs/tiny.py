"""A tiny config for tests: 4 frames of 32x32, K=2, short audio and text, batch 4. Seconds per step on CPU.

python launch.py --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.width = 32
  config.model.top_k = 2
  config.model.scorer.channels = (4, 8, 8)
  config.model.scorer.query_dim = 8
  config.model.scorer.downscale = 1
  config.model.audio.channels = (16, 16)
  config.model.audio.num_segments = 2
  config.model.attention.num_heads = 2
  config.model.text.compact.update(features=32, num_layers=1, num_heads=2, mlp_dim=32, max_length=16)
  config.data.num_frames = 4
  config.data.frame_size = 32
  config.data.max_audio_seconds = 1.0
  config.data.num_mel_bins = 16
  config.data.max_text_length = 16
  config.data.shuffle_buffer = 16
  config.batch_size = 4
  config.eval_batch_size = 4
  # On the demo corpus (2,000 train clips, 500 steps of 4 per epoch) the steps it always had: 3,000, warmup 200,
  # eval and checkpoint every 500. Tests set steps (--config.num_train_steps=2), which win over epochs.
  config.num_epochs = 6.0
  config.warmup_epochs = 0.4
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  return config
