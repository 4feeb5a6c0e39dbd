"""tf.data input pipeline (mer_jax/data/input_pipeline.py) on a tiny synthetic TFDS dataset of prepared examples.

The dataset is written by the test itself (tfds store_as_tfds_dataset) with the "Prepared example"
features of docs/ARCHITECTURE.md; the last test runs the real builder on a tiny demo corpus.
"""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mer_jax.data import features
from mer_jax.data import input_pipeline as ip
from mer_jax.data import tokenizer as tokenizer_lib

T, S, MAX_SECONDS, MEL, L = 4, 16, 0.25, 16, 24
F_MAX = features.num_audio_frames(MAX_SECONDS, 16000, 400, 160)  # 23
SPEAKERS = ("Joey", "Rachel", "")
NUM_TRAIN, NUM_VAL = 22, 11


def make_config(**data_overrides):
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(
    dict(
      builder="synthetic_prepared",
      builder_config="demo",
      data_dir="",
      num_frames=T,
      frame_size=S,
      sample_rate=16000,
      max_audio_seconds=MAX_SECONDS,
      num_mel_bins=MEL,
      max_text_length=L,
      context_turns=0,
      tasks=("emotion", "sentiment"),
      shuffle_buffer=100,
      augment=True,
    )
  )
  config.data.update(data_overrides)
  config.batch_size = 4
  config.eval_batch_size = 4
  config.seed = 0
  return config


