"""Every command, given a path that is missing (or a folder that is not a training workdir, or a value that does not
exist), exits 2 with one line on stderr that names what was wrong and says what to do: no traceback.

Each command runs in its own process, as a user runs it; they run side by side (each one spends seconds importing
TensorFlow and JAX), once for the module, and each test reads its command's result.
"""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from mer_jax import errors
from mer_jax import tools
from mer_jax.tools import explain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "/nonexistent/mer_jax_cli_errors"  # never there
NOT_A_WORKDIR = "{empty}"  # replaced by an empty folder that exists
EXISTING_CSV = "{csv}"  # replaced by a CSV file that exists

# name -> (command line after `python`, words the error line must hold: the path or value, and what to do).
COMMANDS = {
  "evaluate_missing_workdir": (
    ["-m", "mer_jax.tools.evaluate", "--workdir", MISSING, "--csv", EXISTING_CSV],
    [f"Workdir {MISSING} not found", "pass the folder given to python launch.py as --workdir"],
  ),
  "evaluate_missing_csv": (
    ["-m", "mer_jax.tools.evaluate", "--workdir", MISSING, "--csv", f"{MISSING}.csv"],
    [f"--csv {MISSING}.csv is not a file", "pass a MELD-format CSV"],
  ),
  "evaluate_not_a_workdir": (
    ["-m", "mer_jax.tools.evaluate", "--workdir", NOT_A_WORKDIR, "--csv", EXISTING_CSV],
    [f"{NOT_A_WORKDIR} is not a training workdir", "pass the folder given to python launch.py as --workdir"],
  ),
  "export_not_a_workdir": (
    ["-m", "mer_jax.export", "--workdir", NOT_A_WORKDIR, "--out", f"{NOT_A_WORKDIR}/export"],
    [f"{NOT_A_WORKDIR} is not a training workdir", "pass the folder given to python launch.py as --workdir"],
  ),
  "export_unknown_format": (
    ["-m", "mer_jax.export", "--workdir", MISSING, "--out", f"{NOT_A_WORKDIR}/export", "--formats", "coreml"],
    ["coreml", "pass --formats from onnx,tflite,savedmodel"],
  ),
  "report_missing_workdir": (
    ["-m", "mer_jax.tools.report", "--workdir", MISSING, "--out", f"{NOT_A_WORKDIR}/report"],
    [f"Workdir {MISSING} not found", "pass the folder given to python launch.py as --workdir"],
  ),
  "explain_missing_workdir": (
    ["-m", "mer_jax.tools.explain", "--workdir", MISSING, "--id", "dev/dia0_utt0", "--out", f"{NOT_A_WORKDIR}/x.png"],
    [f"Workdir {MISSING} not found", "pass the folder given to python launch.py as --workdir"],
  ),
  "ablations_missing_config": (
    ["-m", "mer_jax.tools.ablations", "--config", f"{MISSING}.py", "--workdir-root", f"{NOT_A_WORKDIR}/ablations"],
    [f"Config file {MISSING}.py not found", "pass --config"],
  ),
  "ablations_unknown_config_key": (
    [
      "-m",
      "mer_jax.tools.ablations",
      "--config",
      "configs/tiny.py",
      "--workdir-root",
      f"{NOT_A_WORKDIR}/ablations",
      "--set",
      "model.nonexistent_key=1",
    ],
    ["model.nonexistent_key", "check the spelling"],
  ),
  "predict_missing_model": (
    # An existing --video, so that the model's path is what the command stops at.
    ["-m", "mer_jax.predict", "--model", MISSING, "--video", "README.md", "--text", "hi"],
    [MISSING, "not found"],
  ),
  "prepare_missing_source": (
    ["-m", "data.prepare", "--source", MISSING, "--data_dir", f"{NOT_A_WORKDIR}/tfds"],
    [MISSING],
  ),
  "launch_missing_config_file": (
    ["launch.py", "--config", f"{MISSING}.py", "--workdir", f"{NOT_A_WORKDIR}/run"],
    [f"--config {MISSING}.py not found", "pass a config file"],
  ),
  "launch_unknown_config_key": (
    ["launch.py", "--config", "configs/tiny.py", "--workdir", f"{NOT_A_WORKDIR}/run", "--config.nonexistent_key=1"],
    ["nonexistent_key"],
  ),
}


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
  environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
  )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """{name: (completed process, expected words)}, the placeholders filled in with real paths."""
  root = tmp_path_factory.mktemp("cli_errors")
  empty = root / "empty"
  empty.mkdir()
  csv_path = root / "dev.csv"
  csv_path.write_text(
    "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n1,Hi.,Ross,joy,positive,0,0\n"
  )
  fill = lambda text: text.replace(NOT_A_WORKDIR, str(empty)).replace(EXISTING_CSV, str(csv_path))
  commands = {
    name: ([fill(a) for a in arguments], [fill(w) for w in words]) for name, (arguments, words) in COMMANDS.items()
  }
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: pool.submit(_run, arguments) for name, (arguments, _) in commands.items()}
    return {name: (future.result(), commands[name][1]) for name, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_user_error_is_one_line_and_exit_status_2(results, name):
  done, words = results[name]
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.returncode == 2, done.stderr[-3000:]
  assert len(lines) == 1, done.stderr[-3000:]
  (line,) = lines
  assert line.startswith("error: "), line
  for word in words:
    assert word in line, (word, line)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path):
  """An --out under a file (or a PNG path that is a folder) fails at once, not after minutes of measuring."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(errors.InvalidInput, match=f"--out {blocker}/report: {blocker} is a file, not a folder"):
    tools.check_output_folder(str(blocker / "report"))
  tools.check_output_folder(str(tmp_path / "new" / "report"))  # not there yet: the tool makes it
  with pytest.raises(errors.InvalidInput, match="is a folder; pass the PNG's path"):
    explain.check_output(str(tmp_path))
  explain.check_output(str(tmp_path / "new" / "one.png"))
