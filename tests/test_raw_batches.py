"""The training input (mer_jax/data/raw_batches.py, example_cache.py) on the synthetic prepared data of
tests/test_input_pipeline.py: raw batches in memory and streamed, the step-indexed train order, resume without
replay, eval padding, and the log-mel on the device against the host pipeline's."""

import jax
import numpy as np
import pytest

from mer_jax.data import device_features
from mer_jax.data import example_cache
from mer_jax.data import features
from mer_jax.data import input_pipeline as ip
from mer_jax.data import raw_batches
from tests.test_input_pipeline import MAX_SECONDS, NUM_TRAIN, NUM_VAL, S, T, L, make_config, write_prepared

N_MAX = features.max_audio_samples(MAX_SECONDS, 16000)


def one_process(**kwargs):
  return dict(process_index=0, process_count=1, **kwargs)


def cfg(cache="memory", **overrides):
  config = make_config(**overrides)
  config.data.cache = cache
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(data_dir, {split: {id: example}}): tests/test_input_pipeline.py's synthetic prepared data."""
  return write_prepared(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(autouse=True)
def fresh_caches():
  raw_batches.clear_caches()
  yield
  raw_batches.clear_caches()


def test_raw_batch_keys_shapes_and_values(prepared):
  data_dir, splits = prepared
  batches = list(raw_batches.eval_batches(cfg(), "validation", data_dir=data_dir, **one_process()))
  expected = {
    "frames": ((4, T, S, S, 1), np.uint8),
    "waveform": ((4, N_MAX), np.int16),
    "audio_length": ((4,), np.int32),
    "text_ids": ((4, L), np.int32),
    "text_mask": ((4, L), np.bool_),
    "labels/emotion": ((4,), np.int32),
    "labels/sentiment": ((4,), np.int32),
    "has_video": ((4,), np.bool_),
    "has_audio": ((4,), np.bool_),
    "example_mask": ((4,), np.bool_),
    "id": ((4,), np.object_),
  }
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for row in np.flatnonzero(batch["example_mask"]):
      ex = splits["validation"][batch["id"][row].decode()]
      n = min(len(ex["audio"]), N_MAX)
      assert batch["audio_length"][row] == n
      np.testing.assert_array_equal(batch["waveform"][row, :n], ex["audio"][:n])
      assert not batch["waveform"][row, n:].any()
      np.testing.assert_array_equal(batch["frames"][row], ex["frames"])
      assert batch["labels/emotion"][row] == ex["labels"]["emotion"]


def test_eval_pads_every_process_to_the_same_batches_and_keeps_each_example_once(prepared):
  data_dir, splits = prepared
  for cache in ("memory", "none"):
    batches = list(raw_batches.eval_batches(cfg(cache), "validation", data_dir=data_dir, **one_process()))
    assert len(batches) == 3  # ceil(11 / 4)
    mask = np.concatenate([b["example_mask"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    assert mask.sum() == NUM_VAL and sorted(i.decode() for i in ids[mask]) == sorted(splits["validation"])
    pad = batches[-1]
    assert np.all(pad["id"][~pad["example_mask"]] == b"") and np.all(pad["labels/emotion"][~pad["example_mask"]] == -1)
    assert not pad["waveform"][~pad["example_mask"]].any() and not pad["text_ids"][~pad["example_mask"]].any()
    shards = [
      list(raw_batches.eval_batches(cfg(cache), "validation", data_dir=data_dir, process_index=p, process_count=2))
      for p in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 3  # 6 and 5 examples, batches of 2
    real = [{i for b in s for i in b["id"][b["example_mask"]]} for s in shards]
    assert not real[0] & real[1] and len(real[0] | real[1]) == NUM_VAL


def test_cache_and_stream_give_the_same_examples(prepared):
  data_dir, _ = prepared
  memory = list(raw_batches.eval_batches(cfg("memory"), "validation", data_dir=data_dir, **one_process()))
  stream = list(raw_batches.eval_batches(cfg("none"), "validation", data_dir=data_dir, **one_process()))
  for a, b in zip(memory, stream, strict=True):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Train: other orders, the same examples (one epoch of the stream against the cache's rows).
  cache = raw_batches.cached_split(cfg(), "train", data_dir=data_dir, **one_process())
  by_id = {i: r for r, i in enumerate(cache.arrays["id"])}
  stream = raw_batches.train_batches(cfg("none"), "train", data_dir=data_dir, **one_process())
  seen = set()
  for _ in range(NUM_TRAIN // 4):
    batch = next(stream)
    for row, example_id in enumerate(batch["id"]):
      seen.add(example_id)
      for key in ("frames", "waveform", "audio_length", "text_ids", "labels/sentiment"):
        np.testing.assert_array_equal(batch[key][row], cache.arrays[key][by_id[example_id]], err_msg=key)
  assert len(seen) == 4 * (NUM_TRAIN // 4)


def test_train_order_covers_each_epoch_and_depends_on_the_seed():
  order = example_cache.TrainOrder(size=10, batch_size=4, seed=0)
  positions = np.concatenate([order.rows(b) for b in range(5)])  # 20 positions: two epochs exactly
  assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:]) == list(range(10))
  assert not np.array_equal(positions[:10], positions[10:])  # a fresh order each epoch
  np.testing.assert_array_equal(example_cache.TrainOrder(10, 4, seed=0).rows(3), order.rows(3))
  assert not np.array_equal(example_cache.TrainOrder(10, 4, seed=1).rows(0), order.rows(0))
  assert not np.array_equal(example_cache.TrainOrder(10, 4, seed=0, process_index=1).rows(0), order.rows(0))
  small = example_cache.TrainOrder(size=3, batch_size=8, seed=0)  # a batch spanning several epochs
  rows = np.concatenate([small.rows(0), small.rows(1)])
  assert all(sorted(rows[i : i + 3]) == [0, 1, 2] for i in range(0, 15, 3))


@pytest.mark.parametrize("start", [3, 10_000])
def test_resume_costs_no_replay(prepared, start):
  """The iterator for step N gathers exactly one batch before yielding it, whatever N, and that batch is the
  N-th batch of a straight iterator."""
  data_dir, _ = prepared
  config = cfg()
  cache = raw_batches.cached_split(config, "train", data_dir=data_dir, **one_process())
  before = cache.rows_gathered
  resumed = raw_batches.train_batches(config, "train", start_step=start, data_dir=data_dir, **one_process())
  first = next(resumed)
  assert cache.rows_gathered - before == 4  # one batch, not start + 1 of them
  order = example_cache.TrainOrder(NUM_TRAIN, 4, seed=0)
  straight = example_cache.TrainBatches(example_cache.CachedSplit(dict(cache.arrays)), order)
  if start < 100:  # the straight iterator itself: steps 1 .. start + 1
    for _ in range(start):
      next(straight)
  else:  # the order is a function of the batch index: the same rows as the straight iterator's batch `start`
    straight.position = start
  expected = next(straight)
  for key in expected:
    np.testing.assert_array_equal(first[key], expected[key], err_msg=key)


def test_streamed_resume_continues_the_straight_stream(prepared):
  """cache 'none': the iterator for step 3 yields the straight stream's 4th batch (it skips, re-reading records)."""
  data_dir, _ = prepared
  straight = raw_batches.train_batches(cfg("none"), "train", data_dir=data_dir, **one_process())
  expected = [next(straight) for _ in range(4)][-1]
  resumed = next(raw_batches.train_batches(cfg("none"), "train", start_step=3, data_dir=data_dir, **one_process()))
  for key in expected:
    np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


def test_prefetcher_keeps_order_stops_and_raises_where_the_source_failed():
  assert list(example_cache.Prefetcher(iter(range(7)), lambda x: x * 10)) == [0, 10, 20, 30, 40, 50, 60]

  def failing():
    yield 1
    raise RuntimeError("broken record")

  prefetcher = example_cache.Prefetcher(failing())
  assert next(prefetcher) == 1
  with pytest.raises(RuntimeError, match="broken record"):
    next(prefetcher)
  endless = example_cache.Prefetcher(iter(lambda: 1, None), depth=2)
  assert next(endless) == 1
  endless.close()
  assert not endless._thread.is_alive()


def test_cache_plan_follows_the_setting_and_the_limit():
  config = cfg("auto")
  config.data.cache_max_gb = 1e-6  # 1 kB: nothing fits
  plan = raw_batches.cache_plan(config, 10)
  assert plan["mode"] == "none" and plan["bytes"] > plan["limit"] == 1000
  config.data.cache_max_gb = 1.0
  assert raw_batches.cache_plan(config, 10)["mode"] == "memory"
  config.data.cache = "memory"
  config.data.cache_max_gb = 1e-6
  assert raw_batches.cache_plan(config, 10)["mode"] == "memory"
  config.data.cache = "disk"
  with pytest.raises(ValueError, match="config.data.cache"):
    raw_batches.cache_plan(config, 10)


def test_device_batch_matches_the_host_pipeline(prepared):
  """Raw batch + device_features.model_batch (no augmentation) = the host pipeline's contract batch."""
  data_dir, _ = prepared
  config = cfg()
  host = list(ip.as_numpy(ip.make_dataset(config, "validation", train=False, data_dir=data_dir, **one_process())))
  raw = list(raw_batches.eval_batches(config, "validation", data_dir=data_dir, **one_process()))
  to_model = jax.jit(lambda batch: device_features.model_batch(batch, config.data))
  for h, r in zip(host, raw, strict=True):
    np.testing.assert_array_equal(h["id"], r["id"])
    out = jax.device_get(to_model(ip.model_inputs(r)))
    assert set(out) == set(ip.model_inputs(h))
    for key, value in out.items():
      if key == "audio":
        np.testing.assert_allclose(value, h[key], rtol=1e-5, atol=2e-4)
      else:
        np.testing.assert_array_equal(value, h[key], err_msg=key)


def test_new_and_old_record_formats_read_the_same(tmp_path):
  """meld_csv.example_features (raw bytes) and the zlib + int64 format of data prepared before read alike."""
  import dataclasses

  import tensorflow_datasets as tfds

  from mer_jax.data import csv_format, meld_csv
  from tests.test_input_pipeline import make_examples

  fmt = dataclasses.replace(csv_format.FORMATS["meld"], num_frames=T, frame_size=S)
  new = meld_csv.example_features(fmt)
  old = {k: new[k] for k in new.keys()}
  old["frames"] = tfds.features.Tensor(shape=(T, S, S, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)
  old["audio"] = tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=16000)
  examples = [(ex["id"], ex) for ex in make_examples("validation", 6, 4)]
  read = []
  for name, features_dict in (("new_format", new), ("old_format", tfds.features.FeaturesDict(old))):
    tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version="1.0.0",
      config="demo",
      features=features_dict,
      data_dir=str(tmp_path),
      split_datasets={"validation": examples},
    )
    config = cfg(builder=name)
    read.append(list(raw_batches.eval_batches(config, "validation", data_dir=str(tmp_path), **one_process())))
  # The new format stores frames and audio as one bytes value each (not a value per pixel or sample).
  assert new["frames"].get_serialized_info().shape == new["audio"].get_serialized_info().shape == ()
  for a, b in zip(*read, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
