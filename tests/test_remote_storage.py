"""gs:// end to end, offline: prepare -> train 2 steps -> evaluate -> export, with data_dir, workdir, the evaluation's
prepared data and the export folder all on a bucket of an in-memory GCS server (tests/fixtures/fake_gcs.py).

Every client the library uses on gs:// talks to that server: TF's GCS filesystem (tf.io.gfile, TFDS's files,
tf.data, TensorBoard events, etils.epath), tensorstore (orbax's arrays) and google-cloud-storage (orbax asks it for
the bucket's kind). Only the raw demo clips are local, as they must be (PyAV decodes local files). launch.py,
evaluate and export run as the CLIs, in subprocesses that reach the server through the environment variables this
process sets, as a pod's hosts reach the real GCS.
"""

import concurrent.futures
import json
import math
import os
import subprocess
import sys

import pytest

from configs import tiny
from data import make_demo_corpus
from mer_jax import errors
from mer_jax import storage
from mer_jax.training import train
from tests.fixtures import fake_gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://mer-jax-test"
DATA_DIR = f"{BUCKET}/tfds"
WORKDIR = f"{BUCKET}/runs/tiny"
EXPORT = f"{BUCKET}/export"
NUM_TRAIN, NUM_DEV = 8, 4
FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/test_train.py's subprocesses: compile time dominates


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The fake GCS server, and this process's environment pointed at it (subprocesses inherit it)."""
  server = fake_gcs.FakeGcsProcess(str(tmp_path_factory.mktemp("fake_gcs")))
  try:
    with pytest.MonkeyPatch.context() as patch:
      for name, value in server.env.items():
        patch.setenv(name, value)
      yield server
  finally:
    server.stop()


def objects(server, prefix: str) -> list[str]:
  """Names stored under `prefix` (a gs:// URL), relative to it."""
  return [name[len(prefix) + 1 :] for name in server.state()["objects"] if name.startswith(prefix + "/")]


def run_tool(args: list[str], cwd: str) -> str:
  """`python args` from an empty folder `cwd` (where a URL taken for a local path would show up as a folder gs:)."""
  env = {
    **os.environ,
    "PYTHONPATH": REPO,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": FAST_COMPILE,
    "MER_JAX_CACHE": os.path.join(os.path.dirname(cwd), "cache"),  # a compilation cache of its own: always cold
  }
  done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f"{args[:2]} failed ({done.returncode}):\n{done.stderr[-6000:]}"
  return done.stdout


