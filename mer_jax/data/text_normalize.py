"""Clean-up of utterance text read from MELD-format CSVs.

Copies of MELD's CSVs in circulation hold three kinds of damage (see ../shared/data/meld/README.md):
- cp1252 control characters: the file was cp1252, read as Latin-1 ('\\x92' where ’ was meant);
- mojibake: UTF-8 read as cp1252 and saved again ('â€™' for ’, 'Ã©' for é), sometimes twice;
- stray whitespace (CR, tabs, runs of spaces, non-breaking spaces).
`ftfy` (pinned in requirements.txt) repairs the first two well; without it, a small fallback does
the cp1252 round trip. `decode_csv_bytes` turns a CSV file's bytes into text, UTF-8 or cp1252,
line by line, since damaged files mix the two.
"""

from __future__ import annotations

import re
import unicodedata

try:
  import ftfy
except ImportError:  # the fallback below handles the common MELD cases
  ftfy = None

_SPACES = re.compile(r"\s+")
# Letters that start cp1252-decoded UTF-8 sequences: 'â€™', 'Ã©', 'Â ' ...
_MOJIBAKE_MARKERS = re.compile(
  "[\u00c2\u00c3\u00c5\u00e2][\u0080-\u00bf\u0152\u0153\u0160\u0161"
  "\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]"
)


def _c1_to_cp1252(text: str) -> str:
  """'\\x92' -> '’': C1 control characters as the cp1252 characters they stood for."""
  out = []
  for ch in text:
    if "\x80" <= ch <= "\x9f":
      try:
        ch = bytes([ord(ch)]).decode("cp1252")
      except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d mean nothing in cp1252
        ch = ""
    out.append(ch)
  return "".join(out)


def _sloppy_cp1252(text: str) -> bytes:
  """cp1252 encoding that also passes the five bytes cp1252 leaves undefined (as Latin-1 does)."""
  out = bytearray()
  for ch in text:
    try:
      out += ch.encode("cp1252")
    except UnicodeEncodeError:
      if ord(ch) > 0xFF:
        raise
      out.append(ord(ch))
  return bytes(out)


def _undo_mojibake(text: str) -> str:
  """'â€™' -> '’', 'Ã©' -> 'é' by re-encoding as cp1252 and decoding as UTF-8 (up to 3 layers)."""
  for _ in range(3):
    if not _MOJIBAKE_MARKERS.search(text):
      break
    try:
      text = _sloppy_cp1252(text).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
      break
  return text


def fix_encoding(text: str) -> str:
  """Repair cp1252 control characters and mojibake; whitespace untouched."""
  if ftfy is not None:
    # Keep curly quotes: they are what the utterance had, and the tokenizer maps them anyway.
    return ftfy.fix_text(
      text, uncurl_quotes=False, fix_latin_ligatures=False, fix_character_width=False, normalization="NFC"
    )
  return unicodedata.normalize("NFC", _c1_to_cp1252(_undo_mojibake(text)))


def normalize_text(text) -> str:
  """A CSV cell -> clean single-line text. None / NaN -> ''."""
  if text is None or (isinstance(text, float) and text != text):
    return ""
  text = fix_encoding(str(text))
  return _SPACES.sub(" ", text.replace("\u00a0", " ")).strip()


def decode_csv_bytes(data: bytes) -> str:
  """A CSV file's bytes -> text: UTF-8 (BOM allowed), else each line as UTF-8 or cp1252."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError:
    pass
  lines = []
  for line in data.split(b"\n"):  # '\n' is one byte in both encodings, so the split is safe
    try:
      lines.append(line.decode("utf-8"))
    except UnicodeDecodeError:
      # cp1252 leaves five bytes undefined; Latin-1 keeps them as C1 characters for fix_encoding.
      lines.append("".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in line))
  text = "\n".join(lines)
  return text[1:] if text.startswith("\ufeff") else text
