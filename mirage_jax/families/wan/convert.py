"""Wan2.2-TI2V-5B's released weights (+ Mirage's VACE/LoRA files) -> exports, and the
VACE/LoRA of an export back into the reference's files (``python -m mirage_jax.convert_wan``
is the command line).

In: the DiT's ``diffusion_pytorch_model*.safetensors`` (sharded with its ``.index.json``, or
one file) and the VAE's ``Wan2.2_VAE.pth``. Out: two exports in the format of
``mirage_jax.export`` (``checkpoint.load_export`` reads them): ``<output>/vae`` (stage
autoencoder) and ``<output>/dit`` (stage denoiser, its ``denoiser.autoencoder_checkpoint``
pointing at ``<output>/vae``), with the configs the caller gives (the command line's are
``experiments/wan22_ti2v_5b.py``'s). Without VACE the DiT's config has ``vace = False``;
without LoRA ``lora_rank = 0``; with LoRA the adapters stay params (fine-tuning goes on)
unless ``merge_lora`` folds them into the base weights. ``config.json`` records which under
``conversion``.

Every input is opened and checked against the model's layout (keys, shapes, dtypes, LoRA
rank) before anything is written; the exports go to a temporary folder beside ``output``,
renamed when complete. Tensors are streamed: read one at a time, stacked per parameter,
and written to the Orbax PyTree in groups of at most ``batch_mb`` through Orbax's partial
save, so the peak memory is about the largest stacked parameter, not the model.

Back (:func:`to_reference`): ``vace.safetensors`` and ``lora.safetensors`` in the reference's
key names and layouts (the model's ``original_layout`` inverted), read one parameter at a
time from the export.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

from mirage_jax import families
from mirage_jax import weight_files
from mirage_jax.errors import InputError

# The released files' names in the release folder.
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_FILE = "diffusion_pytorch_model.safetensors"
VAE_FILE = "Wan2.2_VAE.pth"
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
           np.dtype(np.float64))
_HINT = "(a checkpoint of another model?)"
# Prefixes the reference's loaders strip from VACE and LoRA keys (mirage_pipeline.py), and
# PEFT's adapter name: files written by either trainer convert.
_VACE_PREFIXES = ("module.", "model.", "_fsdp_wrapped_module.", "pipe.vace.", "vace.")
_LORA_PREFIXES = ("module.", "model.", "pipe.dit.", "dit.", "base_model.model.", "base_model.")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
  changed = True
  while changed:
    changed = False
    for p in prefixes:
      if key.startswith(p):
        key, changed = key[len(p):], True
  return key


def _normalize(group: str, key: str) -> str:
  """A key as the reference's loader for ``group`` sees it."""
  if group == "vace":
    return _strip(key, _VACE_PREFIXES)
  if group == "lora":
    key = _strip(key, _LORA_PREFIXES)
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(
        ".lora_B.default.weight", ".lora_B.weight")
  return key


# ----------------------------------------------------------------------------- progress


class _Progress:
  """Tensors done / total and MB/s through absl logging, at most every ``every`` seconds."""

  def __init__(self, what: str, total: int, every: float = 10.0):
    self.what, self.total, self.every = what, total, every
    self.done = self.bytes = 0
    self.start = self._last = None

  def begin(self) -> None:
    """Starts the clock (at the first read, not when the work was planned)."""
    if self.start is None:
      self.start = self._last = time.perf_counter()

  def add(self, nbytes: int, n: int = 1) -> None:
    self.begin()
    self.done += n
    self.bytes += nbytes
    now = time.perf_counter()
    if now - self._last >= self.every or self.done == self.total:
      self._last = now
      logging.info("%s: %d/%d tensors, %.1f MB, %.1f MB/s", self.what, self.done, self.total,
                   self.bytes / 1e6, self.bytes / 1e6 / max(now - self.start, 1e-9))


# ----------------------------------------------------------------------------- inputs


