"""The umT5 tokenizer and prompt cleaning (mirage_jax/text/tokenizer.py).

A small umT5-style sentencepiece model is trained here (no download: unigram, nmt_nfkc
normalisation, umT5's special ids pad=0 eos=1 bos=2 unk=3 and ``<extra_id_*>`` tokens after the
pieces) and saved as a Wan2.2 ``google/umt5-xxl``-like folder: ``spiece.model``,
``tokenizer.json`` (transformers' T5 converter, as the release's was made),
``tokenizer_config.json``, ``special_tokens_map.json``. Oracles on the same files:
sentencepiece itself, transformers' fast tokenizer on ``tokenizer.json`` (transformers 4's
``T5TokenizerFast`` path, the reference's), and transformers 5's ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest

from mirage_jax.errors import InputError
from mirage_jax.text import tokenizer as tk

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

EXTRA_IDS = 10
PAD, EOS, BOS, UNK = 0, 1, 2, 3

# Awkward prompts -> the reference's clean='whitespace' output (ftfy.fix_text, html.unescape
# twice, strip, `regex` \s+ -> ' ', strip), worked out by hand from its code.
CLEANED = {
    "a camera moves through the forest": "a camera moves through the forest",
    "": "",
    "   ": "",
    "  lots   of\tspace\n": "lots of space",
    "a\u00a0b\u2003c\u3000d": "a b c d",  # NBSP, em space, ideographic space
    "line\u2028sep": "line sep",
    "cafÃ©": "café",  # UTF-8 read as Latin-1, repaired by ftfy
    "e\u0301 combining": "\u00e9 combining",  # ftfy's NFC
    "&amp;lt;b&amp;gt; tag": "<b> tag",  # unescaped twice
    "rock &amp; roll": "rock & roll",
    # ftfy unescapes HTML itself unless the text has a '<'; the two unescapes follow.
    "<i> &amp;amp; </i>": "<i> & </i>",
    "&amp;amp;lt;": "<",
    "&lt;3 &#x1F600;": "<3 \U0001F600",
    "\u201cquoted\u201d": '"quoted"',  # ftfy uncurls quotes
    "Ｆｕｌｌ ｗｉｄｔｈ": "Full width",  # ftfy's fullwidth -> ASCII
    "\ufb01 ligature": "fi ligature",
    "\x1b[31mred\x1b[0m": "red",  # terminal escapes removed
    "a\x1cb": "ab",  # control characters removed by ftfy before the whitespace pass
    "x\u200by": "x\u200by",  # zero-width space is not whitespace
    "森林 城市 夜晚 カメラ": "森林 城市 夜晚 カメラ",
    "\U0001F600\U0001F697 emoji": "\U0001F600\U0001F697 emoji",
    "UPPER 123": "UPPER 123",  # pieces outside the trained vocabulary -> <unk>
}
LONG = " ".join(["camera forest river 城市"] * 400)  # far more than 512 tokens


def make_tokenizer_folder(d):
  """Trains a T5-style tokenizer of ~500 tokens (490 pieces + 10 ``<extra_id_*>``) on
  generated sentences and saves it as a ``google/umt5-xxl``-like folder in ``d`` (a
  pathlib.Path); returns ``d``."""
  rng = random.Random(0)
  # Lower-case letters only: upper case and digits stay outside the vocabulary (-> <unk>).
  syllables = [c + v for c in "bcdfghjklmnprstvwxz" for v in "aeiouéü"]
  syllables += list("森林城市夜晚カメラ") + ["\U0001F600", "\U0001F697"]
  words = ["the", "a", "camera", "moves", "through", "forest", "river", "city", "night",
           "café", "naïve", "lots", "of", "space", "tag", "rock", "roll", "red", "line", "emoji"]
  words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1500)]
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(1500)]
  with open(d / "spiece.model", "wb") as f:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=f, vocab_size=490, model_type="unigram",
        pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK, pad_piece="<pad>", eos_piece="</s>",
        bos_piece="<s>", unk_piece="<unk>", character_coverage=1.0, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
  from transformers.convert_slow_tokenizer import T5Converter  # pylint: disable=g-import-not-at-top

  class Slow:  # what the converter reads of a slow T5 tokenizer
    vocab_file, _extra_ids = str(d / "spiece.model"), EXTRA_IDS

    def convert_tokens_to_ids(self, token):
      assert token == "</s>"
      return EOS

  T5Converter(Slow()).converted().save(str(d / "tokenizer.json"))
  extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
  special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>",
             "additional_special_tokens": extra}
  (d / "special_tokens_map.json").write_text(json.dumps(special))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {**special, "tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "legacy": True}))
  return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_tokenizer_folder(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def ours(folder):
  return tk.Tokenizer(folder)


def _transformers4(folder):
  """transformers' fast tokenizer on tokenizer.json as it is (T5TokenizerFast of transformers 4)."""
  return transformers.TokenizersBackend(tokenizer_file=str(folder / "tokenizer.json"),
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _hf(tok, prompts, length):
  """The reference's call: HuggingfaceTokenizer(seq_len=length, clean='whitespace')."""
  out = tok([tk.clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=length, add_special_tokens=True, return_tensors="np")
  return out["input_ids"], out["attention_mask"].astype(bool)


@pytest.mark.parametrize("raw", list(CLEANED))
def test_clean_prompt_as_the_reference(raw):
  assert tk.clean_prompt(raw) == CLEANED[raw]


def test_whitespace_is_the_regex_modules():
  """The reference's `regex` \\s, not `re`'s (which also takes U+001C..U+001F)."""
  regex = pytest.importorskip("regex")
  theirs = {c for c in range(sys.maxunicode + 1) if regex.fullmatch(r"\s", chr(c))}
  mine = {c for c in range(sys.maxunicode + 1) if tk._WHITESPACE.fullmatch(chr(c))}
  assert mine == theirs
  assert tk.whitespace_clean("a\x1cb \t\u3000c ") == "a\x1cb c"


def test_folder_is_umt5_like(folder, ours):
  assert (ours.pad_id, ours.eos_id) == (PAD, EOS)
  sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
  assert ours.vocab_size == sp.get_piece_size() + EXTRA_IDS
  assert 450 <= ours.vocab_size <= 520
  assert sp.unk_id() == UNK and sp.bos_id() == BOS


@pytest.mark.parametrize("raw", list(CLEANED) + [LONG])
def test_ids_equal_sentencepiece(folder, ours, raw):
  """The model's own tokenizer: pieces of the cleaned prompt, then </s>, truncated, padded."""
  sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
  length = 512
  want = sp.encode(tk.clean_prompt(raw))[:length - 1] + [EOS]
  ids, mask = ours([raw], length)
  assert ids.shape == mask.shape == (1, length)
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids[0, :len(want)], want)
  assert (ids[0, len(want):] == PAD).all()
  np.testing.assert_array_equal(mask[0], np.arange(length) < len(want))


@pytest.mark.parametrize("length", [512, 7])
def test_batch_equals_transformers_fast_tokenizer(folder, ours, length):
  """ids and mask as transformers' fast tokenizer on the same tokenizer.json (the reference's
  HuggingfaceTokenizer under transformers 4), all prompts in one batch."""
  prompts = list(CLEANED) + [LONG]
  ids, mask = ours(prompts, length)
  want_ids, want_mask = _hf(_transformers4(folder), prompts, length)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)


