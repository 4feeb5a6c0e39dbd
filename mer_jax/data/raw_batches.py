"""Prepared TFDS data -> raw batches for the jitted train and eval steps (docs/INPUT_PIPELINE.md).

    batches = train_batches(config, "train", start_step=state.step)   # this process's shard, forever
    for batch in eval_batches(config, "dev"): ...                       # one padded pass

A raw batch is the batch contract (docs/ARCHITECTURE.md) with "waveform" (B, N_max) int16 zero-padded PCM and
"audio_length" (B,) int32 in place of "audio" / "audio_mask": `mer_jax.data.device_features.model_batch` computes
the log-mel (and, in training, the augmentation) on the device, inside the step. The host only reads, resizes
frames to config.data.frame_size, pads audio and looks up tokens, once per example.

config.data.cache decides where examples come from:
  'memory'  the shard is read once into an `example_cache.CachedSplit`; a train batch is a few numpy gathers in
            an order that is a function of the step (`example_cache.TrainOrder`), so resuming at step S starts
            at S with no replay;
  'none'    a tf.data stream from the records (shuffle buffer, repeat); resuming skips the S batches consumed
            before, re-reading (not re-mapping) them: a warning names that cost;
  'auto'    memory when the shard's estimated size fits config.data.cache_max_gb (0: half the host's RAM).
"""

from __future__ import annotations

import collections
import math
import os
import time
from typing import Any, Iterator

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mer_jax import errors
from mer_jax.data import example_cache
from mer_jax.data import features
from mer_jax.data import input_pipeline

CACHE_SETTINGS = ("auto", "memory", "none")
# The prepared features a raw batch is made of (text, speaker, frame times are not decoded).
RAW_FEATURES = ("id", "frames", "audio", "has_video", "has_audio", "labels")
FILL_BATCH = 256  # examples per numpy chunk while a cache fills
CACHE_ENTRIES = 4  # splits kept between calls in one process (a run's train and eval split, tests' runs)

_CACHES: collections.OrderedDict = collections.OrderedDict()


# ----------------------------------------------------------------------------- the tf.data part


def raw_example_fn(config: Any, element_spec: dict):
  """Prepared example -> raw example (no batch axis; graph mode): frames resized to config.data.frame_size,
  audio cropped to max_audio_seconds and zero-padded to N_max int16 with its length, labels per task."""
  data = config.data
  tasks = tuple(data.tasks)
  size = int(data.frame_size)
  max_samples = features.max_audio_samples(float(data.max_audio_seconds), int(data.sample_rate))
  input_pipeline._check_frames(element_spec["frames"], data)
  missing = [task for task in tasks if task not in element_spec["labels"]]
  if missing:
    raise errors.InvalidInput(
      f"Tasks {missing} are not in the prepared labels {sorted(element_spec['labels'])}; "
      "fix config.data.tasks or prepare the data with those label columns."
    )

  def fn(ex):
    frames = input_pipeline.resize_frames(ex["frames"], size)
    audio = tf.cast(ex["audio"][:max_samples], tf.int16)
    length = tf.shape(audio)[0]
    out = {
      "frames": tf.ensure_shape(frames, (data.num_frames, size, size, 1)),
      "waveform": tf.ensure_shape(tf.pad(audio, [[0, max_samples - length]]), (max_samples,)),
      "audio_length": tf.cast(length, tf.int32),
      "has_video": tf.cast(ex["has_video"], tf.bool),
      "has_audio": tf.cast(ex["has_audio"], tf.bool),
      "example_mask": tf.constant(True),
      "id": ex["id"],
    }
    out.update({f"labels/{task}": tf.cast(ex["labels"][task], tf.int32) for task in tasks})
    return out

  return fn


