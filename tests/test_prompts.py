"""Prompts through umT5 into the Wan family (mirage_jax/text/prompts.py and its users).

A tiny umT5 encoder (random weights, ``dim`` = the tiny DiT's ``text_dim``) is exported with
``text.convert.write_export``; its tokenizer is trained here (tests/test_text_tokenizer.py's
``make_tokenizer_folder``); the tiny Wan export comes from tests/test_wan_generate.py's
``make_wan_export``, and is converted a second time with ``--text_encoder``/``--tokenizer``.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from flax import nnx

from mirage_jax import checkpoint, families
from mirage_jax import export as export_cli
from mirage_jax.errors import InputError
from mirage_jax.families.wan import convert as wan_convert
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import world_model as wan_world_model
from mirage_jax.text import convert as text_convert
from mirage_jax.text import prompts, umt5
from mirage_jax.text import tokenizer as tk
from tests.test_generate import save_tiny_export
from tests.test_text_tokenizer import make_tokenizer_folder
from tests.test_wan_generate import _configs, _one_line_error, make_wan_export, run_cli

TEXT_DIM = int(wan_dit.wan_dit_config("tiny").text_dim)
PROMPT = "a camera moves through the forest"


def write_encoder(path: str, **overrides) -> str:
  """A random tiny umT5 encoder export (``dim`` = the tiny DiT's text_dim unless given)."""
  cfg = umt5.model_config("tiny", **{"dim": TEXT_DIM, **overrides})
  model = umt5.UMT5Encoder(cfg, rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  text_convert.write_export(path, params, cfg, source="random", dtype="float32")
  return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  d = tmp_path_factory.mktemp("text")
  (d / "tokenizer").mkdir()
  return dict(encoder=write_encoder(str(d / "umt5")),
              tokenizer=str(make_tokenizer_folder(d / "tokenizer")),
              wide=write_encoder(str(d / "umt5_wide"), dim=TEXT_DIM * 2),
              big_vocab=write_encoder(str(d / "umt5_big_vocab"), vocab_size=1024))


@pytest.fixture(scope="module")
def enc(text):
  return prompts.PromptEncoder(text["encoder"], text["tokenizer"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory, text):
  """The tiny Wan DiT export converted without a text encoder ('plain') and with one
  ('text'), from the same released-layout files."""
  d = tmp_path_factory.mktemp("wan")
  plain = make_wan_export(str(d))
  out = str(d / "with_text")
  wan_convert.convert(out, dit=str(d / "dit.safetensors"), vae=str(d / "vae.pth"),
                      vace=str(d / "vace.safetensors"), variant="tiny", configs=_configs(),
                      text_encoder=text["encoder"], tokenizer=text["tokenizer"])
  return dict(plain=plain, text=os.path.join(out, "dit"), dir=d)


def _padded(emb: np.ndarray, length: int) -> np.ndarray:
  return wan_world_model.load_or_pad(emb, TEXT_DIM, length)


# ----------------------------------------------------------------------------- the encoder


def test_encode_is_the_model_on_the_real_tokens(enc, text):
  model, _ = umt5.load_export(text["encoder"])
  got = enc.encode([PROMPT, "", "forest"])
  for prompt, emb in zip([PROMPT, "", "forest"], got):
    ids, mask = tk.Tokenizer(text["tokenizer"])([prompt], length=512)
    assert emb.shape == (int(mask.sum()), TEXT_DIM) and emb.dtype == np.float32
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[0]
    np.testing.assert_allclose(emb, full[:len(emb)], rtol=1e-5, atol=1e-5)
  empty = enc.empty()
  assert empty.shape == (1, TEXT_DIM) and np.abs(empty).max() > 0.1  # </s>: not zeros
  np.testing.assert_array_equal(empty, got[1])
  assert not np.allclose(got[0][-1], got[2][-1])  # different prompts, different embeddings


@pytest.mark.parametrize("batch_size", [2, 8])
def test_encode_batch_equals_one_at_a_time(enc, batch_size):
  """Batched over the host's devices (8 in the tests: a batch of 8 is split over them, a
  batch of 2 replicated; the params sharded by their logical axes): each prompt's embedding
  is the one it gets alone."""
  texts = [PROMPT, "", "forest", "a long corridor with red walls and a wooden floor"]
  alone = enc.encode(texts)
  got = enc.encode_batch(texts, batch_size=batch_size)
  assert [g.shape for g in got] == [a.shape for a in alone]
  for g, a in zip(got, alone):
    np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-5)


def test_tokenizer_of_another_encoder_refused(text):
  with pytest.raises(InputError) as e:
    prompts.PromptEncoder(text["big_vocab"], text["tokenizer"])
  assert e.value.field == "vocab_size" and text["tokenizer"] in str(e.value)
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the empty prompt


def test_no_path_feeds_zeros_as_the_empty_prompt(enc, text, exports, tmp_path, caplog):
  """Wherever a text encoder is known, the empty prompt is umT5 of "" (not zeros): the
  export's empty_text.npy, generate without a prompt (text and CFG negative), the flags on a
  plain export, the training stage; zeros only when nothing is known, and then loudly."""
  empty = enc.empty()
  config_t = checkpoint.export_config(exports["text"])
  length = wan_world_model.text_length(config_t)
  # convert_wan --text_encoder --tokenizer: stored in the export, paths in its config.
  d = config_t.denoiser
  assert d.empty_text == os.path.join(exports["text"], "empty_text.npy")
  assert d.text_encoder == os.path.abspath(text["encoder"])
  assert d.tokenizer == os.path.abspath(text["tokenizer"])
  np.testing.assert_array_equal(np.load(d.empty_text), empty)
  wm = families.world_model(config_t)
  # generate without --prompt, with and without CFG: text = negative = umT5("").
  for scale in (None, 3.0):
    options = wm.sampling_options(config_t, guidance_scale=scale)
    assert options["text"] is None  # WanRollout: the empty prompt
    np.testing.assert_array_equal(options["empty_text"], _padded(empty, length))
  # A plain export (no empty_text.npy) with the flags: the encoder computes it.
  config_p = checkpoint.export_config(exports["plain"])
  options = families.world_model(config_p).sampling_options(
      config_p, guidance_scale=3.0, text_encoder=text["encoder"], tokenizer=text["tokenizer"])
  np.testing.assert_allclose(options["empty_text"], _padded(empty, length), atol=1e-6)
  # A negative prompt replaces the CFG negative only; without a prompt the text stays "".
  options = wm.sampling_options(config_t, guidance_scale=3.0, negative_prompt="blurry")
  np.testing.assert_array_equal(options["text"], _padded(empty, length))
  np.testing.assert_allclose(options["empty_text"], enc.encode(["blurry"])[0], atol=1e-6)
  # The rollout built from the options holds it (padded to text_len).
  config, vae, dit = wan_world_model.WorldModel.load(exports["text"])
  r = wan_world_model.WorldModel(config, vae, dit, **wm.sampling_options(config_t))
  np.testing.assert_array_equal(np.asarray(r.empty_text[0]), _padded(empty, length))
  np.testing.assert_array_equal(np.asarray(r.text), np.asarray(r.empty_text))

  # The training stage's dropped captions: the base export chain's file, or the encoder.
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  def stage_empty(base, **denoiser):
    c = mirage_wan22_5b.get_config("tiny")
    c.data.data_dir = str(tmp_path / "no_latents")  # no dataset empty_text.npy
    c.denoiser.base_checkpoint = base
    c.denoiser.update(denoiser)
    return step_lib.make_stage(c)._empty_text()  # pylint: disable=protected-access

  text_len = mirage_wan22_5b.get_config("tiny").denoiser.text_len
  np.testing.assert_array_equal(stage_empty(exports["text"]), _padded(empty, text_len))
  np.testing.assert_allclose(stage_empty(exports["plain"], text_encoder=text["encoder"],
                                         tokenizer=text["tokenizer"]),
                             _padded(empty, text_len), atol=1e-6)
  # mirage_jax.export --text_encoder --tokenizer of a Wan DiT run: the same file and fields.
  update, add = export_cli.text_files(str(tmp_path / "ft_export"), text["encoder"],
                                      text["tokenizer"])
  run_config = json.loads(mirage_wan22_5b.get_config("tiny").to_json())
  written = update(run_config, None)
  assert written["denoiser"]["empty_text"] == str(tmp_path / "ft_export" / "empty_text.npy")
  assert written["denoiser"]["text_encoder"] == os.path.abspath(text["encoder"])
  np.testing.assert_array_equal(add(written)["empty_text.npy"], empty)

  # Nothing known: zeros, with one warning naming what to pass.
  wan_world_model._ZEROS_WARNED.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    options = families.world_model(config_p).sampling_options(config_p)
    families.world_model(config_p).sampling_options(config_p)
  assert options["empty_text"] is None and options["text"] is None
  warned = [r for r in caplog.records if "ZEROS" in r.getMessage()]
  assert len(warned) == 1 and "--text_encoder" in warned[0].getMessage()
  assert not np.any(stage_empty(exports["plain"]))


def test_export_text_flags_refused_in_one_line(text, tmp_path):
  """mirage_jax.export --text_encoder/--tokenizer: an encoder of another width, one flag
  without the other, a run that is not a Wan DiT's (checked before anything is written;
  tests/test_checkpoint.py checks that a failing add_files leaves no export)."""
  update, add = export_cli.text_files(str(tmp_path / "x"), text["wide"], text["tokenizer"])
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError) as e:
    update(json.loads(mirage_wan22_5b.get_config("tiny").to_json()), None)
  assert e.value.field == "text_encoder.dim"
  with pytest.raises(InputError) as e:
    export_cli.text_files("x", text["encoder"], None)
  assert e.value.field == "tokenizer"
  small = json.loads(mirage_wan22_5b.get_config("tiny").to_json())
  small["denoiser"]["model"]["family"] = "small"
  small["family"] = "small"
  with pytest.raises(InputError, match="only a Wan-family DiT run"):
    update(small, None)


# ----------------------------------------------------------------------------- CLIs


@pytest.fixture(scope="module")
def geometry_npz(tmp_path_factory):
  from data_pipelines import files, procedural  # pylint: disable=g-import-not-at-top
  c = procedural.render_clip(7, 9, 64, 64, trajectory="loop")
  path = tmp_path_factory.mktemp("clip") / "geometry.npz"
  files.save_geometry_npz(path, c)
  return str(path)


def test_generate_with_a_prompt(exports, geometry_npz, tmp_path):
  """generate --prompt on an export converted with its text encoder: no more flags."""
  out = tmp_path / "out"
  result = run_cli("mirage_jax.generate", f"--checkpoint={exports['text']}",
                   f"--geometry_path={geometry_npz}", f"--output_dir={out}", "--memory=mirage",
                   f"--prompt={PROMPT}")
  assert result.returncode == 0, result.stderr
  timings = json.loads((out / "timings.json").read_text())
  assert timings["prompt"] == PROMPT and timings["negative_prompt"] is None
  assert "ZEROS" not in result.stderr
  assert len(timings["chunks"]) == 1 and (out / "video.mp4").exists()


def test_bad_prompt_inputs_are_one_line(exports, text, geometry_npz, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  gen = lambda *a: run_cli("mirage_jax.generate", f"--geometry_path={geometry_npz}",
                           f"--output_dir={out}", "--overwrite", *a)
  plain = f"--checkpoint={exports['plain']}"
  # A tokenizer whose vocabulary is not the encoder's.
  result = gen(plain, "--prompt=x", f"--text_encoder={text['big_vocab']}",
               f"--tokenizer={text['tokenizer']}")
  _one_line_error(result, os.path.join(text["big_vocab"], "config.json"), "vocab_size")
  assert text["tokenizer"] in result.stderr
  # An encoder of another width than the DiT's text input.
  _one_line_error(gen(plain, "--prompt=x", f"--text_encoder={text['wide']}",
                      f"--tokenizer={text['tokenizer']}"),
                  os.path.join(text["wide"], "config.json"), "text_encoder.dim")
  # A prompt file that is not text; one of two prompts.
  binary = tmp_path / "prompt.bin"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
  _one_line_error(gen(f"--checkpoint={exports['text']}", f"--prompt_file={binary}"),
                  str(binary), "<file>")
  two = tmp_path / "two.txt"
  two.write_text("a forest\na river\n")
  _one_line_error(gen(f"--checkpoint={exports['text']}", f"--prompt_file={two}"),
                  str(two), "line 2")
  # A prompt with no encoder known; a prompt and a caption embedding.
  _one_line_error(gen(plain, "--prompt=x"), "--text_encoder", "text_encoder")
  caption = tmp_path / "caption.npy"
  np.save(caption, np.zeros((3, TEXT_DIM), np.float32))
  _one_line_error(gen(f"--checkpoint={exports['text']}", "--prompt=x",
                      f"--caption_embedding={caption}"), "--prompt", "prompt")
  # The small family takes no prompt.
  small = save_tiny_export(str(tmp_path / "small"))
  _one_line_error(gen(f"--checkpoint={small}", "--prompt=x"), "--prompt", "prompt")
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_convert_wan_refuses_a_wrong_encoder_before_writing(exports, text):
  d = exports["dir"]
  for encoder, field in ((text["wide"], "text_encoder.dim"), (text["big_vocab"], "vocab_size")):
    out = str(d / f"refused_{field}")
    with pytest.raises(InputError) as e:
      wan_convert.convert(out, dit=str(d / "dit.safetensors"), vae=str(d / "vae.pth"),
                          vace=str(d / "vace.safetensors"), variant="tiny", configs=_configs(),
                          text_encoder=encoder, tokenizer=text["tokenizer"])
    assert e.value.field == field and not os.path.exists(out)


def test_evaluate_revisit_with_a_prompt(exports, text, tmp_path):
  """evaluate --benchmark=revisit takes the same prompt flags (one prompt for every
  trajectory); a prompt without an encoder is refused before anything loads."""
  ev = lambda *a: run_cli("mirage_jax.evaluate", "--benchmark=revisit",
                          "--procedural_seeds=100001:100002", "--num_frames=9", "--backends=none",
                          "--novideos", "--nooracle", "--nocomposite", *a)
  _one_line_error(ev(f"--checkpoint={exports['plain']}", "--prompt=x",
                     f"--output_dir={tmp_path / 'refused'}"), "--text_encoder", "text_encoder")
  assert not (tmp_path / "refused").exists()
  out = tmp_path / "eval"
  result = ev(f"--checkpoint={exports['plain']}", f"--prompt={PROMPT}", "--negative_prompt=dark",
              f"--text_encoder={text['encoder']}", f"--tokenizer={text['tokenizer']}",
              f"--output_dir={out}")
  assert result.returncode == 0, result.stderr
  assert "ZEROS" not in result.stderr
  rows = json.loads((out / "metrics.json").read_text())["revisit"]["summary"]
  assert "none" in rows


@pytest.mark.slow  # 55-150 s on the loaded 2-core machine: the Wan chunk step with Depth Anything compiles
def test_worldscore_case_prompt_drives_the_wan_family(exports, tmp_path):
  """worldscore_generate with a text export: the case's first styled prompt is the text."""
  from tests.test_depth_generation import make_depth_export  # pylint: disable=g-import-not-at-top
  from tests.test_worldscore import _dataset  # pylint: disable=g-import-not-at-top
  root = _dataset(tmp_path / "WorldScore-Dataset")
  out = tmp_path / "worldscore_output"
  result = run_cli("mirage_jax.worldscore_generate", f"--checkpoint={exports['text']}",
                   f"--depth_model={make_depth_export(str(tmp_path))}", f"--cases={root}",
                   f"--output_dir={out}", "--visual_movement=static", "--frames=3")
  assert result.returncode == 0, result.stderr
  case = out / "static/photorealistic/indoor/kitchen/007"
  mirage = json.loads((case / "mirage.json").read_text())
  assert mirage["prompt_used"] and mirage["prompt"] == "A kitchen. Photorealistic style."
  assert sorted(os.listdir(case / "frames")) == ["000.png", "001.png", "002.png"]
  # 008: the same image, camera path and seed with another prompt, swapped into the same
  # compiled rollout: other frames.
  other = out / "static/photorealistic/indoor/kitchen/008"
  assert json.loads((other / "mirage.json").read_text())["prompt"].startswith("A red barn")
  a, b = (np.asarray(Image.open(d / "frames" / "002.png"), np.float32) for d in (case, other))
  assert np.abs(a - b).mean() > 0.5
