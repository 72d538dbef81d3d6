"""Prompts -> umT5 embeddings, as the reference's ``WanPrompter.encode_prompt``: each prompt
cleaned and tokenised to 512 tokens (``</s>`` after it, ``<pad>`` after that), run through the
umT5 encoder, the positions past its length dropped.

  enc = PromptEncoder("runs/umt5_xxl", "Wan2.2-TI2V-5B/google/umt5-xxl")
  [emb] = enc.encode(["a camera moves through the forest"])  # (Lt, 4096) float32
  empty = enc.empty()  # umT5 of "": its </s> token's embedding, (1, 4096), not zeros

The reference keeps the (512, 4096) padded tensor with zeros past the length; the real tokens
alone are kept here, which the DiT's text input pads back to 512 with zeros (the same input).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax.text import tokenizer as tokenizer_lib
from mirage_jax.text import umt5

TEXT_LENGTH = 512  # the reference's tokenizer seq_len


def encoder_config(encoder_export: str):
  """The umT5 config of a text-encoder export, from its ``config.json`` alone (before its
  params load: the xxl's are 11 GiB), e.g. to check its ``dim`` against a DiT's ``text_dim``."""
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: load time only
  config = checkpoint.export_config(encoder_export)
  where = os.path.join(encoder_export, "config.json")
  if "text_encoder" not in config:
    raise InputError(where, "text_encoder", "missing: not a umT5 text-encoder export")
  umt5.check_config(config.text_encoder, where)
  return config.text_encoder


def check_pair(text_encoder: str | None, tokenizer: str | None) -> bool:
  """Whether a text encoder is given: refuses one of ``--text_encoder`` / ``--tokenizer``
  without the other."""
  for flag, value, other in (("--text_encoder", text_encoder, tokenizer),
                             ("--tokenizer", tokenizer, text_encoder)):
    if other and not value:
      raise InputError(flag, flag[2:], "--text_encoder and --tokenizer go together")
  return bool(text_encoder)


def check_width(encoder_export: str, text_dim: int) -> None:
  """Refuses (naming the export's config.json and ``text_encoder.dim``) an encoder whose
  embeddings are not ``text_dim`` wide, the DiT's text input, before its params load."""
  dim = int(encoder_config(encoder_export).dim)
  if dim != text_dim:
    raise InputError(os.path.join(encoder_export, "config.json"), "text_encoder.dim",
                     f"{dim}, the DiT's text_dim is {text_dim}: not this DiT's text encoder")


def command_line_prompt(prompt: str | None, prompt_file: str | None,
                        caption: str | None = None) -> str | None:
  """The prompt of ``--prompt`` or ``--prompt_file`` (a UTF-8 file of ONE line,
  ``tokenizer.read_prompts``: one video, one prompt), None without either; refuses both, or
  either with ``--caption_embedding`` (a saved embedding of another text), in one line."""
  text = prompt
  if prompt_file is not None:
    if prompt is not None:
      raise InputError("--prompt_file", "prompt_file", "give --prompt or --prompt_file, not "
                       "both")
    lines = tokenizer_lib.read_prompts(prompt_file)
    if len(lines) > 1:
      raise InputError(prompt_file, "line 2", f"one prompt for one video: the file has "
                       f"{len(lines)} lines")
    text = lines[0]
  if text is not None and caption:
    flag = "--prompt" if prompt is not None else "--prompt_file"
    raise InputError(flag, flag[2:], "give a prompt or --caption_embedding, not both")
  return text


class PromptEncoder:
  """A umT5 text-encoder export and its tokenizer folder.

  Args:
    encoder_export: ``python -m mirage_jax.convert_text``'s export.
    tokenizer_folder: the ``google/umt5-xxl`` folder (with ``tokenizer.json``) of the release.
    length: tokens a prompt is padded (or truncated) to: 512, the reference's.
    dtype: the matmuls' dtype (float32 by default; bf16 params are widened).
  Raises:
    InputError: one line: an unreadable export or folder, or a tokenizer whose vocabulary is
      not the encoder's (naming the tokenizer's file and the encoder's).
  """

  def __init__(self, encoder_export: str, tokenizer_folder: str, *, length: int = TEXT_LENGTH,
               dtype=jnp.float32):
    self.tokenizer = tokenizer_lib.Tokenizer(tokenizer_folder)
    # Checked from the config before the params load.
    tokenizer_lib.check_vocab(self.tokenizer, int(encoder_config(encoder_export).vocab_size),
                              os.path.join(encoder_export, "config.json"))
    model, self.cfg = umt5.load_export(encoder_export, dtype=dtype)
    self.dim = int(self.cfg.dim)
    self.length = int(length)
    self.paths = (encoder_export, tokenizer_folder)
    graphdef, state = nnx.split(model)
    self._split = (graphdef, state)
    self._batched_fn = None
    # One compilation: every prompt runs alone at (1, length), as the reference calls it.
    self._run = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
    self._state = state

  def encode(self, prompts: Sequence[str]) -> list[np.ndarray]:
    """Embeddings of ``prompts``: a list of (Lt_i, dim) float32, Lt_i the prompt's tokens and
    its ``</s>`` (at most ``length``)."""
    if isinstance(prompts, str):
      raise TypeError("prompts: a list of strings, not one string")
    out = []
    for prompt in prompts:
      ids, mask = self.tokenizer([prompt], length=self.length)
      emb = self._run(self._state, jnp.asarray(ids), jnp.asarray(mask))
      out.append(np.asarray(emb[0, :int(mask.sum())], np.float32))
    return out

  def encode_batch(self, prompts: Sequence[str], batch_size: int = 8) -> list[np.ndarray]:
    """:meth:`encode`'s embeddings, ``batch_size`` prompts per call (the last batch filled
    with ""): one compilation at (batch_size, length), the params sharded over this process's
    devices by their logical axes (``embed`` over ``fsdp``: the xxl's 11 GiB of bf16 need not
    fit one chip) and the batch split over them. Each row is zeroed at its own length
    (``umt5``), so a prompt's embedding does not depend on its batch."""
    if isinstance(prompts, str):
      raise TypeError("prompts: a list of strings, not one string")
    if batch_size < 1:
      raise InputError("text encoder", "batch_size", f"must be >= 1, got {batch_size}")
    run, batch_in = self._batched()
    out = []
    for i in range(0, len(prompts), batch_size):
      group = list(prompts[i:i + batch_size])
      ids, mask = self.tokenizer(group + [""] * (batch_size - len(group)), length=self.length)
      emb = np.asarray(run(jax.device_put(ids, batch_in(batch_size)),
                           jax.device_put(mask, batch_in(batch_size))), np.float32)
      out += [emb[j, :int(mask[j].sum())] for j in range(len(group))]
    return out

  def _batched(self):
    """(jitted ids, mask -> embeddings over the local devices, batch size -> its sharding)."""
    if self._batched_fn is None:
      from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
      from mirage_jax import sharding  # pylint: disable=g-import-not-at-top
      devices = jax.local_devices()
      mesh = sharding.make_mesh({"fsdp": len(devices)}, devices)
      graphdef, state = self._split
      # Axes that do not divide a dimension replicate it (params=False): any device count.
      shard = sharding.logical_to_sharding(nnx.get_partition_spec(state), mesh, None, state)
      state = jax.device_put(state, shard)
      fn = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))

      def run(ids, mask):
        with jax.set_mesh(mesh):
          return fn(state, ids, mask)

      def batch_in(b):  # the batch over every device where it divides, else replicated
        return NamedSharding(mesh, PartitionSpec("fsdp" if b % len(devices) == 0 else None))

      self._batched_fn = (run, batch_in)
    return self._batched_fn

  def empty(self) -> np.ndarray:
    """(1, dim) float32: the empty prompt's embedding (its ``</s>`` token), the reference's
    unconditional text."""
    return self.encode([""])[0]
