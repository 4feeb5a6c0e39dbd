"""TFDS builder for MELD-format data: MELD itself, MESC-format sets, the demo corpus and corpora of one's own.

The manual dir holds, per split, a CSV and (optionally) a folder of clips. MELD.Raw's layout is the default:

    train_sent_emo.csv   train_splits/                  (clips dia{D}_utt{U}.mp4)
    dev_sent_emo.csv     dev_splits_complete/
    test_sent_emo.csv    output_repeated_splits_test/

and a builder config (a `csv_format.CsvFormat`) names other files, columns, tasks and classes (launch.py builds
one from config.data; docs/OWN_DATA.md). The files may also sit one folder down, as MELD.Raw's tarballs unpack.
A split exists when its CSV does. With no clip folder (or the 'meld_text' config) examples are text-only:
has_video = has_audio = False. Each example follows docs/ARCHITECTURE.md "Prepared example".

The rows, clips and examples are the library's (`mer_jax.data.meld_csv`, which evaluation on any CSV
uses too); this module is the TFDS side: the registered configs, splits and the report file.
Nothing is dropped silently: a CSV row becomes an example or is counted, with its id, under a
reason in `prepare_report.json` (in the builder's data_dir, beside the prepared files); a clip that
is missing or broken gives an example marked has_video / has_audio False, its reasons counted too.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from mer_jax import errors
from mer_jax import storage
from mer_jax.data import csv_format
from mer_jax.data import meld_csv

REPORT_FILE = meld_csv.REPORT_FILE
LAYOUT_HELP = csv_format.LAYOUT_HELP


@dataclasses.dataclass(eq=False)
class MeldFormatConfig(tfds.core.BuilderConfig, csv_format.CsvFormat):
  """A MELD-format dataset: a TFDS builder config with the fields of `csv_format.CsvFormat` (where the files are,
  which columns, tasks and classes, how clips are read)."""


_VERSION = tfds.core.Version("1.0.0")
_DESCRIPTIONS = {
  "meld": "MELD: emotion (7) + sentiment (3); 12 face-cropped 112 px frames (the I/P frame nearest "
  "each t_i, no deblocking), 16 kHz audio up to 10 s.",
  "demo": "The generated demo corpus: as 'meld' with centre crops, audio <= 4 s, exact frames.",
  "meld_text": "MELD CSVs only: text examples (no clips read), same feature spec.",
  "mesc": "MESC-format: emotion (7) + support strategy; 'undefined' -> -1.",
}
BUILDER_CONFIGS = [
  MeldFormatConfig(name=name, version=_VERSION, description=_DESCRIPTIONS[name], **fmt.fields())
  for name, fmt in csv_format.FORMATS.items()
]


class MeldFormat(tfds.core.GeneratorBasedBuilder):
  """MELD-format clips + CSVs -> prepared examples (see module docstring)."""

  VERSION = _VERSION
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT_HELP  # MELD's; a config for other files says its own in its errors

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """num_workers: clip-decoding processes, instead of the config's (a registered config cannot be replaced by a
    copy with other workers: TFDS refuses a custom config that bears a registered name)."""
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=meld_csv.example_features(self.builder_config),
      # Class names per task in label-id order, for whoever reads the prepared data, and how
      # clips were read, so that prediction on a raw clip reads it the same way.
      metadata=tfds.core.MetadataDict(meld_csv.dataset_metadata(self.builder_config)),
      homepage="https://affective-meld.github.io/",
      citation="Poria et al., MELD: A Multimodal Multi-Party Dataset for Emotion Recognition "
      "in Conversations, ACL 2019.",
    )

  def _split_generators(self, dl_manager):
    source = dl_manager.manual_dir
    config = self.builder_config
    self._report = {
      "builder": self.name,
      "config": config.name,
      "version": str(self.version),
      "source": str(source),
      "clip_read_config": dataclasses.asdict(config.clip_read_config()),
      "splits": {},
    }
    generators = {}
    for split, csv_name, folder in config.splits():
      csv_path = meld_csv.find_in_source(source, csv_name)
      if csv_path is None:
        continue
      clip_dir = None if config.text_only or not folder else meld_csv.find_in_source(source, folder)
      report = meld_csv.SplitReport(csv_path, clip_dir, "clips" if clip_dir else "csv_only")
      self._report["splits"][split] = report.data
      rows = meld_csv.read_rows(csv_path, split, config, report)
      if rows:  # TFDS refuses an empty split; the report still says why it is absent
        generators[split] = self._generate_examples(rows, clip_dir, report)
      else:
        report.data["omitted"] = "no valid rows"
    if not self._report["splits"]:
      raise errors.PathNotFound(f"No split CSV found in {source}. {config.layout_help()}")
    if not generators:
      self._write_report()
      raise errors.InvalidInput(
        f"No CSV row in {source} could be read; see {os.path.join(self.data_dir, REPORT_FILE)}. {config.layout_help()}"
      )
    return generators

  def _write_report(self):
    # Into the incomplete dir while preparing (TFDS moves it into place), local or on gs://.
    storage.write_json(os.path.join(self.data_dir, REPORT_FILE), self._report)

  def _generate_examples(self, rows: list, clip_dir, report: meld_csv.SplitReport):
    fmt = self.builder_config
    if self._num_workers is not None:
      fmt = dataclasses.replace(fmt, num_workers=self._num_workers)
    yield from meld_csv.examples(rows, clip_dir, fmt, report)
    self._write_report()
