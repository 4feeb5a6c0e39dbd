"""MELD from its raw clips (MELD.Raw), the edge model; the standard metric is weighted F1 on emotion.

  MELD_DIR=/path/to/MELD.Raw python launch.py --config configs/meld.py --workdir runs/meld

(or `--config.data.source_dir=/path/to/MELD.Raw`). The first run prepares the clips (data/prepare.py,
builder config 'meld': 12 face-cropped grey frames + 16 kHz audio per utterance) into
$MER_JAX_CACHE/tfds (default ~/.cache/mer_jax/tfds); later runs reuse it. Without MELD, try
configs/demo.py: the same job on a corpus the project generates itself. launch.py checks the folder first
(data/sources.py: check_meld_source), and says how to get MELD.Raw when it is not there.
"""

import os

from configs import default


def get_config():
  config = default.get_config()
  cache = os.path.abspath(os.path.expanduser(os.environ.get("MER_JAX_CACHE", "~/.cache/mer_jax")))
  config.data.builder_config = "meld"
  config.data.source_dir = os.environ.get("MELD_DIR", "")
  config.data.data_dir = os.path.join(cache, "tfds")
  config.data.prepare = "meld"  # launch.py: prepare MELD.Raw when the prepared data is missing
  # 9,989 train utterances: ~312 steps per epoch at batch 32; ~30 epochs.
  config.num_train_steps = 10000
  config.warmup_steps = 500
  config.label_smoothing = 0.1
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config
