"""The report, explain and ablation CLIs on a tiny generated demo corpus, and the measurements on known values.

The end-to-end tests share one tiny corpus (8 train, 6 dev clips, 4 frames of 32 px) and one 2-step run of
configs/tiny.py; the report and explain CLIs read that run's workdir alone (config.json + checkpoints).
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import launch
from configs import tiny
from mer_jax import errors
from mer_jax.tools import ablations
from mer_jax.tools import explain
from mer_jax.models import emotion_model as model_lib
from mer_jax.tools import report
from mer_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_config(root) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.data.builder_config = "demo_tiny"
  config.data.data_dir = str(root / "tfds")
  config.data.source_dir = str(root / "corpus")  # the ground-truth sidecar lives here
  config.num_train_steps = 2
  config.warmup_steps = 1
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  """Generated + prepared once (launch.py's config-driven path): 8 train, 6 dev, 2 test clips."""
  root = tmp_path_factory.mktemp("report_corpus")
  config = _tiny_config(root)
  config.data.prepare = "demo"
  config.data.prepare_workers = 1
  config.data.demo_corpus = ml_collections.ConfigDict(
    dict(num_train=8, num_dev=6, num_test=2, seed=0, resolution=(64, 64), workers=1)
  )
  launch.prepare_data_if_missing(config, str(root / "work"))
  return root


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("report_run"))
  train.train_and_evaluate(_tiny_config(tiny_root), workdir)
  return workdir


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 2000


# ----------------------------------------------------------------------------- measurements on known values


def test_key_frames_identity_and_resampled():
  record = {
    "key_frame_indices": [0, 1, 5, 7],
    "duration": 3.0,
    "fps": 15,
    "num_frames": 45,
    "decoys": [{"frame_indices": [3, 4, 9, 11]}, {"frame_indices": [2, 6, 8, 10]}],
  }
  assert report.key_frames(record, 12) == {0, 1, 5, 7}
  # 6 samples at t = (j + 0.5) * 0.5 s: video frames 3, 11, 18, 26, 33, 41 -> positions 0, 3, 4, 7, 8, 11.
  assert report.key_frames(record, 6) == {0, 3}


def test_random_other_frames_never_repeat_the_chosen_set():
  rng = np.random.default_rng(0)
  chosen = np.array([[0, 1]] * 200)
  other = report.random_other_frames(rng, chosen, 3)
  assert other.shape == (200, 2) and (np.diff(other, axis=1) > 0).all()
  assert not any(set(row) == {0, 1} for row in other.tolist())
  assert {tuple(r) for r in other.tolist()} == {(0, 2), (1, 2)}
  np.testing.assert_array_equal(report.random_other_frames(np.random.default_rng(0), chosen, 3), other)
  # Enough frames left: K frames none of which was chosen.
  chosen = np.array([[1, 4], [0, 5]] * 50)
  disjoint = report.random_other_frames(rng, chosen, 6)
  assert all(not set(r) & set(c) for r, c in zip(disjoint.tolist(), chosen.tolist()))
  assert len({tuple(r) for r in disjoint.tolist()}) > 3
  # K = T: the only set is the chosen one.
  np.testing.assert_array_equal(report.random_other_frames(rng, np.array([[0, 1, 2]]), 3), [[0, 1, 2]])


def test_selection_histogram_and_chi_square():
  selected = np.array([[0, 1], [0, 1], [0, 1], [2, 3]])
  result = report.selection_histogram(selected, np.array([True, True, True, False]), 4)
  assert result["counts"] == [3, 3, 0, 0] and result["total"] == 6 and result["num_examples"] == 3
  assert result["chi2"] == pytest.approx(6.0)  # expected 1.5 each: 4 * 1.5^2 / 1.5
  assert 0.0 < result["p_value"] < 0.2
  flat = report.selection_histogram(np.array([[0, 1, 2, 3]]), np.array([True]), 4)
  assert flat["chi2"] == 0.0 and flat["p_value"] == 1.0