class _Source:
  """One input (a WeightFile) for the keys of one group, under the reference's normalised
  names; checked against what the layout expects when built.

  Raises:
    InputError: naming the file and the key: a key the model lacks, a key it needs that the
      file lacks, another shape (or LoRA rank), a non-float tensor, two keys that the
      reference's loader would take for one.
  """

  def __init__(self, group: str, weights: weight_files.WeightFile,
               expected: dict[str, tuple[int, ...]], model: str, flag: str):
    self.group, self.weights = group, weights
    by_norm: dict[str, str] = {}
    for key in weights.keys():
      norm = _normalize(group, key)
      if norm in by_norm:
        raise InputError(weights.file_of(key), key, f"same tensor as {by_norm[norm]!r} once "
                         "the reference's prefixes are stripped")
      by_norm[norm] = key
    want = {_normalize(group, k): (k, shape) for k, shape in expected.items()}
    for norm, key in by_norm.items():
      if norm not in want:
        raise InputError(weights.file_of(key), key, f"not a tensor of the {model} "
                         f"{_HINT if group != 'lora' else '(LoRA for layers the model lacks?)'}")
    for norm, (key, _) in want.items():
      if norm not in by_norm:
        raise InputError(weights.path, key, f"missing: the {model} needs it and {flag} does "
                         f"not have it {_HINT}")
    self._file_key: dict[str, str] = {}
    for norm, (key, shape) in want.items():
      fkey = by_norm[norm]
      got = tuple(weights.shape(fkey))
      if got != tuple(shape):
        raise InputError(weights.file_of(fkey), fkey, f"shape {got}, the {model} needs "
                         f"{tuple(shape)}" + (_rank_note(fkey, got, shape) if group == "lora"
                                               else f" {_HINT}"))
      if weights.dtype(fkey) not in _FLOATS:
        raise InputError(weights.file_of(fkey), fkey, f"dtype {weights.dtype(fkey)}, not a "
                         "float")
      self._file_key[key] = fkey

  def read(self, key: str) -> np.ndarray:
    return self.weights.read(self._file_key[key])


