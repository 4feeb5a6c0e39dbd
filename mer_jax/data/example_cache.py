"""Decoded examples held in memory, the train order computed from the step alone, and a device prefetcher.

The training pipeline (`input_pipeline.train_batches`, docs/INPUT_PIPELINE.md) reads a split's records once
into a `CachedSplit`: per key one numpy array with a leading example axis, already in the raw-batch form that
`mer_jax.data.device_features.model_batch` turns into the batch contract inside the jitted step:

  frames (N, T, S, S, 1) uint8 (resized to config.data.frame_size), waveform (N, N_max) int16 zero-padded,
  audio_length (N,) int32, text_ids (N, L) int32, text_mask (N, L) bool, has_video / has_audio (N,) bool,
  labels/<task> (N,) int32, id (N,) bytes.

A batch is then a handful of numpy fancy-index gathers (no per-example Python). Batch b of training takes
stream positions b*B .. b*B+B-1; position p is row permutation(seed, process, epoch=p // N)[p % N]
(`TrainOrder`), so the iterator for step S starts at S with O(1) work: the checkpoint's step is the
iterator's position and resuming replays nothing.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

# Keys of a raw batch that the device never sees (byte strings stay on the host).
HOST_ONLY_KEYS = ("id",)


def raw_example_bytes(num_frames: int, frame_size: int, max_samples: int, max_text_length: int, num_tasks: int) -> int:
  """Bytes one cached example takes: frames, int16 waveform, tokens (int32 + bool), flags, labels, id (~64 B)."""
  return num_frames * frame_size * frame_size + 2 * max_samples + 5 * max_text_length + 4 + 2 + 4 * num_tasks + 64


class CachedSplit:
  """One process's shard of a split in memory: {key: (N, ...) array} in the raw-batch form (module doc)."""

  def __init__(self, arrays: dict):
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"Cached arrays differ in length: { {k: len(v) for k, v in arrays.items()} }.")
    self.arrays = arrays
    self.size = sizes.pop()
    self.rows_gathered = 0  # rows copied out so far: tests check that a resume gathers nothing extra

  @property
  def nbytes(self) -> int:
    return int(sum(v.nbytes for v in self.arrays.values()))

  def gather(self, rows: np.ndarray) -> dict:
    """(B,) int row indices -> a raw batch {key: (B, ...)}."""
    self.rows_gathered += len(rows)
    return {k: np.take(v, rows, axis=0) for k, v in self.arrays.items()}

  def padded_batch(self, start: int, batch_size: int) -> dict:
    """Rows start .. start+batch_size-1 in order; rows past the end are padding: zeros, example_mask False,
    labels -1, id b'' (never counted by any metric)."""
    rows = np.arange(start, min(start + batch_size, self.size))
    real = len(rows)
    self.rows_gathered += real
    batch = {}
    for key, values in self.arrays.items():
      fill = b"" if values.dtype == object else (-1 if key.startswith("labels/") else 0)
      out = np.full((batch_size,) + values.shape[1:], fill, values.dtype)
      out[:real] = values[rows]
      batch[key] = out
    batch["example_mask"] = np.arange(batch_size) < real
    return batch


def fill_cache(batches: Iterator[dict], num_examples: int | None = None) -> CachedSplit:
  """Concatenates numpy batches {key: (b, ...)} (one pass over a split) into a CachedSplit.

  With `num_examples` (known from the split's metadata) each array is allocated once at its final size and
  filled in place, so the peak memory is the cache plus one batch, not twice the cache.
  """
  arrays: dict = {}
  chunks: dict = collections.defaultdict(list)
  filled = 0
  for batch in batches:
    size = len(next(iter(batch.values())))
    if num_examples is None:
      for key, values in batch.items():
        chunks[key].append(values)
    else:
      if filled + size > num_examples:
        raise ValueError(f"The split has more than the {num_examples} examples its metadata records.")
      for key, values in batch.items():
        if key not in arrays:
          arrays[key] = np.empty((num_examples,) + values.shape[1:], values.dtype)
        arrays[key][filled : filled + size] = values
    filled += size
  if num_examples is None:
    arrays = {key: np.concatenate(values) for key, values in chunks.items()}
  elif filled != num_examples:
    raise ValueError(f"The split has {filled} examples, its metadata records {num_examples}.")
  if not arrays:
    raise ValueError("The split is empty: nothing to cache.")
  return CachedSplit(arrays)


