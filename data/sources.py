"""Is the raw data a config asks for there? The checks launch.py runs before preparing, with what to do if not.

    check_meld_source(dir)   # MELD.Raw: the train and dev CSVs and the train clips (configs/meld.py)
    check_meld_csvs(dir)     # MELD's annotation CSVs alone (configs/meld_text.py)

    check_csv_source(dir, fmt, splits)   # a corpus of one's own: the CSVs config.data names (data.prepare 'csv')

Each raises errors.PathNotFound (a FileNotFoundError) with the way to get the data and to point the run at it. The
files may sit in the folder or one folder down, as MELD.Raw's tarballs unpack.
"""

from __future__ import annotations

import os

from mer_jax import errors

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

MELD_TEXT_HELP = """MELD's annotation CSVs were not found{where}.

configs/meld_text.py needs train_sent_emo.csv and dev_sent_emo.csv (MELD's CSVs, from
https://github.com/declare-lab/MELD/tree/master/data/MELD or MELD.Raw.tar.gz) in one folder
(or one folder down). Point the run at it: MELD_DIR=/path/to/folder, or
--config.data.source_dir=/path/to/folder."""

REQUIRED_CSVS = ("train_sent_emo.csv", "dev_sent_emo.csv")
NOT_SET = " (set MELD_DIR or --config.data.source_dir)"


def _find(source: str, name: str, kind=os.path.exists) -> bool:
  """`name` in `source` or one folder down, tested with `kind` (os.path.exists, os.path.isfile, ...)."""
  if kind(os.path.join(source, name)):
    return True
  return any(
    kind(os.path.join(source, sub, name))
    for sub in sorted(os.listdir(source))
    if os.path.isdir(os.path.join(source, sub))
  )


def check_meld_source(source: str) -> None:
  """Raises PathNotFound with MELD_HELP unless `source` holds MELD.Raw's CSVs and train clips."""
  if not source:
    raise errors.PathNotFound(MELD_HELP.format(where=NOT_SET))
  if not os.path.isdir(source):
    raise errors.PathNotFound(MELD_HELP.format(where=f": {source} is not a folder"))
  missing = [name for name in REQUIRED_CSVS + ("train_splits",) if not _find(source, name)]
  if missing:
    raise errors.PathNotFound(MELD_HELP.format(where=f" in {source} (missing: {', '.join(missing)})"))


def check_meld_csvs(source: str) -> None:
  """Raises PathNotFound with MELD_TEXT_HELP unless `source` holds the train and dev CSVs."""
  if not source or not os.path.isdir(source):
    where = NOT_SET if not source else f": {source} is not a folder"
    raise errors.PathNotFound(MELD_TEXT_HELP.format(where=where))
  missing = [name for name in REQUIRED_CSVS if not _find(source, name, os.path.isfile)]
  if missing:
    raise errors.PathNotFound(MELD_TEXT_HELP.format(where=f" in {source} (missing: {', '.join(missing)})"))


def check_csv_source(source: str, fmt, splits) -> None:
  """Raises PathNotFound unless `source` holds the CSV of each of `splits` that `fmt` (a csv_format.CsvFormat,
  from config.data) names; the message names the config field to set."""
  if not source:
    raise errors.PathNotFound(
      "config.data.source_dir is empty: set --config.data.source_dir=/path/to/your/corpus, the folder with your "
      "CSVs and clip folders (docs/OWN_DATA.md)."
    )
  if not os.path.isdir(source):
    raise errors.PathNotFound(f"config.data.source_dir={source} is not a folder. {fmt.layout_help()}")
  csv_files = dict(fmt.csv_files)
  for split in splits:
    if split not in csv_files:
      raise errors.PathNotFound(
        f"config.data.csv_files names no CSV for the split {split!r} (it names {sorted(csv_files)}); add "
        f"--config.data.csv_files.{split}=FILE.csv or set config.train_split / config.eval_split to one of those."
      )
    if not _find(source, csv_files[split], os.path.isfile):
      raise errors.PathNotFound(
        f"{source} holds no {csv_files[split]} (config.data.csv_files.{split}), the {split} split's CSV; put it "
        f"there or set config.data.csv_files.{split} to its name. {fmt.layout_help()}"
      )
