"""Prepared TFDS data -> batches of the batch contract (docs/ARCHITECTURE.md), with tf.data.

    ds = make_dataset(config, "train", train=True)      # this process's shard, shuffled, repeated
    for batch in as_numpy(ds): ...                       # dict of numpy arrays

Text is tokenised once per split (one batched call to the HF tokenizer over every utterance, with its
dialogue context) and looked up by example id inside the tf.data map (StaticHashTable + gather), so the
map never calls Python. Log-mel is computed in the map with tf.signal (`mer_jax.data.features`), the same
code prediction runs on a raw clip. `dataset_from_examples` runs the same map on any tf.data of
prepared examples (unit tests, prediction).
"""

import collections
import functools
import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from mer_jax import errors
from mer_jax.data import csv_format
from mer_jax.data import features
from mer_jax.data import labels as labels_lib

AUTOTUNE = tf.data.AUTOTUNE
META_KEYS = ("id", "text", "speaker", "dialogue_id", "utterance_id")

# (texts, contexts or None, max_length) -> (ids (N, L) int32, mask (N, L) bool).
TokenizeFn = Callable[[list, Any, int], tuple]

# Augmentation strengths: mild, so a clip still looks and sounds like itself.
BRIGHTNESS_DELTA = 16.0  # grey levels, +-
CONTRAST_RANGE = (0.85, 1.15)  # around the clip's mean grey level
GAIN_DB_RANGE = (-6.0, 6.0)
NOISE_SNR_DB_RANGE = (25.0, 45.0)


# ----------------------------------------------------------------------------- text and context


def dialogue_contexts(
  speakers: Sequence[str],
  texts: Sequence[str],
  dialogue_ids: Sequence[int],
  utterance_ids: Sequence[int],
  turns: int,
  future_turns: int = 0,
) -> list:
  """Context of each utterance: up to `turns` earlier and `future_turns` later utterances of its dialogue, nearest
  first, alternating (previous 1, next 1, previous 2, next 2, ...) so that truncating the context drops the
  farthest turns whichever side they are on.

  "Earlier" and "later" follow utterance_id order (ids may have gaps). Each line is "Speaker: text" ("text" when
  the speaker is ''). Returns one str per utterance, or None where the dialogue has no such other utterance.
  Later turns suit evaluation of whole dialogues (as ERC benchmarks do); a live stream has only earlier ones.
  """
  if turns <= 0 and future_turns <= 0:
    return [None] * len(texts)
  by_dialogue: dict = {}
  for row, (dia, utt) in enumerate(zip(dialogue_ids, utterance_ids)):
    by_dialogue.setdefault(int(dia), []).append((int(utt), row))
  contexts: list = [None] * len(texts)
  for rows in by_dialogue.values():
    rows.sort()
    lines = [f"{speakers[r]}: {texts[r]}" if speakers[r] else texts[r] for _, r in rows]
    for pos, (_, row) in enumerate(rows):
      previous = lines[max(0, pos - max(turns, 0)) : pos][::-1]
      following = lines[pos + 1 : pos + 1 + max(future_turns, 0)]
      nearest_first = [line for pair in itertools.zip_longest(previous, following) for line in pair if line]
      contexts[row] = "\n".join(nearest_first) if nearest_first else None
  return contexts


def context_key(data_config: Any) -> tuple:
  """What of config.data decides an utterance's context: (turns, future_turns), for caches keyed on it."""
  return int(data_config.get("context_turns", 0)), int(data_config.get("context_future_turns", 0))


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
  from mer_jax.data import tokenizer as tokenizer_lib  # imported late: features-only users need no HF

  return tokenizer_lib.load_tokenizer()


def default_tokenize_fn(texts: list, contexts, max_length: int) -> tuple:
  """The project tokenizer (`mer_jax.data.tokenizer`): (ids (N, L) int32, mask (N, L) bool)."""
  from mer_jax.data import tokenizer as tokenizer_lib

  return tokenizer_lib.tokenize(_hf_tokenizer(), texts, max_length, contexts=contexts)


