"""Training (mer_jax/training/train.py, launch.py) on a tiny demo corpus that the module makes once.

The corpus is generated and prepared through launch.py's config-driven path (config.data.prepare =
'demo'), with the tiny config's shapes (4 frames of 32 px). In-process runs share one compiled train
and eval step (steps_lib.compiled_steps caches them per step config), so only the first run compiles.
The 8-device test runs in a subprocess with --xla_backend_optimization_level=0, which
cuts compile time on CPU; the 1-device side of the 8-device comparison reuses this process's compiled
step (default level: its tolerance covers the difference in instruction selection).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import launch
from configs import tiny
from mer_jax.training import checkpoint
from mer_jax.data import input_pipeline
from mer_jax.data import raw_batches
from mer_jax.training import losses as losses_lib
from mer_jax.training import train
from mer_jax.training import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
FAST_COMPILE = "--xla_backend_optimization_level=0"


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.data.builder_config = "demo_tiny"
  config.data.data_dir = data_dir
  config.batch_size = 8  # a global batch that 8 devices can split (test_eight_devices_same_loss_as_one)
  config.num_train_steps = STEPS
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.update(overrides)
  return config


def prepare_tiny_corpus(root) -> str:
  """demo_tiny generated and prepared under `root` via launch.prepare_data_if_missing: 12 train, 6 dev, 2 test
  clips. Returns the data_dir."""
  config = tiny_config(str(root / "tfds"))
  config.data.prepare = "demo"
  config.data.source_dir = str(root / "corpus")
  config.data.prepare_workers = 1
  config.data.demo_corpus = ml_collections.ConfigDict(
    dict(num_train=12, num_dev=6, num_test=2, seed=0, resolution=(64, 64), workers=1)
  )
  launch.prepare_data_if_missing(config, str(root / "work"))
  assert os.path.exists(os.path.join(root, "corpus", "train_sent_emo.csv"))
  return str(root / "tfds")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return prepare_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
  """10 uninterrupted steps, evaluated at the end."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train.train_and_evaluate(tiny_config(data_dir), workdir)


def _checkpoint_steps(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol), a, b)


# ----------------------------------------------------------------------------- pure pieces


def test_task_loss_ignores_unlabeled_and_padding_rows():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 3, -1, 2, 1, 1])
  mask = np.array([True, True, True, True, True, False])
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = (labels >= 0) & mask
  ce = -log_p[np.arange(6), np.maximum(labels, 0)]
  loss, per_row = losses_lib.task_loss(logits, labels, mask)
  assert float(loss) == pytest.approx(ce[keep].mean(), rel=1e-6)
  np.testing.assert_allclose(per_row, np.where(keep, ce, 0.0), rtol=1e-6)
  weights = np.array([1.0, 2.0, 3.0, 0.5])
  loss, _ = losses_lib.task_loss(logits, labels, mask, class_weights=tuple(weights))
  w = weights[np.maximum(labels, 0)] * keep
  assert float(loss) == pytest.approx((w * ce).sum() / w.sum(), rel=1e-6)
  smoothed = (1 - 0.1) * ce + 0.1 * -log_p.mean(-1)
  loss, _ = losses_lib.task_loss(logits, labels, mask, label_smoothing=0.1)
  assert float(loss) == pytest.approx(smoothed[keep].mean(), rel=1e-5)
  loss, _ = losses_lib.task_loss(logits, -np.ones(6, int), mask)
  assert float(loss) == 0.0  # no labelled row: no signal, no NaN


