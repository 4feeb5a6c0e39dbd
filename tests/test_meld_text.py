"""configs/meld_text.py builds without MELD; data/sources.py finds MELD's CSVs or says what to do without them.

MELD's CSVs come from $MELD_DIR or --config.data.source_dir only; the tests that read them point MELD_DIR at
../shared/data/meld, beside this repository (here and in CI).
"""

import importlib
import os

import pytest

from configs import meld_text
from data import sources
from mer_jax.data import input_pipeline
from mer_jax.data import tokenizer as tokenizer_lib
from mer_jax.training import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MELD = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "meld"))


def test_get_config_without_meld(monkeypatch, tmp_path):
  monkeypatch.setenv("MELD_DIR", str(tmp_path / "nowhere"))
  monkeypatch.setenv("MER_JAX_CACHE", str(tmp_path / "cache"))
  config = importlib.reload(meld_text).get_config()
  assert config.data.source_dir == str(tmp_path / "nowhere")  # the error comes at launch, not here
  assert config.data.data_dir == str(tmp_path / "cache" / "tfds")
  assert config.data.builder_config == "meld_text" and config.data.prepare == "meld_text"
  assert config.model.size == "base" and config.model.text.kind == "minilm" and config.model.text.pretrained
  assert tuple(config.data.tasks) == ("emotion", "sentiment") == tuple(config.model.tasks)
  assert dict(config.model.tasks) == {"emotion": 7, "sentiment": 3}
  assert config.best_metric == "emotion/weighted_f1"
  steps = run_config.resolve_steps(config, 9989)  # MELD's train utterances
  assert 0 < steps.warmup_steps < steps.num_train_steps
  assert steps.num_train_steps % steps.eval_every_steps == 0  # an evaluation at the end of each pass
  with pytest.raises(FileNotFoundError, match="MELD_DIR"):
    sources.check_meld_csvs(config.data.source_dir)


def test_without_meld_dir_the_message_says_how_to_point_at_the_csvs(monkeypatch):
  monkeypatch.delenv("MELD_DIR", raising=False)
  config = importlib.reload(meld_text).get_config()
  assert config.data.source_dir == ""  # no fallback to a folder that only this repository's setup has
  with pytest.raises(FileNotFoundError, match=r"set MELD_DIR or --config.data.source_dir"):
    sources.check_meld_csvs(config.data.source_dir)


def test_meld_dir_is_made_absolute(monkeypatch):
  monkeypatch.setenv("MELD_DIR", SHARED_MELD)
  assert importlib.reload(meld_text).get_config().data.source_dir == os.path.abspath(SHARED_MELD)


def test_check_meld_csvs(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing: train_sent_emo.csv, dev_sent_emo.csv"):
    sources.check_meld_csvs(str(tmp_path))
  nested = tmp_path / "MELD.Raw"  # one folder down is fine, as MELD.Raw unpacks
  nested.mkdir()
  (nested / "train_sent_emo.csv").write_text("x")
  with pytest.raises(FileNotFoundError, match="missing: dev_sent_emo.csv"):
    sources.check_meld_csvs(str(tmp_path))
  (nested / "dev_sent_emo.csv").write_text("x")
  sources.check_meld_csvs(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    sources.check_meld_csvs(str(tmp_path / "absent"))


def test_context_keeps_the_utterance_and_the_recent_turns():
  """The utterance comes first and is never cut; contexts are the previous turns, most recent first."""
  config = meld_text.get_config()
  speakers = ["Ross", "Rachel", "Ross", "Rachel", "Ross"]
  texts = ["We were on a break!", "No we were not.", "Fine.", "Whatever.", "I am so happy for you!"]
  contexts = input_pipeline.dialogue_contexts(speakers, texts, [0] * 5, [0, 1, 2, 3, 5], config.data.context_turns)
  assert contexts[0] is None
  assert config.data.context_turns == 2
  assert contexts[4] == "Rachel: Whatever.\nRoss: Fine."  # the 2 previous turns, most recent first
  tok = tokenizer_lib.load_tokenizer()
  ids, mask = tokenizer_lib.tokenize(tok, texts, config.data.max_text_length, contexts=contexts)
  assert ids.shape == (5, config.data.max_text_length)
  decoded = tok.decode(ids[4][mask[4]])
  assert decoded.startswith("[CLS] i am so happy for you! [SEP] rachel : whatever.")
  # The config's own context also reads the 2 next turns, interleaved nearest first.
  assert config.data.context_future_turns == 2
  both = input_pipeline.dialogue_contexts(
    speakers, texts, [0] * 5, [0, 1, 2, 3, 5], config.data.context_turns, config.data.context_future_turns
  )
  assert both[0] == "Rachel: No we were not.\nRoss: Fine."
  assert (
    both[2] == "Rachel: No we were not.\nRachel: Whatever.\nRoss: We were on a break!\nRoss: I am so happy for you!"
  )


@pytest.mark.skipif(not os.path.isdir(SHARED_MELD), reason="MELD's CSVs are not beside the repo")
def test_shared_meld_csvs_are_found(monkeypatch):
  monkeypatch.setenv("MELD_DIR", SHARED_MELD)
  sources.check_meld_csvs(importlib.reload(meld_text).get_config().data.source_dir)
