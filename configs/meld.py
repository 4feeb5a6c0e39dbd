"""MELD from its raw clips (MELD.Raw), the edge model; the standard metric is weighted F1 on emotion.

  MELD_DIR=/path/to/MELD.Raw python launch.py --config configs/meld.py --workdir runs/meld

(or `--config.data.source_dir=/path/to/MELD.Raw`). The first run prepares the clips (data/prepare.py,
builder config 'meld': 12 face-cropped grey frames + 16 kHz audio per utterance) into
$MER_JAX_CACHE/tfds (default ~/.cache/mer_jax/tfds); later runs reuse it. Without MELD, try
configs/demo.py: the same job on a corpus the project generates itself.
"""

import os

from configs import default

MELD_HELP = """MELD's raw clips were not found{where}.

Get MELD.Raw (about 10.9 GB) from the MELD authors (https://github.com/declare-lab/MELD):
  wget https://web.eecs.umich.edu/~mihalcea/downloads/MELD.Raw.tar.gz
  (mirror: https://huggingface.co/datasets/declare-lab/MELD/resolve/main/MELD.Raw.tar.gz)
  tar xzf MELD.Raw.tar.gz && cd MELD.Raw
  tar xzf train.tar.gz && tar xzf dev.tar.gz && tar xzf test.tar.gz
so that the folder holds (the clip folders may also sit one folder down):
  train_sent_emo.csv  dev_sent_emo.csv  test_sent_emo.csv
  train_splits/dia0_utt0.mp4 ...   dev_splits_complete/...   output_repeated_splits_test/...
Then point the run at it: MELD_DIR=/path/to/MELD.Raw, or --config.data.source_dir=/path/to/MELD.Raw.

No MELD? `python launch.py --config configs/demo.py --workdir runs/demo` runs the same pipeline on
the demo corpus, which the project generates itself."""

REQUIRED_CSVS = ("train_sent_emo.csv", "dev_sent_emo.csv")


def _find(source: str, name: str) -> bool:
  """`name` in `source` or one folder down (MELD.Raw's tarballs unpack either way)."""
  if os.path.exists(os.path.join(source, name)):
    return True
  return any(os.path.exists(os.path.join(source, sub, name)) for sub in os.listdir(source)
             if os.path.isdir(os.path.join(source, sub)))


def check_meld_source(source: str) -> None:
  """Raises FileNotFoundError with MELD_HELP unless `source` holds MELD.Raw's CSVs and train clips."""
  if not source:
    raise FileNotFoundError(MELD_HELP.format(where=" (set MELD_DIR or --config.data.source_dir)"))
  if not os.path.isdir(source):
    raise FileNotFoundError(MELD_HELP.format(where=f": {source} is not a folder"))
  missing = [name for name in REQUIRED_CSVS + ("train_splits",) if not _find(source, name)]
  if missing:
    raise FileNotFoundError(MELD_HELP.format(where=f" in {source} (missing: {', '.join(missing)})"))


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