def test_frame_selection_loss_pulls_the_scorer_to_the_frames_whose_evidence_agrees_with_the_label():
  # Three clips, T=4 frames, K=2 backbone tokens, equal scores. In clip 0 frames 1 and 3 show the label
  # (class 2), in clip 1 frames 0 and 2 do; clip 2 has no label and gives no loss.
  evidence = np.zeros((3, 4, 3), np.float32)
  evidence[0, [1, 3], 2] = 4.0
  evidence[0, [0, 2], 0] = 4.0
  evidence[1, [0, 2], 2] = 4.0
  evidence[1, [1, 3], 1] = 4.0
  relevance = np.zeros((3, 2, 3), np.float32)
  relevance[0, :, 2] = 4.0
  labels = jnp.asarray([2, 2, -1])
  scores = jnp.zeros((3, 4))
  valid = jnp.asarray([True, True, True])
  losses = losses_lib.frame_selection_loss(jnp.asarray(evidence), jnp.asarray(relevance), scores, labels, valid)
  log_p = lambda logits: jax.nn.log_softmax(logits[:2], axis=-1)[..., 2]
  np.testing.assert_allclose(losses["evidence"], -np.mean(log_p(evidence)), rtol=1e-5)
  np.testing.assert_allclose(losses["head"], -np.mean(log_p(relevance)), rtol=1e-5)
  scorer_loss = lambda s: losses_lib.frame_selection_loss(
    jnp.asarray(evidence), jnp.asarray(relevance), s, labels, valid
  )["scorer"]
  grad = jax.grad(scorer_loss)(scores)
  # Descending the loss raises the frames that show the label and lowers the others, in every frame.
  assert np.all(grad[0, [1, 3]] < 0) and np.all(grad[0, [0, 2]] > 0)
  assert np.all(grad[1, [0, 2]] < 0) and np.all(grad[1, [1, 3]] > 0)
  np.testing.assert_array_equal(grad[2], 0.0)  # unlabeled clip
  # Scores that already agree with the evidence cost less than scores that contradict it.
  agreeing = jnp.asarray([[-5.0, 5.0, -5.0, 5.0], [5.0, -5.0, 5.0, -5.0], [0, 0, 0, 0]])
  assert scorer_loss(agreeing) < scorer_loss(scores) < scorer_loss(-agreeing)
  # The scorer's targets carry no gradient into the evidence head.
  evidence_grad = jax.grad(
    lambda e: losses_lib.frame_selection_loss(e, jnp.asarray(relevance), agreeing, labels, valid)["scorer"]
  )(jnp.asarray(evidence))
  np.testing.assert_array_equal(evidence_grad, 0.0)


