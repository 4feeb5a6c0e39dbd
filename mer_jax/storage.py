"""Paths that are local folders or URLs (gs://bucket/...): which is which, and the file operations the library needs
on both.

Workdirs, prepared data (data_dir), export folders and reports may live on a bucket, so that every host of a pod
reads and writes the same files. All of them go through etils.epath: the os module for local paths, TensorFlow's
gfile for gs:// (the same filesystem TFDS, tf.data and TensorBoard's writers use; orbax writes its arrays through
tensorstore's own GCS driver). Clips are decoded from local files only (PyAV opens paths, not URLs), so a source
folder of raw clips or CSVs must be local: `require_local` says so. Tools that write through libraries that only
take local paths (ONNX and TFLite files, matplotlib figures) write into `local_output_dir` and upload at the end.

At the package root, as errors.py: data, training, export and tools all use it. Imports no JAX and no TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

from mer_jax import errors


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL such as gs://bucket/run (anything with a scheme), False for a local path."""
  return "://" in os.fspath(path)


def absolute_path(path: str | os.PathLike) -> str:
  """Local paths made absolute (with ~ expanded); URLs such as gs://bucket/run are kept as they are."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def parent(path: str) -> str:
  """The folder that holds `path`: os.path.dirname of an absolute local path; for a URL, the URL up to its last
  '/' (a trailing '/' ignored). Raises InvalidInput for a bucket root (gs://bucket has no parent folder)."""
  if not is_remote(path):
    return os.path.dirname(absolute_path(path))
  scheme, _, rest = path.rstrip("/").partition("://")
  if "/" not in rest:
    raise errors.InvalidInput(
      f"{path} is the root of a bucket, which has no parent folder; use a folder in it (e.g. {path.rstrip('/')}/run)."
    )
  return f"{scheme}://{rest.rsplit('/', 1)[0]}"


def require_local(path: str, what: str) -> None:
  """Raises InvalidInput when `path` is a URL: `what` (e.g. '--source') must name a local file or folder."""
  if is_remote(path):
    raise errors.InvalidInput(
      f"{what} {path}: clips and CSVs are read from local files only (PyAV decodes local files). Copy them to this "
      "machine first (e.g. gcloud storage cp -r) and pass the local path; prepared data (data_dir), workdirs and "
      "export folders may be on gs://."
    )


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def is_file(path: str) -> bool:
  return epath.Path(path).is_file()


def make_dirs(path: str) -> None:
  """Makes folder `path` and its parents (no error when it exists)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_json(path: str, value: Any, indent: int = 1) -> None:
  """Writes `value` as JSON to `path`, its folder made if needed. On a bucket an object appears whole or not at all;
  a local file is written beside and renamed, so that no reader sees half of it."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(value, indent=indent)
  if is_remote(path):
    target.write_text(text)
    return
  temporary = target.parent / (target.name + ".tmp")
  temporary.write_text(text)
  os.replace(temporary, target)


def upload_tree(local_dir: str, out_dir: str) -> None:
  """Copies the files under `local_dir` into `out_dir` (any filesystem), replacing what is there under the same
  names; a top-level folder of `local_dir` replaces the folder of that name in `out_dir` (an old SavedModel's
  files do not linger)."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for entry in sorted(os.listdir(local_dir)):
    if os.path.isdir(os.path.join(local_dir, entry)) and (out / entry).is_dir():
      (out / entry).rmtree()
  for folder, _, files in os.walk(local_dir):
    target = out / os.path.relpath(folder, local_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      epath.Path(folder, name).copy(target / name, overwrite=True)


@contextlib.contextmanager
def local_output_dir(out_dir: str) -> Iterator[str]:
  """A local folder to write `out_dir`'s files into: `out_dir` itself when it is local (made if missing); for a URL a
  temporary folder whose files are uploaded to `out_dir` when the block ends (also when it raises, as the files of a
  local folder would stay), then removed."""
  if not is_remote(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    yield out_dir
    return
  local = tempfile.mkdtemp(prefix="mer_jax_output_")
  try:
    yield local
  finally:
    try:
      upload_tree(local, out_dir)
    finally:
      shutil.rmtree(local, ignore_errors=True)