def make_examples(split, num, seed):
  """Prepared examples (numpy), dialogues of 2-5 utterances with gaps in Utterance_ID."""
  rng = np.random.default_rng(seed)
  examples, dia, utt = [], 0, 0
  for i in range(num):
    if i and rng.random() < 0.3:
      dia, utt = dia + 1, 0
    has_video, has_audio = i % 5 != 3, i % 7 != 4
    n_audio = int(rng.integers(0, 6000)) if has_audio else 0  # some longer than 4000 (cropped)
    examples.append(
      dict(
        id=f"{split}/dia{dia}_utt{utt}",
        text=f"utterance {i} of dialogue {dia} says word{i}",
        speaker=SPEAKERS[i % 3],
        dialogue_id=dia,
        utterance_id=utt,
        frames=(rng.integers(0, 256, (T, S, S, 1)) if has_video else np.zeros((T, S, S, 1))).astype(np.uint8),
        frame_times=((np.arange(T) + 0.5) / T).astype(np.float32),
        face_found=np.array([True, False] * (T // 2)),
        audio=rng.integers(-9000, 9000, n_audio).astype(np.int16),
        has_video=has_video,
        has_audio=has_audio,
        labels=dict(emotion=int(rng.integers(-1, 7)), sentiment=int(rng.integers(0, 3))),
      )
    )
    utt += int(rng.integers(1, 3))  # gaps in utterance ids
  return examples


FEATURES = tfds.features.FeaturesDict(
  dict(
    id=tfds.features.Text(),
    text=tfds.features.Text(),
    speaker=tfds.features.Text(),
    dialogue_id=tfds.features.Tensor(shape=(), dtype=np.int32),
    utterance_id=tfds.features.Tensor(shape=(), dtype=np.int32),
    frames=tfds.features.Tensor(shape=(T, S, S, 1), dtype=np.uint8),
    frame_times=tfds.features.Tensor(shape=(T,), dtype=np.float32),
    face_found=tfds.features.Tensor(shape=(T,), dtype=np.bool_),
    audio=tfds.features.Tensor(shape=(None,), dtype=np.int16),
    has_video=tfds.features.Tensor(shape=(), dtype=np.bool_),
    has_audio=tfds.features.Tensor(shape=(), dtype=np.bool_),
    labels=tfds.features.FeaturesDict(
      dict(
        emotion=tfds.features.Tensor(shape=(), dtype=np.int32), sentiment=tfds.features.Tensor(shape=(), dtype=np.int32)
      )
    ),
  )
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(data_dir, {split: {id: example}}) of a TFDS dataset written once for this module."""
  return write_prepared(str(tmp_path_factory.mktemp("tfds")))


def write_prepared(data_dir: str) -> tuple:
  """Writes the synthetic prepared dataset under `data_dir` -> (data_dir, {split: {id: example}})."""
  splits = {"train": make_examples("train", NUM_TRAIN, 0), "validation": make_examples("validation", NUM_VAL, 1)}
  tfds.dataset_builders.store_as_tfds_dataset(
    name="synthetic_prepared",
    version="1.0.0",
    config="demo",
    features=FEATURES,
    data_dir=data_dir,
    split_datasets={k: [(ex["id"], ex) for ex in v] for k, v in splits.items()},
  )
  return data_dir, {k: {ex["id"]: ex for ex in v} for k, v in splits.items()}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


def read(config, split, data_dir, *, train, limit=None, **kwargs):
  ds = ip.make_dataset(config, split, train=train, data_dir=data_dir, **kwargs)
  if limit is not None:
    ds = ds.take(limit)
  return list(ip.as_numpy(ds))


def test_batch_contract_keys_shapes_dtypes(prepared):
  data_dir, _ = prepared
  for train in (True, False):
    batch = read(make_config(), "train", data_dir, train=train, limit=1)[0]
    expected = {
      "frames": ((4, T, S, S, 1), np.uint8),
      "audio": ((4, F_MAX, MEL), np.float32),
      "audio_mask": ((4, F_MAX), np.bool_),
      "text_ids": ((4, L), np.int32),
      "text_mask": ((4, L), np.bool_),
      "labels/emotion": ((4,), np.int32),
      "labels/sentiment": ((4,), np.int32),
      "has_video": ((4,), np.bool_),
      "has_audio": ((4,), np.bool_),
      "example_mask": ((4,), np.bool_),
      "id": ((4,), np.object_),
    }
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
      assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert "id" not in ip.model_inputs(batch)


def test_eval_pads_last_batch_and_keeps_every_example_once(prepared):
  data_dir, splits = prepared
  batches = read(make_config(), "validation", data_dir, train=False)
  assert len(batches) == 3  # ceil(11 / 4)
  ids = np.concatenate([b["id"] for b in batches])
  mask = np.concatenate([b["example_mask"] for b in batches])
  assert mask.sum() == NUM_VAL and not mask[-1]
  real = [i.decode() for i in ids[mask]]
  assert sorted(real) == sorted(splits["validation"]) and len(set(real)) == NUM_VAL
  pad = batches[-1]
  assert np.all(pad["id"][~pad["example_mask"]] == b"")
  assert np.all(pad["labels/emotion"][~pad["example_mask"]] == -1)
  # Labels (including -1 = no label) pass through unchanged.
  for b in batches:
    for i, m, emo, sent in zip(b["id"], b["example_mask"], b["labels/emotion"], b["labels/sentiment"]):
      if m:
        ex = splits["validation"][i.decode()]
        assert (emo, sent) == (ex["labels"]["emotion"], ex["labels"]["sentiment"])


def test_train_drops_remainder_and_repeats(prepared):
  data_dir, _ = prepared
  one_epoch = read(make_config(), "train", data_dir, train=True, num_epochs=1)
  assert len(one_epoch) == NUM_TRAIN // 4
  ids = np.concatenate([b["id"] for b in one_epoch])
  assert len(set(ids)) == len(ids) == 4 * (NUM_TRAIN // 4)
  forever = read(make_config(), "train", data_dir, train=True, limit=3 * NUM_TRAIN // 4)
  assert len(forever) == 3 * NUM_TRAIN // 4  # more than two epochs' worth
  assert all(b["example_mask"].all() and b["id"].shape == (4,) for b in forever)


def test_same_seed_same_batches_other_seed_differs(prepared):
  data_dir, _ = prepared
  first = read(make_config(), "train", data_dir, train=True, limit=8)
  again = read(make_config(), "train", data_dir, train=True, limit=8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  other = make_config()
  other.seed = 1
  differ = read(other, "train", data_dir, train=True, limit=8)
  assert any(not np.array_equal(a["id"], b["id"]) for a, b in zip(first, differ))


def test_process_shards_are_disjoint_and_cover_split(prepared):
  data_dir, splits = prepared
  config = make_config()
  shards = [read(config, "validation", data_dir, train=False, process_index=p, process_count=2) for p in (0, 1)]
  assert len(shards[0]) == len(shards[1])  # every process runs the same number of eval steps
  assert all(b["id"].shape == (2,) for s in shards for b in s)  # per-process batch = 4 // 2
  real = [set(i.decode() for b in s for i in b["id"][b["example_mask"]]) for s in shards]
  assert real[0] and real[1] and not real[0] & real[1]
  assert real[0] | real[1] == set(splits["validation"])
  assert sum(b["example_mask"].sum() for s in shards for b in s) == NUM_VAL
  train = [
    set(
      np.concatenate(
        [b["id"] for b in read(config, "train", data_dir, train=True, num_epochs=1, process_index=p, process_count=2)]
      )
    )
    for p in (0, 1)
  ]
  assert not train[0] & train[1]
  with pytest.raises(ValueError, match="divisible"):
    ip.make_dataset(config, "train", train=True, data_dir=data_dir, process_index=0, process_count=3)


def test_tokens_match_direct_tokenisation(prepared, tok):
  data_dir, splits = prepared
  for batch in read(make_config(), "validation", data_dir, train=False):
    for i, ids, mask, m in zip(batch["id"], batch["text_ids"], batch["text_mask"], batch["example_mask"]):
      if not m:
        continue
      want_ids, want_mask = tokenizer_lib.tokenize(tok, [splits["validation"][i.decode()]["text"]], L)
      np.testing.assert_array_equal(ids, want_ids[0])
      np.testing.assert_array_equal(mask, want_mask[0])


def test_dialogue_contexts_follow_utterance_order_with_gaps():
  # Rows out of order; dialogue 7 has utterance ids 0, 2, 5; dialogue 8 is separate.
  speakers = ["B", "A", "", "C", "A"]
  texts = ["two", "zero", "five", "other", "one-more"]
  dialogue_ids = [7, 7, 7, 8, 8]
  utterance_ids = [2, 0, 5, 0, 3]
  contexts = ip.dialogue_contexts(speakers, texts, dialogue_ids, utterance_ids, turns=2)
  assert contexts == ["A: zero", None, "B: two\nA: zero", None, "C: other"]
  one = ip.dialogue_contexts(speakers, texts, dialogue_ids, utterance_ids, turns=1)
  assert one[2] == "B: two"
  assert ip.dialogue_contexts(speakers, texts, dialogue_ids, utterance_ids, turns=0) == [None] * 5
  # Later turns too: nearest first, alternating sides (previous 1, next 1, previous 2, ...).
  both = ip.dialogue_contexts(speakers, texts, dialogue_ids, utterance_ids, turns=2, future_turns=2)
  assert both == ["A: zero\nfive", "B: two\nfive", "B: two\nA: zero", "A: one-more", "C: other"]
  assert ip.dialogue_contexts(speakers, texts, dialogue_ids, utterance_ids, turns=0, future_turns=1)[1] == "B: two"


def test_duplicate_ids_are_a_clear_error():
  with pytest.raises(ValueError, match="unique"):
    ip.TokenTable([b"train/dia0_utt0", b"train/dia0_utt0"], np.zeros((2, 4), np.int32), np.zeros((2, 4), bool))


def test_context_tokens_in_pipeline(prepared, tok):
  data_dir, splits = prepared
  examples = sorted(splits["validation"].values(), key=lambda e: (e["dialogue_id"], e["utterance_id"]))
  line = lambda e: f"{e['speaker']}: {e['text']}" if e["speaker"] else e["text"]
  expected_context = {}
  for pos, ex in enumerate(examples):
    prev = [e for e in examples[:pos] if e["dialogue_id"] == ex["dialogue_id"]][-2:][::-1]
    expected_context[ex["id"]] = "\n".join(line(e) for e in prev) or None
  assert any(c and "\n" in c for c in expected_context.values())  # the test exercises 2 turns
  config = make_config(context_turns=2, max_text_length=48)
  seen = 0
  for batch in read(config, "validation", data_dir, train=False):
    for i, ids, m in zip(batch["id"], batch["text_ids"], batch["example_mask"]):
      if m:
        ex = splits["validation"][i.decode()]
        want, _ = tokenizer_lib.tokenize(tok, [ex["text"]], 48, contexts=[expected_context[ex["id"]]])
        np.testing.assert_array_equal(ids, want[0])
        seen += 1
  assert seen == NUM_VAL


def test_audio_features_and_mask_match_audio_length(prepared):
  data_dir, splits = prepared
  config = make_config()
  for batch in read(config, "validation", data_dir, train=False):
    for row in np.flatnonzero(batch["example_mask"]):
      ex = splits["validation"][batch["id"][row].decode()]
      n = min(len(ex["audio"]), int(MAX_SECONDS * 16000))
      valid = max(0, 1 + (n - 400) // 160) if n >= 400 else 0
      assert batch["audio_mask"][row].sum() == valid and batch["audio_mask"][row][:valid].all()
      assert batch["has_audio"][row] == ex["has_audio"] and batch["has_video"][row] == ex["has_video"]
      log_mel, _ = features.audio_features(ex["audio"], config.data)  # eval: no augmentation
      np.testing.assert_allclose(batch["audio"][row], log_mel.numpy(), rtol=1e-5, atol=1e-4)
      np.testing.assert_array_equal(batch["frames"][row], ex["frames"])


def _by_id(batches):
  return {i: {k: b[k][r] for k in b} for b in batches for r, i in enumerate(b["id"])}


def test_augmentation_only_when_training(prepared):
  data_dir, splits = prepared
  augmented = _by_id(read(make_config(), "train", data_dir, train=True, num_epochs=1))
  plain = _by_id(read(make_config(augment=False), "train", data_dir, train=True, num_epochs=1))
  frames_changed = audio_changed = 0
  for i, row in augmented.items():
    ex = splits["train"][i.decode()]
    np.testing.assert_array_equal(plain[i]["frames"], ex["frames"])
    raw_mel, raw_mask = features.audio_features(ex["audio"], make_config().data)
    np.testing.assert_allclose(plain[i]["audio"], raw_mel.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(row["audio_mask"], raw_mask.numpy())  # jitter keeps the length
    if ex["has_video"]:
      diff = np.abs(row["frames"].astype(int) - ex["frames"].astype(int))
      frames_changed += diff.max() > 0
      assert diff.mean() < 40  # mild
    else:
      assert not row["frames"].any()  # missing video stays zeros
    if raw_mask.numpy().any():
      audio_changed += not np.allclose(row["audio"], raw_mel.numpy(), atol=1e-3)
  assert frames_changed > 0 and audio_changed > 0


def test_augment_noise_level_and_seeding():
  """The noise-bank jitter: SNR inside NOISE_SNR_DB_RANGE, same seed same output, missing video stays 0."""
  rng = np.random.default_rng(3)
  waveform = tf.constant(0.3 * np.sin(np.arange(16000) / 7.0).astype(np.float32))
  frames = tf.constant(rng.integers(0, 256, (T, S, S, 1)).astype(np.uint8))
  noise = tf.constant(ip.noise_bank(2**16))
  run = lambda seed, video=True, wave=waveform: ip.augment(
    frames if video else tf.zeros_like(frames), wave, tf.constant(video), tf.constant(seed, tf.int64), noise
  )
  snrs = []
  for seed in ([0, 1], [0, 2], [5, 9]):
    out_frames, out = (x.numpy() for x in run(seed))
    clean = waveform.numpy()
    gain = float(out @ clean / (clean @ clean))  # least squares: the noise is uncorrelated with the tone
    residual = out - gain * clean
    snrs.append(20 * np.log10(np.sqrt(np.mean((gain * clean) ** 2) / np.mean(residual**2))))
    assert 10 ** (ip.GAIN_DB_RANGE[0] / 20) - 0.01 < gain < 10 ** (ip.GAIN_DB_RANGE[1] / 20) + 0.01
    shift = out_frames.astype(float) - frames.numpy()
    assert 0 < np.abs(shift).max() and np.abs(shift).mean() < 40
  assert all(ip.NOISE_SNR_DB_RANGE[0] - 1 < snr < ip.NOISE_SNR_DB_RANGE[1] + 1 for snr in snrs), snrs
  assert len({round(snr, 3) for snr in snrs}) == 3
  np.testing.assert_array_equal(run([0, 1])[1].numpy(), run([0, 1])[1].numpy())
  assert not run([0, 1], video=False)[0].numpy().any()
  assert run([0, 1], wave=tf.zeros([0]))[1].shape == (0,)


def test_dataset_from_examples_in_memory(tok):
  """The predict/unit-test path: a plain tf.data of prepared examples, no TFDS on disk."""
  examples = make_examples("test", 5, 3)
  ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=FEATURES.get_tensor_spec())
  batches = list(ip.as_numpy(ip.dataset_from_examples(ds, make_config(), train=False, batch_size=2)))
  assert len(batches) == 3 and sum(b["example_mask"].sum() for b in batches) == 5
  want, _ = tokenizer_lib.tokenize(tok, [examples[0]["text"]], L)
  np.testing.assert_array_equal(batches[0]["text_ids"][0], want[0])


def test_dataset_info_and_missing_data_message(prepared, tmp_path):
  data_dir, _ = prepared
  info = ip.dataset_info(make_config(), data_dir=data_dir)
  assert info["splits"] == {"train": NUM_TRAIN, "validation": NUM_VAL}
  assert info["classes"]["emotion"][0] == "neutral" and len(info["classes"]["sentiment"]) == 3
  assert info["audio_shape"] == (F_MAX, MEL)
  with pytest.raises(FileNotFoundError, match="data.prepare"):
    ip.make_dataset(make_config(), "train", train=True, data_dir=str(tmp_path))


def test_wrong_frame_shape_is_a_clear_error(prepared):
  data_dir, _ = prepared
  with pytest.raises(ValueError, match="num_frames"):
    ip.make_dataset(make_config(num_frames=12), "train", train=True, data_dir=data_dir)


@pytest.mark.slow
def test_demo_corpus_prepare_one_epoch(tmp_path):
  from data import make_demo_corpus, prepare

  make_demo_corpus.make_corpus(str(tmp_path / "corpus"), num_train=6, num_dev=3, num_test=2, seed=0)
  builder, report_path = prepare.prepare(str(tmp_path / "corpus"), str(tmp_path / "tfds"), "demo")
  config = make_config()
  config.data.update(
    dict(
      builder="meld_format",
      builder_config="demo",
      num_frames=12,
      frame_size=112,
      max_audio_seconds=4.0,
      num_mel_bins=64,
      max_text_length=64,
    )
  )
  info = ip.dataset_info(config, data_dir=str(tmp_path / "tfds"))
  assert report_path
  assert info["splits"] == {"train": 6, "dev": 3, "test": 2}
  assert info["classes"]["emotion"][0] == "neutral"
  with open(report_path) as f:
    report = json.load(f)
  for split, num in info["splits"].items():
    assert report["splits"][split]["examples"] == num
    for train in (True, False):
      batches = read(config, split, str(tmp_path / "tfds"), train=train, num_epochs=1)
      rows = sum(int(b["example_mask"].sum()) for b in batches)
      assert rows == (num // 4 * 4 if train else num), (split, train)  # test: 2 < 4, no batch
      ids = [i for b in batches for i in b["id"][b["example_mask"]]]
      assert len(set(ids)) == len(ids) and all(i.decode().startswith(f"{split}/dia") for i in ids)
      for b in batches:
        m = b["example_mask"]
        assert b["frames"].shape == (4, 12, 112, 112, 1) and b["audio"].shape == (4, 398, 64)
        assert np.isfinite(b["audio"]).all() and b["text_mask"][m].any(-1).all()
        # A clip with audio gives valid log-mel frames (its sound may be a corrupted one).
        assert b["audio_mask"][m & b["has_audio"]].any(-1).all()
        assert not b["audio_mask"][m & ~b["has_audio"]].any()
        assert ((b["labels/emotion"][m] >= -1) & (b["labels/emotion"][m] < 7)).all()
      # The corpus has deliberately black clips, but most clips show something.
      lit = [f.max() > 0 for b in batches for f, v, m in zip(b["frames"], b["has_video"], b["example_mask"]) if v and m]
      assert sum(lit) >= len(lit) - 1 and (train or sum(lit) > 0)


def test_smaller_frame_size_is_resized_from_prepared_frames(prepared):
  data_dir, examples = prepared
  small = S // 2
  config = make_config(frame_size=small)
  batch = next(ip.as_numpy(ip.make_dataset(config, "validation", train=False, data_dir=data_dir)))
  assert batch["frames"].shape[2:] == (small, small, 1) and batch["frames"].dtype == np.uint8
  first = examples["validation"][batch["id"][0].decode()]["frames"].astype(np.float32)
  # Area resize by 2 is the mean of each 2x2 block.
  expected = first.reshape(T, small, 2, small, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(batch["frames"][0], np.round(expected), atol=1.0)
  with pytest.raises(ValueError, match="frame_size"):
    ip.make_dataset(make_config(frame_size=S * 2), "train", train=True, data_dir=data_dir)
