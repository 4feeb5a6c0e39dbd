"""Default config: the edge model (< 10 M parameters) on the demo corpus.

Other configs start from this one and override what differs. Launch:
  python launch.py --config configs/default.py --workdir runs/default
"""

import ml_collections

from mer_jax.data import csv_format
from mer_jax.data import labels


def model_config(size: str = "edge") -> ml_collections.ConfigDict:
  """config.model for 'edge' (compact text encoder) or 'base' (pretrained MiniLM text encoder)."""
  if size not in ("edge", "base"):
    raise ValueError(f"Unknown model size {size!r}; use 'edge' or 'base'.")
  model = ml_collections.ConfigDict()
  model.size = size
  model.dtype = "float32"  # compute dtype; parameters stay float32. 'bfloat16' on GPU/TPU.
  # How backend-sensitive ops are computed (mer_jax/ops): 'auto' picks per backend once per run; 'reference'
  # (plain lax, what export traces), 'xla' (forms tuned for XLA:CPU) or 'cpu_ffi' (those plus C++ kernels).
  model.ops = "auto"
  model.width = 128 if size == "edge" else 256
  model.modalities = ("video", "audio", "text")  # ('text',): text-only model (configs/meld_text.py)
  model.top_k = 4
  model.selection = "topk"  # 'soft' = ablation: softmax-weighted backbone over all T frames
  # tau of the straight-through top-K's soft surrogate. Its gradient (from the task loss, through pixel values)
  # scales as 1/tau and, at tau=1, drowned the frame selection loss's: on the demo the scorer found the key
  # frames after 400 steps at tau=5 and had not by 1,200 at tau=1 (without it at all: 400 steps).
  model.selection_temperature = 5.0
  model.frame_relevance = True  # per-frame heads that train the scorer and backbone (losses.frame_selection_loss)
  # An audio-only head that keeps the audio encoder learning (losses.audio_relevance_loss). Off here so that runs
  # written before it existed (their config.json lacks the field) still load; demo.py and meld.py turn it on.
  model.audio_relevance = False
  model.text_guided_selection = True  # False = ablation: scorer query does not see the text
  model.use_gate = True
  model.use_reliability = True
  model.dropout_rate = 0.1
  model.text_dropout = 0.0  # training: share of clips whose transcript the text encoder does not see (model.py)
  model.scorer = ml_collections.ConfigDict(dict(channels=(8, 16, 32), query_dim=32, downscale=2, vocab_size=30522))
  model.audio = ml_collections.ConfigDict(dict(channels=(32, 64, 96, 128), kernel=5, num_segments=4))
  model.attention = ml_collections.ConfigDict(dict(num_heads=4))
  model.text = ml_collections.ConfigDict()
  model.text.kind = "compact" if size == "edge" else "minilm"
  model.text.pretrained = size == "base"
  # The text vector averages 'all' tokens or the 'utterance' segment only (text_encoder.pooling_mask); 'all' here so
  # that earlier runs' config.json keep their outputs; configs/meld_text.py, with dialogue context, uses 'utterance'.
  model.text.pool = "all"
  model.text.compact = ml_collections.ConfigDict(
    dict(vocab_size=30522, features=128, num_layers=2, num_heads=4, mlp_dim=192, max_length=128)
  )
  # One head per task of config.data.tasks, as many outputs as config.data.classes lists. Derived: training sets it
  # again from config.data when it starts (mer_jax/training/run_config.resolve_tasks), so overriding the tasks or classes is enough.
  model.tasks = ml_collections.ConfigDict(labels.head_sizes(data_config()))
  # The task whose labels train the frame scorer and the frame-relevance heads: config.data.tasks[0], set again by
  # run_config.resolve_tasks (ConfigDicts keep their keys sorted, so model.tasks cannot say which task comes first).
  model.primary_task = data_config().tasks[0]
  return model