def test_measure_with_sidecar_gives_the_known_values(tmp_path):
  """Four clips with known selections, reliabilities and predictions -> known claims."""
  config = tiny.get_config()
  config.model.top_k = 2
  config.data.source_dir = str(tmp_path)
  base = {"duration": 2.0, "fps": 15, "num_frames": 30, "decoys": [{"frame_indices": [2]}, {"frame_indices": [3]}]}
  sidecar = [
    dict(base, id="dev/a", key_frame_indices=[0, 1], corrupted=None),
    dict(base, id="dev/b", key_frame_indices=[0, 2], corrupted=None),
    dict(base, id="dev/c", key_frame_indices=[1, 3], corrupted="audio"),
    dict(base, id="dev/d", key_frame_indices=[0, 1], corrupted="video"),
  ]
  with open(tmp_path / "dev_ground_truth.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in sidecar))
  right, wrong = np.eye(7)[3] * 5, np.eye(7)[0] * 5
  data = {
    "ids": np.array(["dev/a", "dev/b", "dev/c", "dev/d"], object),
    "selected": np.array([[0, 1], [0, 1], [1, 3], [2, 3]]),
    "frame_scores": np.zeros((4, 4)),
    "gate_mean": np.full(4, 0.5),
    "reliability_audio": np.array([0.9, 0.7, 0.2, 0.8]),
    "reliability_video": np.array([0.8, 0.8, 0.8, 0.1]),
    "has_video": np.ones(4, bool),
    "has_audio": np.ones(4, bool),
    "labels/emotion": np.array([3, 3, 3, 3]),
    "logits/emotion": np.stack([right, right, right, wrong]),
    "labels/sentiment": np.array([0, 1, -1, 2]),
    "logits/sentiment": np.zeros((4, 3)),
    "blank_chosen/emotion": np.stack([wrong, wrong, right, wrong]),
    "blank_random/emotion": np.stack([right, right, right, wrong]),
  }
  classes = {"emotion": [str(i) for i in range(7)], "sentiment": ["a", "b", "c"]}
  result = report.measure(config, data, classes, "dev")
  side = result["sidecar"]
  assert side["precision_at_k"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)  # clip d (video corrupted) left out
  assert side["groups"]["clean"]["reliability_audio"] == pytest.approx(0.8)
  assert side["groups"]["audio"]["accuracy"] == 1.0 and side["groups"]["video"]["accuracy"] == 0.0
  claims = result["claims"]
  assert claims["audio_reliability_drop"]["value"] == pytest.approx(0.6) and claims["audio_reliability_drop"]["met"]
  assert claims["video_reliability_drop"]["value"] == pytest.approx(0.7)
  assert claims["selection_precision_at_k"]["met"] is False and claims["accuracy_audio_corrupted"]["met"]
  faith = result["faithfulness"]  # over a, b, c: 3/3 as run, 1/3 chosen blanked, 3/3 random blanked
  assert faith["num_examples"] == 3 and faith["drop_blank_chosen"] == pytest.approx(2 / 3)
  assert claims["faithfulness_gap"]["value"] == pytest.approx(2 / 3) and claims["faithfulness_gap"]["met"]
  assert result["tasks"]["sentiment"]["num_examples"] == 3  # label -1 does not count
  config.data.source_dir = str(tmp_path / "elsewhere")
  no_sidecar = report.measure(config, data, classes, "dev")
  assert no_sidecar["sidecar"] is None and "does not exist" in no_sidecar["sidecar_note"]
  assert set(no_sidecar["claims"]) == {"faithfulness_gap"}


def test_blanked_frames_are_never_reselected():
  config = tiny.get_config()
  variables = model_lib.init_variables(config, jax.random.key(0))
  batch = {k: np.array(v) for k, v in model_lib.zeros_batch(config, 3).items()}
  batch["frames"] = np.random.default_rng(1).integers(0, 256, batch["frames"].shape, dtype=np.uint8)
  plain = explain.predict_fn(config)(variables, batch)[1]["selected_indices"]
  excluded = report._mask(np.asarray(plain), config.data.num_frames)
  _, explanation = report.blanked_predict_fn(config)(variables, batch, excluded)
  chosen = np.asarray(explanation["selected_indices"])
  assert not np.take_along_axis(excluded, chosen, axis=1).any()  # 4 frames, K=2: the other two


# ----------------------------------------------------------------------------- the CLIs, end to end


@pytest.mark.slow
def test_report_cli_writes_claims_plots_and_markdown(trained, tmp_path):
  out = tmp_path / "report"
  result = report.main(
    ["--workdir", trained, "--out", str(out), "--split", "dev", "--max-examples", "5", "--seed", "3"]
  )
  saved = json.load(open(out / "claims.json"))
  assert saved["num_examples"] == 5 and saved["split"] == "dev" and saved["seed"] == 3
  assert saved["claims"] == result["claims"]
  assert set(saved["claims"]) == {
    "selection_precision_at_k",
    "audio_reliability_drop",
    "video_reliability_drop",
    "accuracy_audio_corrupted",
    "faithfulness_gap",
  }
  for entry in saved["claims"].values():
    assert set(entry) >= {"value", "bar", "met"} and isinstance(entry["met"], bool)
  histogram = saved["selection_histogram"]
  assert sum(histogram["counts"]) == histogram["num_examples"] * 2 == histogram["total"]
  assert histogram["num_examples"] <= 5 and len(histogram["counts"]) == 4
  assert 0.0 <= histogram["p_value"] <= 1.0
  assert 0.0 <= saved["sidecar"]["precision_at_k"] <= 1.0
  assert saved["sidecar"]["num_examples_with_ground_truth"] == 5
  for task in ("emotion", "sentiment"):
    assert np.asarray(saved["tasks"][task]["confusion_matrix"]).sum() == saved["tasks"][task]["num_examples"]
  faith = saved["faithfulness"]
  for key in ("accuracy", "accuracy_blank_chosen", "accuracy_blank_random"):
    assert 0.0 <= faith[key] <= 1.0
  for name in saved["plots"].values():
    assert _is_png(out / name), name
  markdown = open(out / "report.md").read()
  assert "## Claims" in markdown and "selection_precision_at_k" in markdown
  assert all(f"]({name})" in markdown for name in saved["plots"].values())


@pytest.mark.slow
def test_explain_cli_on_one_id(trained, tmp_path, capsys):
  out_png = str(tmp_path / "one.png")
  record = explain.main(["--workdir", trained, "--id", "dev/dia0_utt0", "--out", out_png, "--json"])
  assert _is_png(out_png)
  saved = json.load(open(tmp_path / "one.json"))
  assert saved["id"] == "dev/dia0_utt0" and saved == json.loads(capsys.readouterr().out)
  assert len(saved["frame_scores"]) == 4 and len(saved["selected_indices"]) == 2
  assert saved["checkpoint"]["checkpoint_step"] == 2 and record["id"] == saved["id"]
  with open(os.path.join(_tiny_root_of(trained), "dev_ground_truth.jsonl")) as f:
    truth = next(json.loads(line) for line in f if json.loads(line)["id"] == "dev/dia0_utt0")
  assert saved["tasks"]["emotion"]["label"] == truth["emotion"]
  with pytest.raises(errors.InvalidInput, match="--id dev/dia99_utt9: no such example in split 'dev'"):
    explain.main(["--workdir", trained, "--id", "dev/dia99_utt9", "--out", out_png])


def _tiny_root_of(workdir: str) -> str:
  return json.load(open(os.path.join(workdir, "config.json")))["data"]["source_dir"]


@pytest.mark.slow
def test_ablations_short_mode(tiny_root, tmp_path):
  root = tmp_path / "ablations"
  summary = ablations.main(
    [
      "--config",
      os.path.join(REPO, "configs", "tiny.py"),
      "--workdir-root",
      str(root),
      "--steps",
      "2",
      "--only",
      "k1,no_gate",
      "--max-examples",
      "4",
      "--set",
      f"data.data_dir={tiny_root / 'tfds'}",
      "--set",
      f"data.source_dir={tiny_root / 'corpus'}",
      "--set",
      "data.builder_config=demo_tiny",
      "--set",
      "eval_every_steps=2",
    ]
  )
  saved = json.load(open(root / "ablations.json"))
  assert saved == json.loads(json.dumps(summary))
  rows = {row["variant"]: row for row in saved["variants"]}
  assert set(rows) == {"k1", "no_gate"}
  assert rows["k1"]["top_k"] == 1 and rows["no_gate"]["top_k"] == 2
  for row in rows.values():
    assert row["steps"] == 2 and row["checkpoint_step"] == 2 and row["num_examples"] == 4
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["weighted_f1"] <= 1.0
    assert 0.0 <= row["precision_at_k"] <= 1.0
  saved_config = json.load(open(root / "no_gate" / "config.json"))
  assert saved_config["model"]["use_gate"] is False
  assert "| k1 | 1 | 2 |" in open(root / "ablations.md").read()
  with pytest.raises(ValueError, match="Unknown ablation"):
    ablations.run_ablations(tiny.get_config(), str(root), ["k3"])