def test_transformers5_autotokenizer_differs_only_on_unknown_pieces(folder, ours):
  """transformers 5's T5Tokenizer fixes <unk> at id 2 (umT5's <s>; its <unk> is 3): equal to
  ours except that ours keeps the file's <unk>."""
  auto = transformers.AutoTokenizer.from_pretrained(str(folder))
  prompts = list(CLEANED) + [LONG]
  ids, mask = ours(prompts, 512)
  want_ids, want_mask = _hf(auto, prompts, 512)
  np.testing.assert_array_equal(mask, want_mask)
  with_unk = (ids == UNK).any(axis=1)
  assert with_unk.any() and not with_unk.all()
  np.testing.assert_array_equal(ids[~with_unk], want_ids[~with_unk])
  np.testing.assert_array_equal(np.where(ids == UNK, BOS, ids), want_ids)


def test_truncation_keeps_eos_and_empty_is_eos(ours):
  ids, mask = ours([LONG, "", "   "], 512)
  assert ids[0, -1] == EOS and mask[0].all() and (ids[0, :-1] != EOS).all()
  for row in (1, 2):
    assert ids[row, 0] == EOS and (ids[row, 1:] == PAD).all()
    np.testing.assert_array_equal(mask[row], np.arange(512) < 1)
  ids, _ = ours(["a camera"], 1)
  np.testing.assert_array_equal(ids, [[EOS]])