class TrainOrder:
  """Rows of each train batch, a function of the batch index alone.

  Position p of the stream (batch b holds p = b*B .. b*B+B-1) is row permutation(epoch)[p % N] with
  epoch = p // N and permutation(epoch) drawn from numpy's Generator seeded with (seed, process, epoch):
  every row once per epoch, a fresh order each epoch, the same order for the same seed, and no remainder
  dropped (a batch may span two epochs). The two latest permutations are kept (O(N) memory).
  """

  def __init__(self, size: int, batch_size: int, seed: int, process_index: int = 0):
    if size <= 0 or batch_size <= 0:
      raise ValueError(f"TrainOrder needs examples and a batch size (got {size} and {batch_size}).")
    self.size, self.batch_size = int(size), int(batch_size)
    self._seed = (int(seed), int(process_index))
    self._permutations: collections.OrderedDict = collections.OrderedDict()

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      rng = np.random.default_rng([*self._seed, int(epoch)])
      self._permutations[epoch] = rng.permutation(self.size)
      while len(self._permutations) > 2:
        self._permutations.popitem(last=False)
    return self._permutations[epoch]

  def rows(self, batch_index: int) -> np.ndarray:
    """(B,) int64 rows of batch `batch_index` (0-based: the batch of train step batch_index + 1)."""
    positions = int(batch_index) * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.size)
    rows = np.empty(self.batch_size, np.int64)
    for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):  # one or two epochs (more only when N < B)
      here = epochs == epoch
      rows[here] = self.permutation(epoch)[offsets[here]]
    return rows


class TrainBatches:
  """Iterator of raw train batches from `start_batch` on: batch b is cache.gather(order.rows(b)).

  `position` is the index of the next batch: the train step that consumes it is position + 1.
  """

  def __init__(self, cache: CachedSplit, order: TrainOrder, start_batch: int = 0):
    self.cache, self.order, self.position = cache, order, int(start_batch)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.cache.gather(self.order.rows(self.position))
    self.position += 1
    return batch


def ordered_batches(cache: CachedSplit, batch_size: int, num_batches: int | None = None) -> Iterator[dict]:
  """The cached split in order, `batch_size` rows a batch, the last padded (CachedSplit.padded_batch);
  `num_batches` (>= what the split needs) pads with all-padding batches so every process runs as many."""
  needed = math.ceil(cache.size / batch_size)
  total = needed if num_batches is None else int(num_batches)
  if total < needed:
    raise ValueError(f"num_batches={total} is fewer than the {needed} batches the split needs.")
  for index in range(total):
    yield cache.padded_batch(index * batch_size, batch_size)


def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
  """Puts `item` unless `stop` is set first (False then)."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(batches: Iterator[Any], transfer: Callable, out: queue.Queue, stop: threading.Event) -> None:
  """The prefetch thread: ("ok", transfer(batch)) per batch, then ("end", None); ("error", e) on an exception.
  A plain function, so the thread holds no reference to its Prefetcher (which can then be collected)."""
  try:
    for batch in batches:
      if not _put(out, stop, ("ok", transfer(batch))):
        return
  except BaseException as error:  # handed to the consumer, who decides
    _put(out, stop, ("error", error))
    return
  _put(out, stop, ("end", None))


class Prefetcher:
  """Runs `transfer(next(batches))` in a background thread, `depth` results ahead of the consumer.

  Training passes a transfer that makes global device arrays of the numpy batch, so the gathers and the
  host-to-device copy of the next batches overlap the running step. An exception in the thread is raised
  in the consumer at the batch where it happened; `close()` stops the thread (also called when an unfinished
  prefetcher is garbage collected, e.g. after a `break` out of the loop).
  """

  def __init__(self, batches: Iterator[Any], transfer: Callable[[Any], Any] = lambda batch: batch, depth: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=_produce, args=(iter(batches), transfer, self._queue, self._stop), daemon=True, name="prefetch"
    )
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    kind, item = self._queue.get()
    if kind == "ok":
      return item
    self.close()
    if kind == "error":
      raise item
    raise StopIteration

  def close(self) -> None:
    """Stops the thread and drops the batches it made ahead."""
    self._stop.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=5)

  def __del__(self):
    try:
      self.close()
    except Exception:  # at interpreter exit the modules close() uses may be gone already
      pass
