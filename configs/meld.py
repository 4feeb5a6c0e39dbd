"""MELD from its raw clips (MELD.Raw), the edge model; the standard metric is weighted F1 on emotion.

  MELD_DIR=/path/to/MELD.Raw python launch.py --config configs/meld.py --workdir runs/meld

(or `--config.data.source_dir=/path/to/MELD.Raw`). The first run prepares the clips (data/prepare.py,
builder config 'meld': 12 face-cropped grey frames + 16 kHz audio per utterance) into
$MER_JAX_CACHE/tfds (default ~/.cache/mer_jax/tfds); later runs reuse it. Without MELD, try
configs/demo.py: the same job on a corpus the project generates itself. launch.py checks the folder first
(data/sources.py: check_meld_source), and says how to get MELD.Raw when it is not there.

On GPUs or a TPU slice, the accelerator recipe (docs/TPU.md):

  python launch.py --config configs/meld.py:accelerator --workdir gs://BUCKET/runs/meld \\
      --config.data.data_dir=gs://BUCKET/tfds

the same epochs in global batches of 512 with bfloat16 compute and the learning rates scaled by the square root of
the batch ratio (`accelerator`).

The default data_dir ($MER_JAX_CACHE/tfds) is on this machine's disk: right for one machine, wrong for a pod or any
job of several hosts, where process 0 would prepare into its own disk and the others find nothing. There, pass
`--config.data.data_dir=gs://BUCKET/tfds` (and a gs:// --workdir): every host reads the same prepared data, which
process 0 prepares once from MELD.Raw on its local disk (clips are decoded from local files; MELD_DIR must be
local to process 0's host).
"""

import os

from configs import default

# The accelerator recipe's global batch: 16 per chip on a 32-chip slice, 64 per chip on 8, one batch on one GPU.
ACCELERATOR_BATCH_SIZE = 512


def get_config(variant: str = ""):
  """The CPU recipe (global batch 32); `variant` 'accelerator' (configs/meld.py:accelerator) for GPUs and TPUs."""
  if variant not in ("", "accelerator"):
    raise ValueError(f"configs/meld.py:{variant}: unknown variant; use configs/meld.py or configs/meld.py:accelerator.")
  config = default.get_config()
  cache = os.path.abspath(os.path.expanduser(os.environ.get("MER_JAX_CACHE", "~/.cache/mer_jax")))
  config.data.builder_config = "meld"
  config.data.source_dir = os.environ.get("MELD_DIR", "")
  config.data.data_dir = os.path.join(cache, "tfds")
  config.data.prepare = "meld"  # launch.py: prepare MELD.Raw when the prepared data is missing
  # 9,989 train utterances: 313 steps of 32 per epoch. 31.95 epochs = 10,000 steps, warmup 500 (5% of them), eval
  # and checkpoint every 1,000 (run_config.resolve_steps).
  config.num_epochs = 31.95
  config.warmup_epochs = 1.597
  config.label_smoothing = 0.1
  config.model.audio_relevance = True  # the audio-only training head (the demo: 0.44 -> 0.64 accuracy without video)
  config.log_every_steps = 100
  config.eval_every_epochs = 3.195
  config.checkpoint_every_epochs = 3.195
  if variant == "accelerator":
    accelerator(config)
  return config


def accelerator(config) -> None:
  """The CPU recipe for GPUs and TPUs, in place: global batch ACCELERATOR_BATCH_SIZE, bfloat16 compute (parameters
  and optimizer state stay float32), the same epochs (20 steps per epoch instead of 313: 639 steps), the same
  warmup of 1.6 epochs (5% of training), and the peak learning rates times sqrt(512 / 32) = 4.

  Square-root scaling is the rule for Adam-type optimizers (Malladi et al., 2022, "On the SDEs and Scaling Rules
  for Adaptive Gradient Algorithms"); linear scaling (x16) is plain SGD's. The scorer's word table (SGD with
  momentum) takes the same factor, a compromise between the two. Not yet trained on MELD at this batch: compare
  the first evaluations with a CPU run's."""
  scale = (ACCELERATOR_BATCH_SIZE / config.batch_size) ** 0.5
  config.batch_size = config.eval_batch_size = ACCELERATOR_BATCH_SIZE
  config.model.dtype = "bfloat16"
  config.learning_rate *= scale
  config.scorer_word_learning_rate *= scale
  # 639 steps in all: a line every 10 keeps ~64 progress lines, as the CPU recipe's 100.
  config.log_every_steps = 10
  # Streamed input only (config.data.cache 'none'; in memory every epoch is a full permutation): shuffle over 8
  # batches' worth of examples, not 2.
  config.data.shuffle_buffer = 4096