def _rank_note(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
  if len(got) == 2 and len(want) == 2:
    axis = 0 if ".lora_A." in key else 1
    if got[1 - axis] == want[1 - axis]:
      return (f": a LoRA of rank {got[axis]}, the config's is {want[axis]} (set --lora_rank "
              "to convert it at its own rank)")
  return " (LoRA for another model?)"


def _expected(layout: dict, keep: Callable[[str], bool]) -> dict[str, tuple[int, ...]]:
  return {k: t.original_shape for t in layout.values() for k in t.keys if keep(k)}


def _open(path: str, flag: str) -> weight_files.WeightFile:
  if not os.path.exists(path):
    raise InputError(path, flag.lstrip("-"), f"does not exist ({flag})")
  return weight_files.open_weights(path)


# ----------------------------------------------------------------------------- writing


def write_params(params_dir: str, leaves: Iterable[tuple[tuple[str, ...], tuple[int, ...],
                                                          Callable[[], np.ndarray]]],
                 dtype: np.dtype, batch_bytes: int, compress: bool = True) -> None:
  """Writes params one group of leaves at a time as the Orbax PyTree ``load_export`` reads.

  Orbax's partial save (``orbax.checkpoint.experimental.v1.partial``, 0.12.8) adds leaves to
  a pending checkpoint call by call and merges them (OCDBT manifests, metadata) at
  ``finalize``: only the leaves of the current call are in memory. The finalized
  checkpoint keeps its PyTree under ``state/``, which becomes ``params_dir``.

  Args:
    params_dir: the PyTree folder to create (``<export>/params``).
    leaves: (param path, shape, make) with ``make() -> array`` of that shape, called when
      the leaf's turn comes.
    dtype: stored dtype.
    batch_bytes: leaves per save up to this size (a larger leaf goes alone).
    compress: zstd-compress the chunks (Orbax's default; f32 made from bf16 halves on
      disk, but the compressed copy of a leaf is held until its save commits).
  """
  from orbax.checkpoint.experimental import v1 as ocp_v1  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  ctx = ocp_v1.Context()
  # Each save returns before its leaves are dropped and nothing writes to them meanwhile:
  # Orbax's defensive host copy would only double the peak.
  ctx.memory.deepcopy_host_arrays = False
  ctx.array.saving.use_compression = bool(compress)
  init_ns = time.time_ns()
  staging = params_dir + ".partial"
  batch: dict[tuple[str, ...], np.ndarray] = {}
  size = 0

  def flush():
    nonlocal batch, size
    if batch:
      with ctx:
        partial.save(staging, traverse_util.unflatten_dict(batch))
    batch, size = {}, 0

  for path, shape, make in leaves:
    nbytes = math.prod(shape) * dtype.itemsize
    if batch and size + nbytes > batch_bytes:
      flush()
    value = np.asarray(make())
    if value.shape != tuple(shape):
      raise ValueError(f"{path}: made {value.shape}, expected {tuple(shape)}")
    batch[path] = value.astype(dtype, copy=False)
    size += nbytes
  flush()
  with ctx:
    partial.finalize(staging)
  os.rename(os.path.join(staging, "state"), params_dir)
  shutil.rmtree(staging)
  # What ``PyTreeCheckpointer.save`` leaves beside the tree (the v1 layout keeps it a level
  # up): its absence only draws a warning from readers, but an export should look the same
  # whichever way it was written.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  handler = ocp.PyTreeCheckpointHandler
  with open(os.path.join(params_dir, "_CHECKPOINT_METADATA"), "w") as f:
    json.dump({"item_handlers": f"{handler.__module__}.{handler.__qualname__}", "metrics": {},
               "performance_metrics": {}, "init_timestamp_nsecs": init_ns,
               "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}, f)
  with open(os.path.join(params_dir, "commit_success.txt"), "w") as f:
    f.write(f"Checkpoint commit was successful to {params_dir}")


def _stacked_maker(t, read: Callable[[str], np.ndarray], dtype: np.dtype,
                   progress: _Progress) -> Callable[[], np.ndarray]:
  """make() of one param: each original tensor read, mapped to our slice, stacked."""

  def make() -> np.ndarray:
    progress.begin()
    out = np.empty(t.param_shape, dtype)
    for i, key in enumerate(t.keys):
      x = read(key)
      progress.add(x.nbytes)
      _assign(t, out[i] if t.stacked else out, x)
      del x
    return out
  return make


def _assign(t, dest: np.ndarray, original: np.ndarray) -> None:
  """``dest[...] = t.to_ours(original)`` (cast to dest's dtype) without a transposed temporary:
  ``dest`` (contiguous) is viewed in the permuted original shape and written through."""
  if original.shape != tuple(t.original_shape):
    raise ValueError(f"{t.keys[0]}: {original.shape}, expected {tuple(t.original_shape)}")
  permuted = original.shape if t.perm is None else tuple(original.shape[p] for p in t.perm)
  view = dest.view()
  view.shape = permuted  # raises rather than copy: dest is contiguous
  view[...] = original if t.perm is None else np.transpose(original, t.perm)


def _write_export(path: str, leaves: list, dtype: np.dtype, meta: dict, batch_bytes: int,
                  compress: bool):
  os.makedirs(path)
  write_params(os.path.join(path, "params"), leaves, dtype, batch_bytes, compress)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(meta, f, indent=2)


# ----------------------------------------------------------------------------- convert


def convert(output: str, *, dit: str, vae: str, configs: tuple[Any, Any],
            vace: str | None = None, lora: str | None = None, variant: str = "ti2v_5b",
            dtype: str | None = None, merge_lora: bool = False, lora_rank: int | None = None,
            lora_alpha: float | None = None, batch_mb: float = 256,
            compress: bool = True, text_encoder: str | None = None,
            tokenizer: str | None = None) -> dict:
  """Released files -> ``<output>/vae`` and ``<output>/dit`` exports (see the module doc).

  Args:
    output: the folder to create (refused if it exists).
    dit, vae: the DiT weights (file, index or folder) and the VAE ``.pth``.
    vace, lora: Mirage's VACE / LoRA safetensors, or None.
    variant: 'ti2v_5b' or 'tiny'.
    dtype: 'float32' (default) or 'bfloat16' for the stored params.
    merge_lora: fold the LoRA into the base kernels (``wan_dit.merge_lora``).
    lora_rank, lora_alpha: the LoRA's (default: the variant's).
    batch_mb: params per Orbax save (MB).
    compress: zstd-compress the stored params (see :func:`write_params`).
    configs: (autoencoder-stage, denoiser-stage) experiment configs to convert into (the
      command line passes ``experiments/wan22_ti2v_5b.py``'s for ``--variant``; fewer layers
      benchmark at full width). The library imports no experiment config.
    text_encoder, tokenizer: a umT5 export (``convert_text``) and its tokenizer folder, or
      None: umT5's embedding of "" is stored as ``<output>/dit/empty_text.npy``
      (``denoiser.empty_text``; the two paths as ``denoiser.text_encoder`` /
      ``denoiser.tokenizer``), the empty prompt and CFG negative of generation. Checked
      (width = the DiT's text_dim, the tokenizer's vocabulary) before any weight is read.
  Returns:
    A summary: tensors and bytes read, seconds.
  Raises:
    InputError: one line naming the file and the key; nothing is written then.
  """
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise InputError(output, "output", "already exists (refusing to replace it)")
  if merge_lora and not lora:
    raise InputError("--merge_lora", "merge_lora", "needs --lora")
  dtype_np = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)

  vae_config, dit_config = (copy.deepcopy(c) for c in configs)
  cfg = dit_config.denoiser.model
  cfg.vace = bool(vace)
  if lora:
    cfg.lora_rank = int(lora_rank if lora_rank is not None else cfg.lora_rank)
    if lora_alpha is not None:
      cfg.lora_alpha = float(lora_alpha)
    if cfg.lora_rank <= 0:
      raise InputError("--lora_rank", "lora_rank", f"the {variant} config has no LoRA "
                       "(rank 0): give the rank of --lora")
  else:
    cfg.lora_rank = 0
  empty_text = _empty_prompt(text_encoder, tokenizer, int(cfg.text_dim))
  dit_layout = wan_dit.original_layout(cfg)
  vae_layout = wan_vae.original_layout(vae_config.autoencoder)

  opened: list[weight_files.WeightFile] = []
  try:
    def source(group, path, flag, layout, keep, model):
      weights = _open(path, flag)
      opened.append(weights)
      return _Source(group, weights, _expected(layout, keep), model, flag)

    sources = {
        "vae": source("vae", vae, "--vae", vae_layout, lambda k: True, f"{variant} VAE"),
        "dit": source("dit", dit, "--dit", dit_layout,
                      lambda k: wan_dit.key_group(k) == "dit", f"{variant} DiT")}
    if vace:
      sources["vace"] = source("vace", vace, "--vace", dit_layout,
                               lambda k: wan_dit.key_group(k) == "vace",
                               f"{variant} VACE branch")
    if lora:
      sources["lora"] = source("lora", lora, "--lora", dit_layout,
                               lambda k: wan_dit.key_group(k) == "lora",
                               f"{variant} DiT's LoRA (rank {cfg.lora_rank})")
    dit_read = lambda k: sources[wan_dit.key_group(k)].read(k)
    lora_mode = "none" if not lora else ("merged" if merge_lora else "separate")
    conversion = {"variant": variant, "lora": lora_mode,
                  "lora_rank": cfg.lora_rank if lora else 0,
                  "lora_alpha": cfg.lora_alpha if lora else None,
                  "inputs": {"dit": os.path.abspath(dit), "vae": os.path.abspath(vae),
                             "vace": vace and os.path.abspath(vace),
                             "lora": lora and os.path.abspath(lora)}}
    exported_cfg = dit_config.denoiser.model
    # (a copy: the exported config drops the rank below, the merge needs it)
    dit_leaves = _dit_leaves(dit_layout, dit_read, dtype_np, copy.deepcopy(cfg), merge_lora,
                             _Progress("dit", sum(len(t.keys) for t in dit_layout.values())))
    if merge_lora:  # the export holds base weights only: its model has no adapters
      exported_cfg.lora_rank = 0
    vae_progress = _Progress("vae", sum(len(t.keys) for t in vae_layout.values()))
    vae_leaves = [(p, t.param_shape, _stacked_maker(t, sources["vae"].read, dtype_np,
                                                     vae_progress))
                  for p, t in vae_layout.items()]

    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{os.getpid()}.tmp")
    try:
      os.makedirs(tmp)
    except OSError as e:
      raise InputError(output, "output", f"cannot create ({e.strerror or e})") from e
    try:
      base = {"step": 0, "source": "wan2.2 release", "dtype": dtype or "float32",
              "conversion": conversion}
      _write_export(os.path.join(tmp, "vae"), vae_leaves, dtype_np,
                    {"config": json.loads(vae_config.to_json()), **base}, int(batch_mb * 2**20),
                    compress)
      dit_config.denoiser.autoencoder_checkpoint = os.path.join(output, "vae")
      if empty_text is not None:
        dit_config.denoiser.empty_text = os.path.join(output, "dit", EMPTY_TEXT)
        dit_config.denoiser.text_encoder = os.path.abspath(text_encoder)
        dit_config.denoiser.tokenizer = os.path.abspath(tokenizer)
      _write_export(os.path.join(tmp, "dit"), dit_leaves, dtype_np,
                    {"config": json.loads(dit_config.to_json()), **base}, int(batch_mb * 2**20),
                    compress)
      if empty_text is not None:
        np.save(os.path.join(tmp, "dit", EMPTY_TEXT), empty_text, allow_pickle=False)
      os.rename(tmp, output)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  finally:
    for w in opened:
      w.close()
  seconds = time.perf_counter() - start
  read = {"dit": sum(len(t.keys) for t in dit_layout.values()),
          "vae": sum(len(t.keys) for t in vae_layout.values())}
  logging.info("converted %s in %.1f s", read, seconds)
  return {"tensors": read, "seconds": seconds, "lora": lora_mode}


EMPTY_TEXT = "empty_text.npy"  # in the DiT export: umT5's embedding of "" (Lt, text_dim)


def _empty_prompt(text_encoder: str | None, tokenizer: str | None,
                  text_dim: int) -> np.ndarray | None:
  """(1, text_dim) umT5 embedding of "" (``prompts.PromptEncoder.empty``), None without a
  text encoder; refuses one of the two paths alone, or an encoder of another width."""
  from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
  if not prompts.check_pair(text_encoder, tokenizer):
    return None
  prompts.check_width(text_encoder, text_dim)
  return prompts.PromptEncoder(text_encoder, tokenizer).empty()


def _dit_leaves(layout: dict, read: Callable[[str], np.ndarray], dtype: np.dtype, cfg,
                merge: bool, progress: _Progress) -> list:
  """(path, shape, make) of every DiT param to write; with ``merge`` the adapted kernels come
  out merged (``wan_dit.merge_lora`` on kernel + its A, B) and the adapters are left out."""
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  leaves = []
  for path, t in layout.items():
    if merge and path[-1] in ("lora_a", "lora_b"):
      continue
    base = path[:-1]
    if merge and path[-1] == "kernel" and base + ("lora_a",) in layout:
      def make(path=path, base=base, t=t):
        # Layer by layer: the merge's float32 temporaries stay the size of one slice.
        progress.begin()
        ta, tb = layout[base + ("lora_a",)], layout[base + ("lora_b",)]
        out = np.empty(t.param_shape, dtype)
        for i in range(len(t.keys)):
          parts = {}
          for p, ti in ((path, t), (base + ("lora_a",), ta), (base + ("lora_b",), tb)):
            x = read(ti.keys[i])
            progress.add(x.nbytes)
            parts[p] = ti.to_ours(x).astype(np.float32)
          merged = wan_dit.merge_lora(parts, cfg)[path]
          if t.stacked:
            out[i] = merged
          else:
            out[...] = merged
        return out
      leaves.append((path, t.param_shape, make))
    else:
      leaves.append((path, t.param_shape, _stacked_maker(t, read, dtype, progress)))
  return leaves


# ----------------------------------------------------------------------------- back


def to_reference(checkpoint: str, output: str, dtype: str | None = None) -> dict[str, str]:
  """An export's VACE and LoRA params -> ``<output>/vace.safetensors``,
  ``<output>/lora.safetensors`` (the reference's names and layouts).

  Args:
    checkpoint: a DiT export of the Wan family (``convert`` or a fine-tune of it).
    output: folder (created; refused if it already holds either file).
    dtype: cast to 'bfloat16'/'float32' (default: as stored).
  Returns:
    {group: file written}.
  Raises:
    InputError: not a Wan DiT export, params missing or of other shapes, nothing to write.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import dit as wan_dit  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(checkpoint, "config.json")
  if not os.path.exists(meta_path):
    raise InputError(checkpoint, "config.json", "not an export directory (missing config.json)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    config = ml_collections.ConfigDict(meta["config"])
    cfg = config.denoiser.model
  except (OSError, ValueError, KeyError, AttributeError) as e:
    raise InputError(meta_path, "config", f"unreadable export config ({e})") from e
  family = families.family_name(config) if config.get("stage") == "denoiser" else None
  if family != "wan":
    raise InputError(meta_path, "config.family", "not a Wan DiT export "
                     f"(stage {config.get('stage')!r}, family {family!r})")
  layout = wan_dit.original_layout(cfg)
  groups = {g: [(p, t) for p, t in layout.items() if wan_dit.key_group(t.keys[0]) == g]
            for g in ("vace", "lora")}
  groups = {g: items for g, items in groups.items() if items}
  if meta.get("conversion", {}).get("lora") == "merged":
    logging.warning("%s: the LoRA was merged into the base weights at conversion; the "
                    "reference's lora.safetensors cannot express that (not written)", checkpoint)
  if not groups:
    raise InputError(checkpoint, "params", "the export has no VACE and no LoRA params "
                     f"(lora: {meta.get('conversion', {}).get('lora', 'none')})")
  params_dir = os.path.abspath(os.path.join(checkpoint, "params"))
  ckptr = ocp.PyTreeCheckpointer()
  try:
    saved = ckptr.metadata(params_dir).item_metadata
    saved = saved.tree if hasattr(saved, "tree") else saved
  except Exception as e:  # pylint: disable=broad-except  # Orbax errors vary
    raise InputError(params_dir, "params", f"unreadable checkpoint ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]})") from e
  for items in groups.values():
    for path, t in items:
      node = saved
      for k in path:
        node = node.get(k) if isinstance(node, dict) else None
      name = "params/" + "/".join(path)
      if node is None:
        raise InputError(params_dir, name, "missing (the export's config needs it)")
      if tuple(node.shape) != t.param_shape:
        raise InputError(params_dir, name, f"shape {tuple(node.shape)}, the config's model "
                         f"has {t.param_shape}")
  output = os.path.abspath(output)
  files = {g: os.path.join(output, f"{g}.safetensors") for g in groups}
  for path in files.values():
    if os.path.exists(path):
      raise InputError(path, "output", "already exists (refusing to replace it)")
  os.makedirs(output, exist_ok=True)

  cache: dict[tuple[str, ...], np.ndarray] = {}

  def leaf(path: tuple[str, ...]) -> np.ndarray:
    """One param from the export (one kept at a time: the writer asks in layout order)."""
    if path not in cache:
      cache.clear()
      node = saved
      for k in path:
        node = node[k]
      item = traverse_util.unflatten_dict({path: np.zeros((), np.float32)})
      args = traverse_util.unflatten_dict({path: ocp.RestoreArgs(restore_type=np.ndarray)})
      restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
      for k in path:
        restored = restored[k]
      cache[path] = np.asarray(restored)
    return cache[path]

  written = {}
  for g, items in groups.items():
    total = sum(len(t.keys) for _, t in items)
    progress = _Progress(f"{g}.safetensors", total)
    tensors = {}
    for path, t in items:
      stored = np.dtype(saved_dtype(saved, path))
      out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else (
          np.dtype(np.float32) if dtype == "float32" else stored)
      for i, key in enumerate(t.keys):
        def make(path=path, t=t, i=i, out_dtype=out_dtype):
          x = leaf(path)
          x = x[i] if t.stacked else x
          return np.ascontiguousarray(t.to_original(x)).astype(out_dtype, copy=False)
        tensors[key] = weight_files.LazyArray(t.original_shape, out_dtype, make)
    weight_files.write_safetensors(files[g], tensors, metadata={"format": "pt"},
                                  progress=lambda key, n: progress.add(n))
    written[g] = files[g]
    cache.clear()
  return written


def saved_dtype(saved_tree: Any, path: tuple[str, ...]) -> Any:
  node = saved_tree
  for k in path:
    node = node[k]
  return node.dtype