def raw_dataset(
  examples: tf.data.Dataset,
  config: Any,
  token_table: input_pipeline.TokenTable,
  *,
  batch_size: int,
  train: bool,
  num_batches: int | None = None,
) -> tf.data.Dataset:
  """Prepared examples -> raw batches. Train: batches of `batch_size`, remainder dropped (shuffle and repeat are
  the caller's). Eval: one pass padded with example_mask False rows (labels -1), to `num_batches` if given.

  The per-example map is graph-only and cheap (resize, pad); tokens are looked up once per batch.
  """
  ds = examples.map(raw_example_fn(config, examples.element_spec), num_parallel_calls=tf.data.AUTOTUNE)
  if not train:
    padding = tf.data.Dataset.from_tensors(input_pipeline._padding_example(ds.element_spec))
    if num_batches is None:
      ds = ds.concatenate(padding.repeat(batch_size - 1))
    else:
      ds = ds.concatenate(padding.repeat()).take(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)

  def add_tokens(batch):
    ids, mask = token_table.lookup_batch(batch["id"], batch["example_mask"])
    return {**batch, "text_ids": ids, "text_mask": mask}

  return ds.map(add_tokens, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- where examples come from


def host_memory_bytes() -> int:
  """Physical RAM of this host (total, not free: the same answer on a resume, so 'auto' decides alike)."""
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
    return 8 * 2**30


def cache_plan(config: Any, num_examples: int) -> dict:
  """{'mode': 'memory' | 'none', 'bytes': estimated cache size, 'limit': bytes 'auto' allows, 'setting'}."""
  data = config.data
  setting = str(data.get("cache", "auto"))
  if setting not in CACHE_SETTINGS:
    raise errors.InvalidInput(f"config.data.cache={setting!r}; use one of {CACHE_SETTINGS}.")
  max_samples = features.max_audio_samples(float(data.max_audio_seconds), int(data.sample_rate))
  per_example = example_cache.raw_example_bytes(
    int(data.num_frames), int(data.frame_size), max_samples, int(data.max_text_length), len(tuple(data.tasks))
  )
  max_gb = float(data.get("cache_max_gb", 0.0) or 0.0)
  limit = int(max_gb * 1e9) if max_gb > 0 else host_memory_bytes() // 2
  estimate = int(num_examples) * per_example
  memory = setting == "memory" or (setting == "auto" and estimate <= limit)
  return {"mode": "memory" if memory else "none", "bytes": estimate, "limit": limit, "setting": setting}


def _read_examples(builder, shard, config: Any, *, shuffle: bool) -> tf.data.Dataset:
  read_config = tfds.ReadConfig(
    options=input_pipeline._options(), shuffle_seed=int(config.get("seed", 0)), try_autocache=False
  )
  decoders = tfds.decode.PartialDecoding({k: True for k in RAW_FEATURES})
  return builder.as_dataset(split=shard, shuffle_files=shuffle, read_config=read_config, decoders=decoders)


def _cache_key(builder, shard, config: Any) -> tuple:
  data = config.data
  fields = ("num_frames", "frame_size", "sample_rate", "max_audio_seconds", "max_text_length")
  return (
    str(builder.data_dir),
    str(shard),
    tuple(str(data[k]) for k in fields),
    input_pipeline.context_key(data),
    tuple(data.tasks),
  )


def clear_caches() -> None:
  """Drops every split held in memory by this process."""
  _CACHES.clear()


def cached_split(
  config: Any, split: str, *, process_index: int, process_count: int, data_dir: str | None = None, tokenize_fn=None
) -> example_cache.CachedSplit:
  """This process's shard of `split` in memory, read once (one tf.data pass, batched) and kept for later calls."""
  builder = input_pipeline.load_builder(config, data_dir)
  shard = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
  key = _cache_key(builder, shard, config)
  if tokenize_fn is None and key in _CACHES:
    _CACHES.move_to_end(key)
    return _CACHES[key]
  num_examples = int(builder.info.splits[shard].num_examples)
  token_table = input_pipeline.split_token_table(builder, split, config, tokenize_fn)
  start = time.perf_counter()
  ds = raw_dataset(
    _read_examples(builder, shard, config, shuffle=False), config, token_table, batch_size=FILL_BATCH, train=False
  )
  # Padding rows fill the last chunk to FILL_BATCH (a static batch shape); they are dropped here.
  real = (_real_rows(batch) for batch in tfds.as_numpy(ds))
  cache = example_cache.fill_cache(real, num_examples)
  seconds = time.perf_counter() - start
  logging.info(
    "Cached %s (process %d of %d): %d examples, %.1f MB in memory, read in %.1f s (%.0f examples/s).",
    split,
    process_index,
    process_count,
    cache.size,
    cache.nbytes / 1e6,
    seconds,
    cache.size / max(seconds, 1e-9),
  )
  if tokenize_fn is None:
    _CACHES[key] = cache
    while len(_CACHES) > CACHE_ENTRIES:
      _CACHES.popitem(last=False)
  return cache


def _real_rows(batch: dict) -> dict:
  """The batch without its padding rows (only the last chunk of a split has any: the others pass as they are)."""
  mask = batch["example_mask"]
  return batch if mask.all() else {k: v[mask] for k, v in batch.items()}


def _shard_info(config: Any, split: str, data_dir, process_index, process_count) -> tuple:
  index, count = input_pipeline._process(process_index, process_count)
  builder = input_pipeline.load_builder(config, data_dir)
  sizes = [
    int(builder.info.splits[tfds.split_for_jax_process(split, process_index=i, process_count=count)].num_examples)
    for i in range(count)
  ]
  return index, count, builder, sizes


def _log_plan(split: str, plan: dict, num_examples: int, index: int, count: int) -> None:
  logging.info(
    "Input for %s (process %d of %d, %d examples): config.data.cache=%r -> %s (estimated %.1f MB, 'auto' limit %.1f GB).",
    split,
    index,
    count,
    num_examples,
    plan["setting"],
    "in memory" if plan["mode"] == "memory" else "streamed from the records",
    plan["bytes"] / 1e6,
    plan["limit"] / 1e9,
  )


# ----------------------------------------------------------------------------- entry points


def train_batches(
  config: Any,
  split: str,
  *,
  start_step: int = 0,
  data_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict]:
  """This process's raw train batches (per-process batch = config.batch_size / processes), forever, starting
  with the batch of step start_step + 1. In memory the start costs nothing; streamed, it skips start_step
  batches of records (a warning names the cost)."""
  index, count, builder, sizes = _shard_info(config, split, data_dir, process_index, process_count)
  batch_size = input_pipeline.per_process_batch_size(int(config.batch_size), count)
  plan = cache_plan(config, sizes[index])
  _log_plan(split, plan, sizes[index], index, count)
  if plan["mode"] == "memory":
    cache = cached_split(config, split, process_index=index, process_count=count, data_dir=data_dir)
    order = example_cache.TrainOrder(cache.size, batch_size, int(config.get("seed", 0)), index)
    return example_cache.TrainBatches(cache, order, start_batch=start_step)
  shard = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  token_table = input_pipeline.split_token_table(builder, split, config)
  examples = _read_examples(builder, shard, config, shuffle=True)
  seed = int(config.get("seed", 0))
  examples = examples.shuffle(int(config.data.get("shuffle_buffer", 1000)), seed=seed, reshuffle_each_iteration=True)
  examples = examples.repeat()
  if start_step:
    logging.warning(
      "Resuming a streamed input (config.data.cache='none') at step %d re-reads the %d examples consumed "
      "before it (record reading, not the map); an in-memory cache resumes without that cost.",
      start_step,
      start_step * batch_size,
    )
    examples = examples.skip(int(start_step) * batch_size)  # before the map: only reading is replayed
  return iter(tfds.as_numpy(raw_dataset(examples, config, token_table, batch_size=batch_size, train=True)))


def eval_batches(
  config: Any,
  split: str,
  *,
  data_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict]:
  """This process's shard of `split` in order as raw batches of config.eval_batch_size / processes, the last
  padded (example_mask False, labels -1); every process yields as many batches (its largest shard decides)."""
  index, count, builder, sizes = _shard_info(config, split, data_dir, process_index, process_count)
  batch_size = input_pipeline.per_process_batch_size(int(config.get("eval_batch_size", config.batch_size)), count)
  num_batches = math.ceil(max(sizes) / batch_size)
  plan = cache_plan(config, sizes[index])
  if plan["mode"] == "memory":
    cache = cached_split(config, split, process_index=index, process_count=count, data_dir=data_dir)
    return example_cache.ordered_batches(cache, batch_size, num_batches)
  shard = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  token_table = input_pipeline.split_token_table(builder, split, config)
  examples = _read_examples(builder, shard, config, shuffle=False)
  ds = raw_dataset(examples, config, token_table, batch_size=batch_size, train=False, num_batches=num_batches)
  return iter(tfds.as_numpy(ds))