class TokenTable:
  """Token ids of every example of a split, looked up by example id in graph mode."""

  def __init__(self, example_ids: Sequence[bytes], token_ids: np.ndarray, token_mask: np.ndarray):
    keys = [k if isinstance(k, bytes) else str(k).encode() for k in example_ids]
    if len(set(keys)) != len(keys):
      dup = sorted(k for k, n in collections.Counter(keys).items() if n > 1)[:5]
      raise ValueError(
        f"Example ids must be unique within a split; duplicated: {dup}. "
        "Check the split's CSV for repeated Dialogue_ID/Utterance_ID pairs."
      )
    self.size = len(keys)
    self.max_length = int(token_ids.shape[1])
    self._ids = tf.constant(np.asarray(token_ids, np.int32).reshape(-1, self.max_length))
    self._mask = tf.constant(np.asarray(token_mask, bool).reshape(-1, self.max_length))
    self._table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string), tf.range(self.size, dtype=tf.int64)),
      default_value=-1,
    )

  def lookup(self, example_id: tf.Tensor) -> tuple:
    """() string -> (ids (L,) int32, mask (L,) bool)."""
    row = self._table.lookup(example_id)
    tf.debugging.assert_non_negative(
      row, message="example id missing from the token table (was it built from this split?)"
    )
    return tf.gather(self._ids, row), tf.gather(self._mask, row)

  def lookup_batch(self, example_ids: tf.Tensor, example_mask: tf.Tensor) -> tuple:
    """(B,) string ids, (B,) bool -> (ids (B, L) int32, mask (B, L) bool); padding rows (example_mask False,
    whose ids are in no table) get zeros."""
    rows = self._table.lookup(example_ids)
    tf.debugging.assert_equal(
      tf.logical_or(rows >= 0, tf.logical_not(example_mask)),
      True,
      message="example id missing from the token table (was it built from this split?)",
    )
    keep = rows >= 0
    rows = tf.maximum(rows, 0)
    ids = tf.where(keep[:, None], tf.gather(self._ids, rows), 0)
    return ids, tf.logical_and(keep[:, None], tf.gather(self._mask, rows))


