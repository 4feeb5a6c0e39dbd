"""Prepare a MELD-format folder into TFDS data and say where the data and its report are.

    python -m data.prepare --source DIR --data_dir OUT [--builder_config meld|demo|meld_text|mesc]

DIR is MELD.Raw unpacked (or any folder laid out like it; see data/meld_format.py). The prepared
data lands in OUT/meld_format/<config>/1.0.0/ with prepare_report.json beside it: per split, rows
read and prepared, and per reason (missing clip, corrupt file, unknown label, ...) a count and ids.
OUT may be a bucket (gs://bucket/tfds), for the hosts of a pod to share; DIR must be local (clips are decoded
from local files).
A progress bar with the ETA runs over each split's clips. A corpus with other file names, columns, tasks
or classes is prepared by launch.py from its config (config.data.prepare = 'csv'; docs/OWN_DATA.md).
"""

from __future__ import annotations

import argparse
import os
import sys

# TensorFlow (via data.meld_format) and the clip reader (via mer_jax.data.meld_csv) are imported inside
# the functions: the clip-decoding workers are spawned processes that import this __main__ module again,
# and need none of it.


def check_source(source, fmt=None) -> list[str]:
  """The split CSVs of `fmt` (a csv_format.CsvFormat; default MELD's) found in `source`; raises PathNotFound that
  says what the folder should hold."""
  from mer_jax import errors
  from mer_jax import storage
  from mer_jax.data import csv_format
  from mer_jax.data import meld_csv

  fmt = fmt or csv_format.FORMATS["meld"]
  storage.require_local(source, "--source")
  if not os.path.isdir(source):
    raise errors.PathNotFound(f"--source {source} is not a folder. {fmt.layout_help()}")
  names = [csv_name for _, csv_name, _ in fmt.splits()]
  found = [name for name in names if meld_csv.find_in_source(source, name)]
  if not found:
    raise errors.PathNotFound(
      f"--source {source} holds none of {', '.join(names)} (looked in it and one folder down). {fmt.layout_help()}"
    )
  return found


def prepare(source, data_dir, builder_config="meld", num_workers: int | None = None):
  """Run the builder on `source` (its manual dir) into `data_dir`.

  builder_config: a registered config's name or a meld_format.MeldFormatConfig; num_workers: clip-decoding
  processes (None: the config's). Returns (builder, report_path). Data prepared before (same data_dir, config and
  version) is reused as it is.
  """
  import tensorflow_datasets as tfds

  from data import meld_format

  if not isinstance(builder_config, meld_format.MeldFormatConfig):
    builder_config = {c.name: c for c in meld_format.BUILDER_CONFIGS}[builder_config]
  check_source(source, builder_config)
  builder = meld_format.MeldFormat(config=builder_config, data_dir=os.fspath(data_dir), num_workers=num_workers)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
  return builder, os.path.join(builder.data_dir, meld_format.REPORT_FILE)


def summary(report_path: str) -> str:
  """A few lines per split from prepare_report.json (a local path or gs://)."""
  from mer_jax import storage

  if not storage.exists(report_path):
    return f"(no report at {report_path}: the data was prepared by an older run)"
  report = storage.read_json(report_path)
  lines = []
  for split, r in report["splits"].items():
    skipped = {k: v["count"] for k, v in r["rows_skipped"].items()}
    problems = {k: v["count"] for k, v in r["clip_problems"].items()}
    lines.append(
      f"  {split:5s} [{r['mode']}] rows {r['rows_read']}, examples {r['examples']}, "
      f"video {r['with_video']}, audio {r['with_audio']}, "
      f"unlabeled clips {r['unlabeled_clips']['count']}"
    )
    if skipped:
      lines.append(f"        rows skipped: {skipped}")
    if problems:
      lines.append(f"        clip problems: {problems}")
  return "\n".join(lines)


def main(argv=None) -> int:
  from data import meld_format
  from mer_jax import errors

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="MELD-format folder (CSVs + clip folders)")
  parser.add_argument("--data_dir", required=True, help="where TFDS writes the prepared data (a folder or gs://...)")
  parser.add_argument("--builder_config", default="meld", choices=[c.name for c in meld_format.BUILDER_CONFIGS])
  parser.add_argument("--num_workers", type=int, default=None, help="clip-decoding processes (default: all cores)")
  args = parser.parse_args(argv)
  try:
    builder, report_path = prepare(args.source, args.data_dir, args.builder_config, args.num_workers)
  except errors.UserError as error:
    print(errors.one_line(error), file=sys.stderr)
    return errors.USER_ERROR_EXIT_STATUS
  print(f"prepared data: {builder.data_dir}")
  print(f"report:        {report_path}")
  print(summary(report_path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
