"""The umT5 tokenizer and prompt cleaning of the Wan2.2 text conditioning.

The reference tokenises with ``HuggingfaceTokenizer(seq_len=512, clean='whitespace')`` on the
``google/umt5-xxl`` folder shipped with Wan2.2: each prompt is cleaned (:func:`clean_prompt`),
encoded with ``</s>`` appended, truncated to 512 tokens (the ``</s>`` kept as the last) and
padded with ``<pad>``; the mask marks the prompt's tokens and its ``</s>``.

Here the maintained ``tokenizers`` library runs the folder's ``tokenizer.json`` as it is
(normalizer, Metaspace pre-tokenizer, Unigram model, ``</s>`` template), which is what
transformers 4's ``T5TokenizerFast`` did and what sentencepiece itself gives on the folder's
``spiece.model`` (tests/test_text_tokenizer.py checks both). transformers 5's ``T5Tokenizer``
rebuilds the pipeline and fixes the unknown token at id 2, which in umT5 is ``<s>`` (its
``<unk>`` is 3): it differs from this only on prompts with pieces outside the vocabulary.

A folder with only ``spiece.model`` is refused: converting a sentencepiece model needs its
protobuf schema and transformers' converter, neither a run-time dependency; every Wan2.2
release ships ``tokenizer.json``.
"""

from __future__ import annotations

import html
import os
import re
from typing import Sequence

import ftfy
import numpy as np
import tokenizers

from mirage_jax import paths
from mirage_jax.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
PAD, EOS = "<pad>", "</s>"
# The reference collapses whitespace with the third-party `regex` module, whose `\s` is
# Unicode's White_Space property. Python's `re` `\s` also matches U+001C..U+001F, so the set
# is spelled out (tests compare it with `regex`).
_WHITESPACE = re.compile(
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# Embedding tables are padded past the tokenizer's size to a multiple of 128 (umT5: 256300
# tokens, 256384 rows; T5: 32100 tokens, 32128 rows).
EMBEDDING_PADDING = 128


def basic_clean(text: str) -> str:
  """Mojibake and other Unicode damage repaired (ftfy), HTML entities decoded (twice, as the
  reference: ``&amp;lt;`` -> ``<``), ends stripped."""
  text = ftfy.fix_text(text)
  return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
  """Every run of whitespace one space, ends stripped."""
  return _WHITESPACE.sub(" ", text).strip()


def clean_prompt(text: str) -> str:
  """The reference's ``clean='whitespace'``: :func:`basic_clean` then :func:`whitespace_clean`."""
  return whitespace_clean(basic_clean(text))


class Tokenizer:
  """The umT5 tokenizer of a Wan2.2 ``google/umt5-xxl`` folder (or its ``tokenizer.json``).

  ``Tokenizer(folder)(prompts, length=512) -> (ids (B, length) int32, mask (B, length) bool)``.
  """

  def __init__(self, folder: str | os.PathLike):
    folder = os.fspath(folder)
    path = folder if folder.endswith(".json") else paths.join(folder, TOKENIZER_FILE)
    if not paths.isfile(path):
      if paths.isfile(paths.join(folder, "spiece.model")):
        problem = (f"missing; only spiece.model is there, and {TOKENIZER_FILE} is needed (it "
                   "ships with Wan2.2's google/umt5-xxl folder)")
      else:
        problem = "missing: not a tokenizer folder (google/umt5-xxl of a Wan2.2 release)"
      raise InputError(folder, TOKENIZER_FILE, problem)
    with paths.open(path, "rb") as f:
      raw = f.read()
    try:
      self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(path, "<file>", f"not a tokenizers tokenizer.json: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    self.path = path
    pad, eos = self._tok.token_to_id(PAD), self._tok.token_to_id(EOS)
    for name, token_id in (("pad", pad), ("eos", eos)):
      if token_id is None:
        raise InputError(path, "added_tokens", f"no {name} token "
                         f"'{PAD if name == 'pad' else EOS}': not a T5 tokenizer")
    self.pad_id, self.eos_id = pad, eos
    # The reference appends </s> through the file's post-processor (T5's template).
    if self._tok.encode("").ids != [eos]:
      raise InputError(path, "post_processor", f"does not end a prompt with '{EOS}' (the empty "
                       f"prompt gives ids {self._tok.encode('').ids}): not a T5 tokenizer")
    self._tok.no_padding()
    self._tok.no_truncation()

  @property
  def vocab_size(self) -> int:
    """Tokens the ids can name, added ones (``<extra_id_*>``) included: 256300 for umT5."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def __call__(self, prompts: Sequence[str], length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Cleaned, tokenised prompts: ``ids`` (B, length) int32 (``</s>`` after each prompt,
    ``<pad>`` after that; a prompt longer than ``length`` keeps its first ``length - 1``
    tokens and ``</s>``), ``mask`` (B, length) bool (True on the prompt and its ``</s>``)."""
    if isinstance(prompts, str):
      raise TypeError("prompts: a list of strings, not one string")
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    # Truncation inside encode_batch reserves room for </s>, as transformers' does.
    self._tok.enable_truncation(max_length=length)
    self._tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=PAD)
    try:
      encodings = self._tok.encode_batch([clean_prompt(p) for p in prompts])
    finally:
      self._tok.no_padding()
      self._tok.no_truncation()
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(prompts), length)
    mask = np.array([e.attention_mask for e in encodings], bool).reshape(len(prompts), length)
    return ids, mask


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
  """Refuses a tokenizer that does not belong to an encoder with ``vocab_size`` embedding rows
  (``where``: the encoder's file): its ids must fit the table, and the table may only be
  padded to the next multiple of 128 past the tokenizer's size (so T5's 32100-token tokenizer
  is refused for umT5's 256384 rows)."""
  n = tokenizer.vocab_size
  if not n <= vocab_size < n + EMBEDDING_PADDING:
    raise InputError(where, "vocab_size", f"the encoder has {vocab_size} token embeddings, the "
                     f"tokenizer {tokenizer.path} has {n} tokens: not the encoder's tokenizer")


def read_prompts(path: str | os.PathLike) -> list[str]:
  """Prompts of a UTF-8 text file, one a line (any extension; a byte-order mark and ``\\r\\n``
  line ends are fine; a final newline ends the last prompt). A blank line is refused rather
  than read as an empty prompt: it is more often a slip than a wish for unconditioned
  generation, and a skipped line would shift the prompts after it."""
  path = os.fspath(path)
  if not paths.isfile(path):
    raise InputError(path, "<file>", "no such prompt file")
  with paths.open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise InputError(path, "<file>", f"not UTF-8 text (byte {e.start}: "
                     f"{raw[e.start:e.start + 1]!r})") from None
  if "\x00" in text:
    raise InputError(path, "<file>", f"not text (a NUL character at {text.index(chr(0))})")
  # Only "\n" ends a line (str.splitlines would also split at U+2028, U+0085, form feeds...).
  lines = [line.removesuffix("\r") for line in text.split("\n")]
  if lines[-1] == "":
    lines.pop()
  if not lines:
    raise InputError(path, "<file>", "no prompts (the file is empty)")
  for i, line in enumerate(lines):
    if not line.strip():
      raise InputError(path, f"line {i + 1}", "blank: one prompt a line, none empty")
  return lines
