"""Progress bars of the long commands (predict --folder, evaluate, export, report, ablations): tqdm, one set-up.

A bar shows done / total, the rate and the ETA on stderr, where stdout stays free for a command's report or
JSON. It is drawn only when stderr is a terminal: in a log file or a pipe, a bar redrawn with carriage returns
would be noise (training logs its own steps/s and ETA lines through clu). Nested bars (a report inside an
ablation run) go away when done; the outermost one stays as the command's last word on how long it took.
"""

from __future__ import annotations

from collections.abc import Iterable

import tqdm

# Redraw at most once a second: a batch can take milliseconds, and a redraw per batch would cost more.
MIN_SECONDS_BETWEEN_REDRAWS = 1.0


def bar(iterable: Iterable | None = None, *, total: int | None = None, description: str, unit: str = "batch"):
  """A tqdm bar over `iterable` (or one to `update` by hand) on stderr; `total` gives the ETA (None: count only)."""
  return tqdm.tqdm(
    iterable,
    total=total,
    desc=description,
    unit=unit,
    mininterval=MIN_SECONDS_BETWEEN_REDRAWS,
    dynamic_ncols=True,
    disable=None,  # None: drawn only on a terminal
    leave=None,  # None: the outermost bar stays, nested ones go
  )


def dataset_length(dataset) -> int | None:
  """The number of elements of a finite tf.data.Dataset whose length is known (an eval split's batches: the
  pipeline pads it to ceil(num_examples / batch size) from the TFDS split info), else None."""
  length = int(dataset.cardinality())
  return length if length >= 0 else None