def data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.builder = "meld_format"
  # The prepared data's name: data prepared once under a name is reused by every run that names it, so a change
  # of the source layout, tasks or classes below needs a new name (launch.py refuses data prepared otherwise).
  data.builder_config = "demo"
  data.source_dir = ""  # raw MELD-format corpus (CSVs + clip folders)
  data.data_dir = ""  # prepared TFDS data; '' = WORKDIR/../data or the config's default
  # With several processes every host must read the same data_dir: a URL (gs://...) is shared; a local path is
  # refused unless this says it is shared storage (NFS, Filestore, or all processes on one machine).
  data.data_dir_shared = False
  # launch.py prepares missing data: 'demo' (generated), 'meld' (MELD.Raw), 'meld_text' (MELD's CSVs), 'csv' (a
  # corpus of one's own, laid out as below), '' (prepared beforehand). prepare_workers: clip decoders (0: all cores).
  data.prepare = ""
  data.prepare_workers = 0
  data.num_frames = 12
  data.frame_size = 112
  data.sample_rate = 16000
  data.max_audio_seconds = 4.0
  data.num_mel_bins = 64
  data.max_text_length = 64
  data.context_turns = 0  # earlier turns of the dialogue as the text's second segment
  data.context_future_turns = 0  # later turns too (whole-dialogue evaluation, as ERC benchmarks); 0 for live streams
  # The source layout, tasks and classes (docs/OWN_DATA.md): MELD's. csv_files / clip_folders: split -> name in
  # source_dir; clip_pattern: a row's clip ({dialogue_id}, {utterance_id}, {split}); columns: role -> CSV column;
  # tasks: the tasks trained (one head each); classes: task -> class names in label-id order; label_columns: task
  # -> CSV column (default: the task's name); no_label_values: a label cell meaning "no label" (-1).
  data.update(csv_format.config_fields(csv_format.FORMATS["meld"]))
  data.shuffle_buffer = 1000  # streamed input only (cache 'none'); the in-memory order is a full permutation
  data.augment = True  # training: brightness / contrast and gain / noise, on the device inside the step
  # Where training reads examples from (docs/INPUT_PIPELINE.md): 'memory' (the process's shard decoded once and
  # kept: resuming replays nothing), 'none' (streamed from the records; resuming re-reads what was consumed) or
  # 'auto' (memory when the estimated size fits cache_max_gb; 0 = half the host's RAM).
  data.cache = "auto"
  data.cache_max_gb = 0.0
  return data


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config("edge")
  config.data = data_config()
  config.seed = 0
  config.batch_size = 32
  config.eval_batch_size = 64

  # Training (mer_jax/training/train.py). Batch sizes are global: split over every device of every process.
  config.train_split = "train"
  config.eval_split = "dev"
  # Training length in epochs of the train split: training turns them into steps of the global batch
  # (run_config.resolve_steps: ceil(train examples / batch_size) steps per epoch), so a larger batch trains the
  # same epochs in fewer steps. A *_steps field > 0 (warmup: >= 0) is used instead, e.g. --config.num_train_steps=20;
  # -1 = from the epochs. These give the steps tuned on the demo corpus (2,000 train clips, 63 steps of 32 per
  # epoch): 3,000 steps, warmup 200, eval and checkpoint every 500.
  config.num_epochs = 47.62
  config.num_train_steps = -1
  config.stop_after_steps = 0  # > 0: stop (with a checkpoint) at this step; a later run resumes
  config.learning_rate = 1e-3  # peak of linear warmup + cosine decay
  config.warmup_epochs = 3.175
  config.warmup_steps = -1
  config.end_learning_rate_fraction = 0.01
  config.weight_decay = 1e-4  # AdamW, not applied to biases and norm scales
  config.grad_clip_norm = 1.0  # global norm; 0 = no clipping
  config.label_smoothing = 0.0
  config.task_weights = ml_collections.ConfigDict({"emotion": 1.0, "sentiment": 0.5})  # missing: 1.0
  config.class_weights = "none"  # 'none' or 'balanced' (n / (C * n_c) from the train split's labels)
  config.frame_relevance_weight = 1.0  # weight of mer_jax.training.losses.frame_selection_loss; 0 = off
  config.audio_relevance_weight = 1.0  # weight of mer_jax.training.losses.audio_relevance_loss; 0 = off
  # The scorer's word table (topk.WordQuery) learns with SGD + momentum at this peak rate (same schedule).
  config.scorer_word_learning_rate = 10.0
  config.modality_dropout = 0.1  # per example: P(video marked missing) = P(audio marked missing)
  # Per example: P(video corrupted) = P(audio corrupted) while still marked present; the reliability heads learn
  # to notice it with this loss weight (mer_jax/training/modality_corruption.py).
  config.modality_corruption = 0.1
  config.reliability_loss_weight = 1.0
  # Modalities whose rows the step left alone learn r = their own head's confidence in the label (true-class
  # probability, as Corbiere et al. 2019 train a confidence head) instead of r = 1 weighted by it. For video: a
  # clip's frames either show the label or show nothing, and the demo's train split holds broken videos nobody
  # marked, which r = 1 taught the head to trust whatever their weight (modality_corruption.reliability_loss).
  # Audio keeps r = 1: much clean speech is neutral in tone, and the target would call it broken.
  config.reliability_confidence_target = ("video",)
  config.log_every_steps = 50  # in steps: how often the log and TensorBoard show progress
  config.eval_every_epochs = 7.937
  config.eval_every_steps = -1
  config.checkpoint_every_epochs = 7.937
  config.checkpoint_every_steps = -1
  config.keep_checkpoints = 3  # the latest N, plus the best by best_metric
  config.best_metric = "emotion/weighted_f1"  # <task>/<accuracy|weighted_f1|macro_f1> on eval_split
  return config
