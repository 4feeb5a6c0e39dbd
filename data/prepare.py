"""Prepare a MELD-format folder into TFDS data and say where the data and its report are.

    python -m data.prepare --source DIR --data_dir OUT [--builder_config meld|demo|meld_text|mesc]

DIR is MELD.Raw unpacked (or any folder laid out like it; see data/meld_format.py). The prepared
data lands in OUT/meld_format/<config>/1.0.0/ with prepare_report.json beside it: per split, rows
read and prepared, and per reason (missing clip, corrupt file, unknown label, ...) a count and ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# TensorFlow (via data.meld_format) and the clip reader (via mer_jax.data.meld_csv) are imported inside
# the functions: the clip-decoding workers are spawned processes that import this __main__ module again,
# and need none of it.


def check_source(source) -> list[str]:
  """The split CSVs found in `source`; raises FileNotFoundError that explains MELD's layout."""
  from mer_jax.data import meld_csv

  if not os.path.isdir(source):
    raise FileNotFoundError(f"--source {source} is not a folder. {meld_csv.LAYOUT_HELP}")
  found = [csv_name for _, csv_name, _ in meld_csv.MELD_SPLITS if meld_csv.find_in_source(source, csv_name)]
  if not found:
    raise FileNotFoundError(
      f"--source {source} holds none of train_sent_emo.csv, dev_sent_emo.csv, "
      f"test_sent_emo.csv (looked in it and one folder down). {meld_csv.LAYOUT_HELP}"
    )
  return found


def prepare(source, data_dir, builder_config="meld"):
  """Run the builder on `source` (its manual dir) into `data_dir`.

  builder_config: a config name or a meld_format.MeldFormatConfig. Returns (builder, report_path).
  Data prepared before (same data_dir, config and version) is reused as it is.
  """
  import tensorflow_datasets as tfds

  from data import meld_format
  from mer_jax.data import meld_csv

  if not isinstance(builder_config, meld_format.MeldFormatConfig) or builder_config.splits == meld_csv.MELD_SPLITS:
    check_source(source)
  builder = meld_format.MeldFormat(config=builder_config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
  return builder, os.path.join(builder.data_dir, meld_format.REPORT_FILE)


def summary(report_path: str) -> str:
  """A few lines per split from prepare_report.json."""
  if not os.path.exists(report_path):
    return f"(no report at {report_path}: the data was prepared by an older run)"
  with open(report_path) as f:
    report = json.load(f)
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

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="MELD-format folder (CSVs + clip folders)")
  parser.add_argument("--data_dir", required=True, help="where TFDS writes the prepared data")
  parser.add_argument("--builder_config", default="meld", choices=[c.name for c in meld_format.BUILDER_CONFIGS])
  parser.add_argument("--num_workers", type=int, default=None, help="clip-decoding processes (default: all cores)")
  args = parser.parse_args(argv)
  try:
    check_source(args.source)
  except FileNotFoundError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  config = args.builder_config
  if args.num_workers is not None:
    base = {c.name: c for c in meld_format.BUILDER_CONFIGS}[config]
    config = dataclasses.replace(base, num_workers=args.num_workers)
  builder, report_path = prepare(args.source, args.data_dir, config)
  print(f"prepared data: {builder.data_dir}")
  print(f"report:        {report_path}")
  print(summary(report_path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