@pytest.mark.slow
def test_prepare_train_evaluate_export_on_a_bucket(gcs, tmp_path):
  corpus, tool_cwd = tmp_path / "corpus", tmp_path / "cwd"
  tool_cwd.mkdir()
  make_demo_corpus.make_corpus(
    str(corpus), num_train=NUM_TRAIN, num_dev=NUM_DEV, num_test=1, resolution=(64, 64), workers=1
  )

  # launch.py as on a pod: prepares the local corpus into the bucket, then trains 2 steps with the workdir there.
  steps = ["num_train_steps=2", "warmup_steps=1", "log_every_steps=1", "eval_every_steps=2", "checkpoint_every_steps=2"]
  data = [
    f"data_dir={DATA_DIR}",
    "prepare=demo",
    f"source_dir={corpus}",
    "builder_config=demo_tiny",
    "prepare_workers=1",
  ]
  flags = [f"--config.{setting}" for setting in steps] + [f"--config.data.{setting}" for setting in data]
  run_tool(
    [os.path.join(REPO, "launch.py"), "--config", os.path.join(REPO, "configs/tiny.py"), "--workdir", WORKDIR, *flags],
    str(tool_cwd),
  )

  prepared_dir = f"{DATA_DIR}/meld_format/demo_tiny/1.0.0"
  prepared = objects(gcs, prepared_dir)
  assert "prepare_report.json" in prepared and "dataset_info.json" in prepared, prepared
  assert any(name.startswith("meld_format-train.tfrecord") for name in prepared), prepared
  report = storage.read_json(f"{prepared_dir}/prepare_report.json")
  assert report["splits"]["train"]["examples"] == NUM_TRAIN and report["splits"]["dev"]["examples"] == NUM_DEV

  # The run: checkpoint (orbax: metadata through TF's gfile, arrays through tensorstore), config.json, eval JSON and
  # TensorBoard events, all in the bucket.
  run_files = objects(gcs, WORKDIR)
  for name in ("config.json", "eval/step_2.json", "eval/best.json", "checkpoints/2/commit_success.txt"):
    assert name in run_files, (name, run_files)
  assert any(name.startswith("checkpoints/2/state/") for name in run_files)
  assert any("events.out.tfevents" in name for name in run_files)
  best = storage.read_json(f"{WORKDIR}/eval/best.json")
  assert best["step"] == 2 and math.isfinite(best["value"])
  assert storage.read_json(f"{WORKDIR}/config.json")["data"]["data_dir"] == DATA_DIR

  # Evaluate the bucket's run on the local dev CSV and clips (the CSV's prepared copy kept in the bucket), and export
  # it to ONNX into the bucket: both read only the workdir, so they run side by side. The exporter runs model.onnx in
  # ONNX Runtime on real dev examples read from the bucket and compares it with the checkpoint's JAX outputs
  # (parity.json; it fails past the fp32 bar).
  csv, clips, evaluated = str(corpus / "dev_sent_emo.csv"), str(corpus / "dev_splits_complete"), f"{BUCKET}/evaluated"
  evaluate = ["-m", "mer_jax.evaluate", "--workdir", WORKDIR, "--csv", csv, "--clips", clips]
  evaluate += ["--keep-prepared", evaluated, "--json"]
  export = ["-m", "mer_jax.export", "--workdir", WORKDIR, "--out", EXPORT, "--formats", "onnx", "--examples", "4"]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    evaluating, exporting = (pool.submit(run_tool, args, str(tool_cwd)) for args in (evaluate, export))
    output, _ = evaluating.result(), exporting.result()
  evaluation = json.loads(output)
  assert evaluation["checkpoint"]["workdir"] == WORKDIR and evaluation["checkpoint"]["checkpoint_step"] == 2
  for task in ("emotion", "sentiment"):
    scores = evaluation[task]
    assert scores["num_examples"] == NUM_DEV
    assert all(math.isfinite(scores[key]) for key in ("accuracy", "weighted_f1", "macro_f1")), scores
  assert any(name.endswith("prepare_report.json") for name in objects(gcs, evaluated))

  exported = objects(gcs, EXPORT)
  assert {"model.onnx", "metadata.json", "parity.json"} <= set(exported), exported
  assert any(name.startswith("tokenizer/") for name in exported)
  parity = storage.read_json(f"{EXPORT}/parity.json")
  assert parity["examples"] == 4 and DATA_DIR in parity["examples_source"], parity["examples_source"]
  onnx = parity["formats"]["onnx"]
  assert onnx["passed_fp32_bar"] and onnx["max_abs_delta"] <= parity["tolerance_fp32"], onnx
  assert storage.read_json(f"{EXPORT}/metadata.json")["source"]["workdir"] == WORKDIR

  assert gcs.state()["unserved"] == []
  # No URL was taken for a local path anywhere (os.makedirs("gs://b/x") would make a folder "gs:").
  assert os.listdir(tool_cwd) == [] and not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_paths_local_and_remote(tmp_path, monkeypatch):
  """URLs are kept as they are; local paths made absolute; the default data_dir is beside the workdir on both."""
  monkeypatch.chdir(tmp_path)
  assert storage.absolute_path("gs://b/runs/a/") == "gs://b/runs/a/"
  assert storage.absolute_path("runs") == str(tmp_path / "runs")
  assert storage.parent("gs://b/runs/a/") == "gs://b/runs" and storage.parent("runs/a") == str(tmp_path / "runs")
  with pytest.raises(errors.InvalidInput, match="root of a bucket"):
    storage.parent("gs://b/")
  config = tiny.get_config()
  config.data.data_dir = ""
  assert train.resolve_data_dir(config, "gs://b/runs/a") == "gs://b/runs/data"
  assert train.resolve_data_dir(config, "runs/a") == str(tmp_path / "runs" / "data")
  with pytest.raises(errors.InvalidInput, match="local files only.*gs://"):
    storage.require_local("gs://b/MELD.Raw", "--source")
  storage.require_local("MELD.Raw", "--source")


def test_local_output_dir_and_json_on_a_local_folder(tmp_path):
  """Local folders are written in place (no staging), and JSON replaces the file whole."""
  with storage.local_output_dir(str(tmp_path / "out")) as folder:
    assert folder == str(tmp_path / "out") and os.path.isdir(folder)
  storage.write_json(str(tmp_path / "a" / "b.json"), {"x": 1})
  storage.write_json(str(tmp_path / "a" / "b.json"), {"x": 2})
  assert storage.read_json(str(tmp_path / "a" / "b.json")) == {"x": 2} and os.listdir(tmp_path / "a") == ["b.json"]


def test_upload_tree_replaces_folders(tmp_path):
  """What a gs:// out_dir gets at the end of `local_output_dir` (here between two local folders): files copied,
  a folder of the same name replaced, other files kept."""
  out = tmp_path / "out"
  (out / "saved_model").mkdir(parents=True)
  (out / "saved_model" / "old.pb").write_text("old")
  (out / "keep.txt").write_text("keep")
  local = tmp_path / "local"
  (local / "saved_model" / "variables").mkdir(parents=True)
  (local / "saved_model" / "variables" / "v").write_text("new")
  (local / "model.onnx").write_bytes(b"onnx")
  storage.upload_tree(str(local), str(out))
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert files == ["keep.txt", "model.onnx", "saved_model/variables/v"]