def test_the_scorer_word_table_learns_with_sgd_and_everything_else_with_adamw():
  options = train.step_options(tiny.get_config())
  params = {"scorer_words": {"embedding": jnp.ones((5, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  grads = {
    "scorer_words": {"embedding": jnp.zeros((5, 2)).at[1].set(100.0)},
    "head": {"kernel": jnp.full((2, 2), 100.0)},
  }
  tx = steps_lib.make_optimizer(dataclasses.replace(options, warmup_steps=0, grad_clip_norm=1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  rate = options.scorer_word_learning_rate
  # SGD: a step proportional to the gradient, unclipped; rows of words not in the batch do not move.
  np.testing.assert_allclose(updates["scorer_words"]["embedding"][1], -rate * 100.0, rtol=1e-5)
  np.testing.assert_array_equal(updates["scorer_words"]["embedding"][0], 0.0)
  # AdamW: a step of about the learning rate, whatever the gradient's size.
  np.testing.assert_allclose(updates["head"]["kernel"], -options.learning_rate * (1 + options.weight_decay), rtol=1e-3)


def test_learning_rate_warmup_then_cosine():
  options = train.step_options(tiny_config("", learning_rate=1e-3, warmup_steps=10, num_train_steps=110))
  schedule = steps_lib.learning_rate_schedule(options)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)
  assert float(schedule(110)) == pytest.approx(1e-5, rel=1e-4)


def test_config_differences_name_the_fields():
  config = tiny.get_config()
  saved = checkpoint.model_config_dict(config)
  config.model.width = 48
  config.model.dropout_rate = 0.3  # resumable: not reported
  config.model.audio.channels = (16, 32)
  differences = checkpoint.config_differences(saved, checkpoint.model_config_dict(config))
  assert len(differences) == 2
  assert any("config.model.width: checkpoint 32, now 48" in d for d in differences)
  assert any("config.model.audio.channels" in d for d in differences)


def test_balanced_class_weights(data_dir):
  config = tiny_config(data_dir, class_weights="balanced")
  counts = losses_lib.label_counts(config, data_dir, "train")
  assert counts["emotion"].sum() == 12 and counts["sentiment"].sum() == 12
  weights = losses_lib.class_weights_for(config, data_dir)
  for task, task_counts in counts.items():
    present = task_counts > 0
    want = task_counts.sum() / (len(task_counts) * task_counts[present])
    np.testing.assert_allclose(np.asarray(weights[task])[present], want)


def test_meld_missing_says_how_to_get_it(tmp_path):
  from data import sources

  with pytest.raises(FileNotFoundError, match=r"(?s)MELD\.Raw\.tar\.gz.*MELD_DIR.*configs/demo\.py"):
    sources.check_meld_source("")
  (tmp_path / "MELD.Raw").mkdir()
  for name in ("train_sent_emo.csv", "dev_sent_emo.csv"):
    (tmp_path / "MELD.Raw" / name).write_text("Utterance\n")
  with pytest.raises(FileNotFoundError, match="missing: train_splits"):
    sources.check_meld_source(str(tmp_path))
  (tmp_path / "MELD.Raw" / "train_splits").mkdir()
  sources.check_meld_source(str(tmp_path))  # one folder down, as the tarball unpacks
  config = tiny.get_config()  # 4 frames of 32 px under the name of the 12 x 112 'demo' data
  config.data.prepare = "demo"
  with pytest.raises(ValueError, match="demo_4x32"):
    launch._builder_config(config)
  # The demo job trains at 64 px on the registered 112 px 'demo' data: the pipeline resizes, nothing to rename.
  from configs import demo

  demo_config = demo.get_config()
  assert demo_config.data.frame_size < 112
  assert launch._builder_config(demo_config).frame_size == 112
  demo_config.data.frame_size = 128
  with pytest.raises(ValueError, match="demo_12x128"):
    launch._builder_config(demo_config)


# ----------------------------------------------------------------------------- the real loop


def test_two_steps_write_checkpoint_and_eval_json(data_dir, tmp_path):
  workdir = str(tmp_path)
  result = train.train_and_evaluate(tiny_config(data_dir, stop_after_steps=2, eval_every_steps=2), workdir)
  assert result["step"] == 2 and len(result["losses"]) == 2 and np.all(np.isfinite(result["losses"]))
  assert _checkpoint_steps(workdir) == [2]
  with open(os.path.join(workdir, "checkpoints", "model_config.json")) as f:
    assert json.load(f)["width"] == 32
  with open(os.path.join(workdir, "eval", "step_2.json")) as f:
    record = json.load(f)
  emotion = record["tasks"]["emotion"]
  assert record["step"] == 2 and record["split"] == "dev" and record["best_metric"] == "emotion/weighted_f1"
  assert emotion["num_examples"] == 6 and 0.0 <= emotion["weighted_f1"] <= 1.0
  assert np.array(emotion["confusion_matrix"]).shape == (7, 7) and np.sum(emotion["confusion_matrix"]) == 6
  assert set(emotion["per_class"]) == {"neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"}
  assert record["value"] == emotion["weighted_f1"]
  with open(os.path.join(workdir, "eval", "best.json")) as f:
    assert json.load(f)["step"] == 2
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_resume_matches_uninterrupted_run(data_dir, straight_run, tmp_path):
  straight_dir, straight = straight_run
  assert straight["step"] == STEPS and len(straight["losses"]) == STEPS
  workdir = str(tmp_path)
  first = train.train_and_evaluate(tiny_config(data_dir, stop_after_steps=5), workdir)
  assert first["step"] == 5 and 5 in _checkpoint_steps(workdir)
  second = train.train_and_evaluate(tiny_config(data_dir), workdir)  # resumes at 5
  assert second["step"] == STEPS
  np.testing.assert_allclose(first["losses"] + second["losses"], straight["losses"], rtol=0, atol=1e-6)
  _assert_trees_close(second["state"].params, straight["state"].params, atol=1e-6)
  _assert_trees_close(second["state"].batch_stats, straight["state"].batch_stats, atol=1e-6)
  again = train.train_and_evaluate(tiny_config(data_dir), workdir)  # finished: nothing to do
  assert again["step"] == STEPS and again["losses"] == []


def test_same_seed_same_first_losses(data_dir, straight_run, tmp_path):
  _, straight = straight_run
  result = train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  assert result["losses"] == straight["losses"]  # bit for bit
  assert len(set(result["losses"])) > 1


def test_incompatible_config_fails_naming_the_field(data_dir, straight_run):
  straight_dir, _ = straight_run
  config = tiny_config(data_dir)
  config.model.width = 48
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"config\.model\.width: checkpoint 32, now 48"):
    train.train_and_evaluate(config, straight_dir)


def test_nan_stops_training_naming_the_step(data_dir, tmp_path, monkeypatch):
  train_batches = raw_batches.train_batches

  def poisoned(*args, **kwargs):  # NaN audio in the 3rd train batch (float PCM: int16 has no NaN)
    for index, batch in enumerate(train_batches(*args, **kwargs)):
      waveform = batch["waveform"].astype(np.float32) / 32768.0
      if index == 2:
        waveform[:] = np.nan
      yield {**batch, "waveform": waveform}

  monkeypatch.setattr(raw_batches, "train_batches", poisoned)
  workdir = str(tmp_path)
  with pytest.raises(steps_lib.NonFiniteLossError, match=r"at step 3 .*last good checkpoint is step 2"):
    train.train_and_evaluate(tiny_config(data_dir, checkpoint_every_steps=2), workdir)
  assert _checkpoint_steps(workdir) == [2]


def test_a_non_finite_step_leaves_the_whole_state_unchanged(data_dir, straight_run):
  """train_step skips the optimizer when the loss or gradients are not finite (a lax.cond, so the optimizer
  updates its buffers in place on good steps): params, optimizer state, BatchNorm statistics and step stay
  bit for bit what they were; a finite step on the same state moves them on."""
  config = tiny_config(data_dir)
  options = train.step_options(config, losses_lib.class_weights_for(config, data_dir))
  mesh = steps_lib.make_mesh()
  train_fn, _ = steps_lib.compiled_steps(options, mesh)  # the straight run's compiled step
  batch = next(iter(input_pipeline.make_dataset(config, "train", train=True).as_numpy_iterator()))
  poisoned = dict(batch, audio=np.full_like(batch["audio"], np.nan))
  rng = train.replicated_key(0, mesh)

  def fresh_state():  # the step donates its state, so each call gets its own
    return steps_lib.create_train_state(options, mesh, config.seed)

  before = jax.device_get(fresh_state())
  after, _, status = train_fn(fresh_state(), train.global_batch(poisoned, mesh), rng)
  assert not bool(status["finite"]) and not np.isfinite(float(status["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), before)
  moved, _, status = train_fn(fresh_state(), train.global_batch(batch, mesh), rng)
  assert bool(status["finite"]) and int(moved.step) == int(before.step) + 1
  # Step 0's learning rate is 0 (warmup), so the params stay; the optimizer's moments move.
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(moved.opt_state), before.opt_state)
  )
  assert sum(changed) > len(changed) // 2


def test_sigterm_saves_a_checkpoint_and_stops(data_dir, tmp_path, monkeypatch):
  global_batch, calls = train.global_batch, []

  def terminate_on_third(batch, mesh):
    # The loop's own call, once per step (the prefetch thread's calls run ahead of the steps).
    if threading.current_thread() is threading.main_thread():
      calls.append(1)
    if len(calls) == 3 and threading.current_thread() is threading.main_thread():
      os.kill(os.getpid(), signal.SIGTERM)
    return global_batch(batch, mesh)

  monkeypatch.setattr(train, "global_batch", terminate_on_third)
  handler = signal.getsignal(signal.SIGTERM)
  workdir = str(tmp_path)
  result = train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert result["preempted"] and result["step"] == 3
  assert _checkpoint_steps(workdir) == [3]
  assert signal.getsignal(signal.SIGTERM) is handler


# ----------------------------------------------------------------------------- several devices / processes


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  env.update(extra)
  return env


def _two_steps(config, data_dir, mesh):
  """Losses, last grad norm, |params| sum of 2 train steps on the first 2 train batches, on `mesh`."""
  batches = input_pipeline.as_numpy(input_pipeline.make_dataset(config, "train", train=True, data_dir=data_dir))
  batches = [next(batches) for _ in range(2)]
  options = train.step_options(config)
  state = steps_lib.create_train_state(options, mesh, 0)
  train_fn, _ = steps_lib.compiled_steps(options, mesh)
  rng = train.replicated_key(1, mesh)
  losses = []
  for batch in batches:
    global_batch = train.global_batch(batch, mesh)
    state, metrics, status = train_fn(state, global_batch, rng)
    losses.append(float(status["loss"]))
  return {
    "losses": losses,
    "grad_norm": float(metrics.compute()["grad_norm"]),
    "param_sum": float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(state.params))),
    "shards": len(global_batch["frames"].addressable_shards),
  }


EIGHT_DEVICES = """
import json, sys
import jax
from tests import test_train
assert jax.device_count() == 8
config = test_train.tiny_config(sys.argv[1])
print("RESULT " + json.dumps(test_train._two_steps(config, sys.argv[1], test_train.steps_lib.make_mesh())))
"""


@pytest.mark.slow
def test_eight_devices_same_loss_as_one(data_dir):
  """The same global batch of 8 on 8 host devices (a subprocess) and on 1 device (here, where the
  in-process tests already compiled the 1-device step)."""
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  proc = subprocess.run(
    [sys.executable, "-c", EIGHT_DEVICES, data_dir], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = json.loads(proc.stdout.split("RESULT ", 1)[1])
  one = _two_steps(tiny_config(data_dir), data_dir, steps_lib.make_mesh())
  assert one["shards"] == 1 and eight["shards"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)  # step 2 checks the update too
  assert eight["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
  assert eight["param_sum"] == pytest.approx(one["param_sum"], rel=1e-5)
