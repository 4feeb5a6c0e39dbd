"""MELD text only: the base model (pretrained MiniLM-L6) on MELD's transcripts with dialogue context.

  MELD_DIR=/path/to/meld python launch.py --config configs/meld_text.py --workdir runs/meld_text

Needs only MELD's annotation CSVs (train_sent_emo.csv, dev_sent_emo.csv, in one folder or one folder down): from
$MELD_DIR, or --config.data.source_dir=DIR. launch.py checks the folder first (data/sources.py: check_meld_csvs)
and, when the CSVs are not there, says where to get them and how to point the run at them. The first run prepares them
(data/prepare.py, builder config 'meld_text': text-only examples, has_video = has_audio = False) into
$MER_JAX_CACHE/tfds (default ~/.cache/mer_jax/tfds); later runs reuse it. Each utterance is tokenized with
the `context_turns` earlier and `context_future_turns` later utterances of its dialogue ("Speaker: text", nearest
first) as the second segment; only the context is truncated. The standard metric is weighted F1 over the 7
emotions on dev.

The edge model's text encoder on the same data and recipe (compact encoder, <10 M parameters, the model a phone
runs; its word embeddings start from MiniLM's, projected to its width):

  MELD_DIR=/path/to/meld python launch.py --config configs/meld_text.py:edge --workdir runs/meld_text_edge

Evaluate the trained run on any MELD-format CSV:
  python -m mer_jax.tools.evaluate --workdir runs/meld_text --csv $MELD_DIR/dev_sent_emo.csv
"""

import os

from configs import default


def default_source_dir() -> str:
  """$MELD_DIR (made absolute), else '': launch.py then says to set MELD_DIR or --config.data.source_dir."""
  meld_dir = os.environ.get("MELD_DIR", "")
  return os.path.abspath(os.path.expanduser(meld_dir)) if meld_dir else ""


VARIANTS = ("base", "edge")


def get_config(variant: str = "base"):
  """`variant`: 'base' (MiniLM-L6, the default) or 'edge' (configs/meld_text.py:edge: the compact text encoder)."""
  variant = variant or "base"
  if variant not in VARIANTS:
    raise ValueError(f"configs/meld_text.py:{variant}: unknown variant; use configs/meld_text.py or :edge.")
  config = default.get_config()
  cache = os.path.abspath(os.path.expanduser(os.environ.get("MER_JAX_CACHE", "~/.cache/mer_jax")))
  config.model = default.model_config(variant)
  config.model.text.pool = "utterance"  # the utterance's tokens, which read the context (see the context below)
  if variant == "edge":
    config.model.text.pretrained = True  # token embeddings: MiniLM's on their principal axes (minilm.py)
  # Text-only fast path of EmotionModel: no frame scorer, backbone or audio encoder, which would only
  # see zeros here (they would cost compute and compile time for nothing).
  config.model.modalities = ("text",)
  config.model.frame_relevance = False  # no frames to choose
  config.data.builder_config = "meld_text"
  config.data.source_dir = default_source_dir()
  config.data.data_dir = os.path.join(cache, "tfds")
  config.data.prepare = "meld_text"  # launch.py: prepare the CSVs when the prepared data is missing
  config.data.augment = False  # nothing to jitter: no frames, no audio
  config.data.shuffle_buffer = 10000  # the whole train split (text-only examples are small)
  # Context: the 2 previous and the 2 next turns of the dialogue, nearest first (whole-dialogue evaluation, as ERC
  # benchmarks use; --config.data.context_future_turns=0 for a live stream, which has only earlier turns). The text
  # vector is pooled over the utterance, whose tokens read the context through attention. 64 tokens: with the
  # utterance first and only the context truncated, the farthest turns go first. The step cost grows with the
  # length (2-core CPU, batch 32, MiniLM alone: ~1.2 s at 64, ~1.9 s at 96, ~2.9 s at 128). Measured on dev (seed 0):
  # 2 earlier turns 0.577 (6 epochs, pooled over both segments); + 2 later turns 0.578; + utterance pooling 0.594.
  config.data.context_turns = 2
  config.data.context_future_turns = 2
  config.data.max_text_length = 64
  config.data.tasks = ("emotion", "sentiment")
  config.modality_dropout = 0.0  # no video or audio to drop

  # MiniLM fine-tuning: AdamW, 10% warmup, cosine decay; 9,989 train utterances = 313 steps of 32 per epoch
  # (the last one partly filled). Measured on dev (2-core CPU): 5e-5 for 4 epochs reached weighted F1 0.586 and was
  # still rising; 1e-4 for 6 epochs peaked at the third (0.577), then overfitted (train accuracy 0.90).
  config.batch_size = 32
  config.eval_batch_size = 64
  config.learning_rate = 1e-4
  config.weight_decay = 0.01
  config.label_smoothing = 0.1
  config.task_weights.sentiment = 0.5
  config.class_weights = "none"
  # 4 passes of 312 full batches: 1,248 steps, warmup 125, eval and checkpoint every 312 (once per pass and at the
  # last step), in epochs of 313 steps.
  config.num_epochs = 3.987
  config.warmup_epochs = 0.3987
  config.log_every_steps = 50
  config.eval_every_epochs = 0.9968
  config.checkpoint_every_epochs = 0.9968
  config.keep_checkpoints = 1
  config.best_metric = "emotion/weighted_f1"
  if variant == "edge":
    # A 2-layer encoder trained from (nearly) scratch takes a 10x larger step than fine-tuning MiniLM does.
    config.learning_rate = 1e-3
  return config