def test_tokenizer_json_path_and_one_string_refused(folder, ours):
  a, _ = tk.Tokenizer(folder / "tokenizer.json")(["a camera"], 16)
  b, _ = ours(["a camera"], 16)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(TypeError, match="list of strings"):
    ours("a camera")


def test_bad_folders_refused(tmp_path, folder):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match=r"empty: field 'tokenizer.json': missing: not a tokenizer"):
    tk.Tokenizer(empty)
  only_spm = tmp_path / "only_spm"
  only_spm.mkdir()
  (only_spm / "spiece.model").write_bytes((folder / "spiece.model").read_bytes())
  with pytest.raises(InputError, match=r"only_spm: field 'tokenizer.json': missing; only "
                     r"spiece.model is there, and tokenizer.json is needed"):
    tk.Tokenizer(only_spm)
  garbage = tmp_path / "garbage"
  garbage.mkdir()
  (garbage / "tokenizer.json").write_bytes(b"\xff\x00 not json")
  with pytest.raises(InputError, match=r"tokenizer.json: field '<file>': not a tokenizers"):
    tk.Tokenizer(garbage)
  # A tokenizer.json without T5's </s> template (e.g. the post-processor dropped).
  data = json.loads((folder / "tokenizer.json").read_text())
  data["post_processor"] = None
  no_eos = tmp_path / "no_eos"
  no_eos.mkdir()
  (no_eos / "tokenizer.json").write_text(json.dumps(data))
  with pytest.raises(InputError, match=r"field 'post_processor': does not end a prompt with"):
    tk.Tokenizer(no_eos)
  with pytest.raises(InputError) as e:
    tk.Tokenizer(empty)
  assert "\n" not in str(e.value)


def test_check_vocab(ours):
  n = ours.vocab_size
  tk.check_vocab(ours, n, "enc.pth")
  tk.check_vocab(ours, n + 127, "enc.pth")  # the table padded to a multiple of 128
  for rows in (n - 1, n + 128, 256384):
    with pytest.raises(InputError, match=rf"enc.pth: field 'vocab_size': the encoder has {rows} "
                       rf"token embeddings, the tokenizer .* has {n} tokens"):
      tk.check_vocab(ours, rows, "enc.pth")


def test_read_prompts(tmp_path):
  p = tmp_path / "prompts.txt"
  p.write_bytes("\ufeffa forest\r\ncafé at night\u2028still one prompt\n森林\n".encode("utf-8"))
  assert tk.read_prompts(p) == ["a forest", "café at night\u2028still one prompt", "森林"]
  p.write_text("no final newline")
  assert tk.read_prompts(str(p)) == ["no final newline"]


@pytest.mark.parametrize("content,field,problem", [
    ("café".encode("latin-1"), "<file>", r"not UTF-8 text \(byte 3"),
    (b"a\x00b\n", "<file>", "not text"),
    (b"", "<file>", "no prompts"),
    (b"one\n\nthree\n", "line 2", "blank"),
    (b"one\n  \t\n", "line 2", "blank"),
])
def test_read_prompts_refuses(tmp_path, content, field, problem):
  p = tmp_path / "prompts.txt"
  p.write_bytes(content)
  with pytest.raises(InputError, match=rf"prompts.txt: field '{field}': {problem}"):
    tk.read_prompts(p)
  with pytest.raises(InputError, match="no such prompt file"):
    tk.read_prompts(tmp_path / "missing.txt")