def build_token_table(meta: dict, data_config: Any, tokenize_fn: TokenizeFn | None = None) -> TokenTable:
  """`meta`: numpy arrays per META_KEYS for a whole split -> TokenTable (one tokenizer call)."""
  decode = lambda values: [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
  texts, speakers = decode(meta["text"]), decode(meta["speaker"])
  turns, future_turns = context_key(data_config)
  contexts = None
  if turns > 0 or future_turns > 0:
    contexts = dialogue_contexts(speakers, texts, meta["dialogue_id"], meta["utterance_id"], turns, future_turns)
  max_length = int(data_config.max_text_length)
  ids, mask = (tokenize_fn or default_tokenize_fn)(texts, contexts, max_length)
  return TokenTable(list(meta["id"]), np.asarray(ids), np.asarray(mask))


def read_meta(examples: tf.data.Dataset) -> dict:
  """One pass over `examples` (dicts with META_KEYS) -> numpy arrays per key."""
  chunks: dict = {k: [] for k in META_KEYS}
  for batch in examples.map(lambda ex: {k: ex[k] for k in META_KEYS}).batch(4096).as_numpy_iterator():
    for k in META_KEYS:
      chunks[k].append(batch[k])
  return {k: (np.concatenate(v) if v else np.zeros((0,), object)) for k, v in chunks.items()}


# ----------------------------------------------------------------------------- per-example map


def noise_bank(num_samples: int, seed: int = 0) -> np.ndarray:
  """(num_samples,) float32 white Gaussian noise, unit variance, the same for a given seed.

  Augmentation reads each clip's noise from this bank at a random offset, as noise corpora are used,
  instead of drawing fresh normals, which took a large share of the train pipeline's CPU time
  (docs/PERFORMANCE.md).
  """
  return np.random.default_rng(seed).standard_normal(num_samples, dtype=np.float32)


def augment(frames: tf.Tensor, waveform: tf.Tensor, has_video: tf.Tensor, seed: tf.Tensor, noise: tf.Tensor) -> tuple:
  """Mild, stateless (seeded) jitter: frames (T, S, S, 1) uint8, waveform (N,) float32, seed (2,) int64,
  noise (at least N,) float32 unit-variance white noise (`noise_bank`).

  Frames: one brightness shift and contrast factor for the whole clip. Audio: gain and white noise at
  a random SNR, before log-mel; the noise is a stretch of `noise` at a random offset, with a random sign.
  Frames of a clip without video stay zeros.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  uniform = lambda i, lo, hi: tf.random.stateless_uniform([], seeds[i], lo, hi)
  grey = tf.cast(frames, tf.float32)
  mean = tf.reduce_mean(grey)
  # (grey - mean) * contrast + mean + brightness, folded into one multiply and one add over the pixels;
  # without video the map is the identity, so the all-zero frames stay zeros.
  contrast = tf.where(has_video, uniform(0, *CONTRAST_RANGE), 1.0)
  offset = tf.where(has_video, mean * (1.0 - contrast) + uniform(1, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0.0)
  frames = tf.cast(tf.clip_by_value(tf.round(grey * contrast + offset), 0.0, 255.0), tf.uint8)

  waveform = waveform * tf.pow(10.0, uniform(2, *GAIN_DB_RANGE) / 20.0)
  length = tf.size(waveform)
  num_samples = tf.maximum(tf.cast(length, tf.float32), 1.0)  # empty audio: no NaN
  # No epsilon: a silent clip stays exactly silent, as it is at test time (an epsilon of 1e-12 under the root added
  # noise of ~1e-7, which lifted its log-mel from -13.8 to ~-13.1: trained silence then no longer looked like
  # evaluated silence, and the audio reliability head's answer on silent clips flipped between runs).
  rms = tf.sqrt(tf.reduce_sum(tf.square(waveform)) / num_samples)
  noise_std = rms * tf.pow(10.0, -uniform(3, *NOISE_SNR_DB_RANGE) / 20.0)
  tf.debugging.assert_less_equal(length, tf.size(noise), message="noise bank shorter than the waveform")
  start, sign = tf.unstack(tf.random.stateless_uniform([2], seeds[4], 0, 2**30, tf.int32))
  start = start % (tf.size(noise) - length + 1)
  noise_std = tf.where(sign % 2 == 0, noise_std, -noise_std)
  return frames, tf.clip_by_value(waveform + noise[start : start + length] * noise_std, -1.0, 1.0)


def _check_frames(frames: tf.Tensor, data_config: Any) -> None:
  """Prepared frames must have config.data.num_frames frames of at least config.data.frame_size pixels."""
  want = (int(data_config.num_frames), int(data_config.frame_size), int(data_config.frame_size), 1)
  have = tuple(frames.shape)
  if (
    len(have) != 4
    or (have[0] is not None and have[0] != want[0])
    or have[3] != 1
    or any(h is not None and h < want[1] for h in have[1:3])
  ):
    raise ValueError(
      f"Prepared frames have shape {have} but config.data asks for {want} "
      "(num_frames, frame_size; smaller frames are resized from larger prepared ones). "
      "Prepare the data again with these settings (python -m data.prepare) or set "
      "config.data to match the prepared data."
    )


def resize_frames(frames: tf.Tensor, frame_size: int) -> tf.Tensor:
  """(T, S, S, 1) uint8 -> (T, frame_size, frame_size, 1) uint8 (area averaging), a no-op at the same size.

  Lets data prepared once at 112 px train a model on smaller frames (e.g. the 2-core demo at 64 px).
  """
  if frames.shape[1] == frame_size and frames.shape[2] == frame_size:
    return frames
  resized = tf.image.resize(tf.cast(frames, tf.float32), (frame_size, frame_size), method="area")
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def make_example_fn(config: Any, token_table: TokenTable, *, train: bool, process_index: int = 0) -> Callable:
  """(index () int64, prepared example) -> contract example (no batch axis). Graph-mode only."""
  data = config.data
  tasks = tuple(data.tasks)
  do_augment = bool(train and data.get("augment", False))
  base_seed = tf.constant([int(config.get("seed", 0)), int(process_index)], tf.int64)
  max_samples = features.max_audio_samples(float(data.max_audio_seconds), int(data.sample_rate))
  # Twice the longest waveform, at least 2**20 samples (65 s at 16 kHz, 4 MiB): many distinct stretches.
  noise = tf.constant(noise_bank(max(2**20, 2 * max_samples))) if do_augment else None

  def example_fn(index, ex):
    frames = ex["frames"]
    _check_frames(frames, data)
    frames = resize_frames(frames, int(data.frame_size))
    frames = tf.ensure_shape(frames, (data.num_frames, data.frame_size, data.frame_size, 1))
    has_video = tf.cast(ex["has_video"], tf.bool)
    # Cropped here, not only in waveform_features: samples past the crop would never be seen, so they
    # are not augmented (and the noise level follows the audio that the model hears).
    waveform = features.pcm16_to_float(ex["audio"][:max_samples])
    if do_augment:
      seed = tf.random.experimental.stateless_fold_in(base_seed, index)
      frames, waveform = augment(frames, waveform, has_video, seed, noise)
    log_mel, audio_mask = features.waveform_features(waveform, data)
    text_ids, text_mask = token_table.lookup(ex["id"])
    out = {
      "frames": tf.cast(frames, tf.uint8),
      "audio": log_mel,
      "audio_mask": audio_mask,
      "text_ids": text_ids,
      "text_mask": text_mask,
      "has_video": has_video,
      "has_audio": tf.cast(ex["has_audio"], tf.bool),
      "example_mask": tf.constant(True),
      "id": ex["id"],
    }
    for task in tasks:
      if task not in ex["labels"]:
        raise KeyError(
          f"Task {task!r} is not in the prepared labels {sorted(ex['labels'])}; "
          "fix config.data.tasks or prepare the data with that label column."
        )
      out[f"labels/{task}"] = tf.cast(ex["labels"][task], tf.int32)
    return out

  return example_fn


# ----------------------------------------------------------------------------- batching


def _padding_example(element_spec: dict) -> dict:
  """All-zero example with example_mask False and labels -1 (never counted by any metric)."""
  pad = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
  for k in pad:
    if k.startswith("labels/"):
      pad[k] = -tf.ones(element_spec[k].shape, tf.int32)
  pad["example_mask"] = tf.constant(False)
  return pad


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # same seed -> same batches, whatever the thread timing
  return options


def dataset_from_examples(
  examples: tf.data.Dataset,
  config: Any,
  *,
  train: bool,
  batch_size: int,
  token_table: TokenTable | None = None,
  tokenize_fn: TokenizeFn | None = None,
  num_epochs: int | None = None,
  num_batches: int | None = None,
  process_index: int = 0,
) -> tf.data.Dataset:
  """Prepared examples -> batches of the contract, `batch_size` rows each.

  Train: shuffle (config.seed), repeat (`num_epochs`, None = forever), augment, drop the remainder.
  Eval: one pass, the last batch padded with example_mask=False rows; with `num_batches` the stream is
  padded to exactly that many batches (so every process runs the same number of eval steps).
  `token_table` defaults to one built from `examples` itself (one extra pass over its text).
  """
  if token_table is None:
    token_table = build_token_table(read_meta(examples), config.data, tokenize_fn)
  examples = examples.with_options(_options())
  if train:
    seed = int(config.get("seed", 0))
    examples = examples.shuffle(int(config.data.get("shuffle_buffer", 1000)), seed=seed, reshuffle_each_iteration=True)
    examples = examples.repeat(num_epochs)
  # The running index seeds the augmentation of each element, so jitter is reproducible per seed.
  ds = examples.enumerate().map(
    make_example_fn(config, token_table, train=train, process_index=process_index),
    num_parallel_calls=AUTOTUNE,
    deterministic=True,
  )
  if train:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    padding = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec))
    if num_batches is None:  # n + (B - 1) rows -> exactly ceil(n / B) full batches
      ds = ds.concatenate(padding.repeat(batch_size - 1)).batch(batch_size, drop_remainder=True)
    else:
      ds = ds.concatenate(padding.repeat()).take(num_batches * batch_size)
      ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(AUTOTUNE)


# ----------------------------------------------------------------------------- TFDS entry points


def _process(process_index: int | None, process_count: int | None) -> tuple:
  import jax  # here, not at the top: prediction on an ONNX/TFLite file resizes frames without JAX

  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count}).")
  return index, count


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
      f"Global batch size {global_batch_size} is not divisible by the "
      f"{process_count} processes; pick a multiple of {process_count}."
    )
  return global_batch_size // process_count


def load_builder(config: Any, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The prepared dataset, read from its files (no need to import the builder class in data/)."""
  data = config.data
  data_dir = data_dir or data.get("data_dir") or None
  name = f"{data.builder}/{data.builder_config}" if data.get("builder_config") else data.builder
  try:
    return read_only_builder.builder_from_files(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends: say what to run
    raise FileNotFoundError(
      f"No prepared dataset {name!r} under data_dir={data_dir!r}. Prepare it first with "
      "`python -m data.prepare` (see data/prepare.py), or point config.data.data_dir at it."
    ) from e


_TOKEN_TABLES: dict = {}


def split_token_table(
  builder: tfds.core.DatasetBuilder, split: str, config: Any, tokenize_fn: TokenizeFn | None = None
) -> TokenTable:
  """Token table of a whole split; reads only its text fields (frames and audio are not decoded)."""
  key = (str(builder.data_dir), str(split), int(config.data.max_text_length), context_key(config.data))
  if tokenize_fn is None and key in _TOKEN_TABLES:
    return _TOKEN_TABLES[key]
  meta_ds = builder.as_dataset(
    split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding({k: True for k in META_KEYS})
  )
  table = build_token_table(read_meta(meta_ds), config.data, tokenize_fn)
  if tokenize_fn is None:
    _TOKEN_TABLES[key] = table
  return table


def make_dataset(
  config: Any,
  split: str,
  *,
  train: bool,
  process_index: int | None = None,
  process_count: int | None = None,
  data_dir: str | None = None,
  num_epochs: int | None = None,
  tokenize_fn: TokenizeFn | None = None,
) -> tf.data.Dataset:
  """This process's batches of `split` (dicts per the batch contract, per-process batch size).

  Train uses config.batch_size, eval config.eval_batch_size (both global). Each process reads its own
  slice of the split's files (tfds.split_for_jax_process); eval pads every process to the same number
  of batches. `num_epochs` (train only) defaults to forever.
  """
  index, count = _process(process_index, process_count)
  batch_size = per_process_batch_size(
    int(config.batch_size if train else config.get("eval_batch_size", config.batch_size)), count
  )
  builder = load_builder(config, data_dir)
  token_table = split_token_table(builder, split, config, tokenize_fn)
  shard = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  read_config = tfds.ReadConfig(options=_options(), shuffle_seed=int(config.get("seed", 0)), try_autocache=False)
  examples = builder.as_dataset(split=shard, shuffle_files=train, read_config=read_config)
  num_batches = None
  if not train:  # the largest shard decides how many eval steps every process runs
    shard_sizes = [
      builder.info.splits[tfds.split_for_jax_process(split, process_index=i, process_count=count)].num_examples
      for i in range(count)
    ]
    num_batches = math.ceil(max(shard_sizes) / batch_size)
  return dataset_from_examples(
    examples,
    config,
    train=train,
    batch_size=batch_size,
    token_table=token_table,
    num_epochs=num_epochs if train else 1,
    num_batches=num_batches,
    process_index=index,
  )


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  """Batches as dicts of numpy arrays (`id` stays bytes: keep it on the host)."""
  return iter(tfds.as_numpy(ds))


def batch_iterator(config: Any, split: str, *, train: bool, **kwargs) -> Iterator[dict]:
  """`as_numpy(make_dataset(config, split, train=train, **kwargs))`."""
  return as_numpy(make_dataset(config, split, train=train, **kwargs))


def model_inputs(batch: dict) -> dict:
  """The batch without host-only fields (`id`), ready for jax.device_put."""
  return {k: v for k, v in batch.items() if k != "id"}


def check_prepared_data(builder: tfds.core.DatasetBuilder, config: Any) -> None:
  """Raises InvalidInput when the prepared data was made with other tasks, classes, label columns or source files
  than config.data names (its record: `meld_csv.dataset_metadata`): such data is never reused silently."""
  differences = csv_format.prepared_differences(builder.info.metadata or {}, config.data)
  if differences:
    name = config.data.get("builder_config") or builder.name
    raise errors.InvalidInput(
      f"The prepared data {name!r} in {builder.data_dir} does not match config.data: {'; '.join(differences)}. "
      f"Set --config.data.builder_config to a new name (e.g. '{name}_2') to prepare the data again with these "
      "settings, or set config.data back to what the data was prepared with."
    )


def _task_classes(builder: tfds.core.DatasetBuilder, config: Any, task: str) -> tuple:
  """Class names of `task`: the prepared data's ClassLabel or metadata, else config.data.classes, else labels.py
  (`check_prepared_data` has made sure that the prepared data and config.data agree where both name them)."""
  feature = builder.info.features["labels"][task] if "labels" in builder.info.features else None
  if isinstance(feature, tfds.features.ClassLabel):
    return tuple(feature.names)
  metadata = builder.info.metadata or {}
  for key in ("classes", "task_classes"):
    if task in metadata.get(key, {}):
      return tuple(metadata[key][task])
  from_config = (config.data.get("classes") or {}).get(task)
  if from_config:
    return tuple(labels_lib.label_key(name) for name in from_config)
  if task in labels_lib.TASK_CLASSES:
    return tuple(labels_lib.TASK_CLASSES[task])
  raise errors.InvalidInput(
    f"No class list for task {task!r}: the prepared data's metadata has none; set "
    f"config.data.classes.{task} = (names...) in label-id order."
  )


def dataset_info(config: Any, data_dir: str | None = None) -> dict:
  """What training needs to know about the prepared data.

  Returns {"splits": {split: num_examples}, "classes": {task: class names},
  "num_frames", "frame_size", "audio_shape": (F, M), "max_text_length"}. Raises InvalidInput when the prepared
  data was made with other tasks, classes or source files than config.data names (`check_prepared_data`).
  """
  builder = load_builder(config, data_dir)
  check_prepared_data(builder, config)
  tasks = tuple(config.data.tasks)
  return {
    "splits": {name: int(info.num_examples) for name, info in builder.info.splits.items()},
    "classes": {task: _task_classes(builder, config, task) for task in tasks},
    "num_frames": int(config.data.num_frames),
    "frame_size": int(config.data.frame_size),
    "audio_shape": features.feature_shape(config.data),
    "max_text_length": int(config.data.max_text_length),
  }
