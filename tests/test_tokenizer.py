"""Tokenizer: offline load from the package folder, ids, padding, context truncation."""

import json
from pathlib import Path

import numpy as np
import pytest

from mer_jax.data import tokenizer as tok_lib
from mer_jax.models.minilm import model_dir

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minilm_reference.json"


@pytest.fixture(scope="module")
def tok():
  return tok_lib.load_tokenizer()


@pytest.fixture(scope="module")
def vocab():
  lines = (model_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
  return {word: i for i, word in enumerate(lines)}


def test_loads_offline_and_is_cached(tok, vocab, monkeypatch):
  # A hub that cannot answer: loading must read the package folder only.
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
  tok_lib._load.cache_clear()
  assert len(tok_lib.load_tokenizer(model_dir())) == 30522
  tok_lib._load.cache_clear()
  tok = tok_lib.load_tokenizer()
  assert tok_lib.load_tokenizer() is tok
  assert tok_lib.load_tokenizer(model_dir()) is tok
  assert tok_lib.VOCAB_SIZE == len(vocab) == len(tok) == 30522
  assert tok_lib.pad_id == vocab["[PAD]"] == 0
  assert (vocab["[CLS]"], vocab["[SEP]"]) == (tok_lib.CLS_ID, tok_lib.SEP_ID) == (101, 102)


def test_ids_match_vocab_lookup(tok, vocab):
  ids, mask = tok_lib.tokenize(tok, ["Hello World, I am HAPPY!"], max_length=12)
  words = ["[CLS]", "hello", "world", ",", "i", "am", "happy", "!", "[SEP]"]  # uncased
  want = [vocab[w] for w in words]
  assert ids[0, : len(want)].tolist() == want
  assert want[0] == 101 and want[-1] == 102
  assert ids[0, len(want) :].tolist() == [0] * (12 - len(want))
  assert mask[0].tolist() == [True] * len(want) + [False] * (12 - len(want))


def test_same_ids_as_the_pytorch_reference_tokenizer(tok):
  ref = json.loads(FIXTURE.read_text(encoding="utf-8"))
  length = len(ref["input_ids"][0])
  ids, mask = tok_lib.tokenize(tok, ref["sentences"], max_length=length)
  assert ids.tolist() == ref["input_ids"]
  assert mask.astype(int).tolist() == ref["attention_mask"]


def test_padding_mask_and_truncation(tok):
  texts = ["Okay.", "word " * 100, ""]
  ids, mask = tok_lib.tokenize(tok, texts, max_length=16)
  assert ids.shape == mask.shape == (3, 16)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_
  np.testing.assert_array_equal(mask.sum(1), [4, 16, 2])
  np.testing.assert_array_equal(ids[~mask], 0)
  # A valid prefix, then padding: mask is contiguous from the start.
  assert all(row[: row.sum()].all() and not row[row.sum() :].any() for row in mask)
  assert ids[1, 0] == 101 and ids[1, -1] == 102  # truncated but still closed with [SEP]
  assert ids[2, :2].tolist() == [101, 102]
  empty_ids, empty_mask = tok_lib.tokenize(tok, [], max_length=8)
  assert empty_ids.shape == empty_mask.shape == (0, 8)


def _pieces(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def test_context_is_truncated_utterance_kept_whole(tok):
  utterance = "Why are you so angry with me?"
  context = "We talked about the trip yesterday and then everyone left the party early. " * 3
  ids, mask = tok_lib.tokenize(tok, [utterance], max_length=24, contexts=[context])
  utt = _pieces(tok, utterance)
  assert mask[0].all()  # filled to max_length by the context
  assert ids[0, : len(utt) + 2].tolist() == [101, *utt, 102]
  assert ids[0, len(utt) + 2 : -1].tolist() == _pieces(tok, context)[: 24 - len(utt) - 3]
  assert ids[0, -1] == 102


def test_mixed_contexts_and_overlong_utterance_never_raise(tok):
  long_utt = "this is a very long utterance " * 20
  texts = ["Short one.", "No context here.", long_utt, "Empty context."]
  contexts = ["Earlier line.", None, "some context", ""]
  ids, mask = tok_lib.tokenize(tok, texts, max_length=16, contexts=contexts)
  assert ids.shape == (4, 16)
  short, ctx = _pieces(tok, "Short one."), _pieces(tok, "Earlier line.")
  assert ids[0, mask[0]].tolist() == [101, *short, 102, *ctx, 102]
  alone = [101, *_pieces(tok, "No context here."), 102]
  assert ids[1, mask[1]].tolist() == alone  # None: single segment
  assert ids[2].tolist() == [101, *_pieces(tok, long_utt)[:14], 102]  # plain truncation, no context
  assert ids[3, mask[3]].tolist() == [101, *_pieces(tok, "Empty context."), 102]  # '' = no context
  # The same texts without contexts give the same rows where no context was used.
  plain, _ = tok_lib.tokenize(tok, texts, max_length=16)
  np.testing.assert_array_equal(plain[1:], ids[1:])


def test_bad_arguments_say_what_to_do(tok):
  with pytest.raises(ValueError, match="one context"):
    tok_lib.tokenize(tok, ["a", "b"], max_length=8, contexts=["x"])
  with pytest.raises(ValueError, match="max_length"):
    tok_lib.tokenize(tok, ["a"], max_length=1)
