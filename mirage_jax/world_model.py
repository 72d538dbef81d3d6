"""What a model family provides to the one rollout driver (``mirage_jax.rollout``).

A family (``mirage_jax/families/<name>/``) exposes one ``WorldModel`` subclass: its networks
(autoencoder + denoiser), its memory geometry and the pieces of ONE chunk step. The driver
(:class:`mirage_jax.rollout.Rollout`) owns everything else: checking and padding a batch of
trajectories, the jitted chunk step (vmapped over trajectories, sharded over the mesh's batch
axes), the oracle row's encoding outside the step, timing and progress.

The driver runs, per trajectory batch:

  carry, first = start(params, memory, frame0, depth0, valid0, K0, c2w0, rng)  # jitted, vmapped
  for c in range(max num_chunks):
    chunk, plan = chunk_inputs(c, ...)            # host: cameras (and depths) of chunk c
    chunk |= oracle_chunk(encode, ...)            # host: ground truth, encoded by encode_oracle
    carry, out = step(params, carry, chunk)       # jitted, vmapped: read -> references ->
                                                  # the whole sampler -> decode -> write
  result_b = common fields | trajectory_result(b, ...)

This module is the interface only (imports nothing of a family).
"""

from __future__ import annotations

import abc
import copy
from typing import Any

import ml_collections
import numpy as np

from mirage_jax.depth import estimator as depth_estimator
from mirage_jax.errors import InputError


class WorldModel(abc.ABC):
  """A family's world model: networks + memory backend + the pieces of one chunk step.

  Constructed from an export's (upgraded) config, its autoencoder and denoiser, a memory
  backend name and the family's options (each family refuses the options it does not
  take with an ``InputError`` naming the flag).

  Instance attributes the driver reads: ``config``, ``backend`` (a ``memory.Backend``),
  ``backend_name``, ``memory_cfg`` (``MemoryConfig``), ``image_hw`` (H, W), ``latent_hw``
  (h, w), ``chunk`` (frames the DiT generates per chunk step).
  """

  # ---------------------------------------------------------------- capability flags
  name: str = ""  # the family's name (``mirage_jax.families.FAMILIES``)
  needs_depths: bool = False  # generate() wants the given depth of every frame
  needs_first_depth: bool = True  # generate() wants frame 0's depth (else it estimates it)
  # Where written depth may come from (``mirage_jax.depth.estimator``), the first the default.
  depth_estimators: tuple[str, ...] = ("given",)
  has_depth_head: bool = True  # the decoder returns depth (else result depths is None)
  moving_content: bool = True  # handles mask_dynamic / object slots
  given_context: bool = True  # ground-truth frames can be the clean context (given_frames)
  benchmarks: tuple[str, ...] = ()  # the ``mirage_jax.evaluate --benchmark`` values it runs
  takes_text: bool = False  # conditioned on a text prompt (``sampling_options``' prompt)

  config: ml_collections.ConfigDict
  backend: Any
  backend_name: str
  memory_cfg: Any
  image_hw: tuple[int, int]
  latent_hw: tuple[int, int]
  chunk: int

  # ---------------------------------------------------------------- config and loading
  @staticmethod
  @abc.abstractmethod
  def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An export's config (any age) in the current schema: missing fields get the values
    the export was trained with; fields are then read directly."""

  @staticmethod
  @abc.abstractmethod
  def memory_config(config: ml_collections.ConfigDict, **overrides):
    """The ``MemoryConfig`` of ``config.memory.settings`` at the family's latent geometry."""

  @staticmethod
  @abc.abstractmethod
  def load(denoiser_export: str, autoencoder_export: str | None = None
           ) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """(upgraded config, autoencoder, denoiser) of a denoiser export of this family."""

  @staticmethod
  def frozen_autoencoder(config: ml_collections.ConfigDict) -> Any:
    """The autoencoder a training run of ``config`` keeps frozen outside its trained state
    (loaded from its export), or None when the run holds it (default)."""
    del config
    return None

  @staticmethod
  @abc.abstractmethod
  def check_guidance(config: ml_collections.ConfigDict, scale: float | None = None) -> None:
    """Refuses classifier-free guidance the model never trained an unconditional branch for."""

  @classmethod
  def sampling_options(cls, config: ml_collections.ConfigDict, *, caption: str | None = None,
                       empty_text: str | None = None, guidance_scale: float | None = None,
                       prompt: str | None = None, negative_prompt: str | None = None,
                       text_encoder: str | None = None, tokenizer: str | None = None
                       ) -> dict[str, Any]:
    """Constructor options from the command line's files and flags (default: none; a family
    that takes none refuses a given one, the flags being the Wan family's): the text
    (``prompt`` or the ``caption`` embedding file), the empty prompt's embedding file, the
    CFG scale and ``negative_prompt``, the umT5 ``text_encoder`` export and its
    ``tokenizer`` folder."""
    given = {"caption_embedding": caption, "empty_text_embedding": empty_text,
             "guidance_scale": guidance_scale, "prompt": prompt,
             "negative_prompt": negative_prompt, "text_encoder": text_encoder,
             "tokenizer": tokenizer}
    for flag, value in given.items():
      if value is not None:
        raise InputError(f"--{flag}", flag, f"only the Wan family takes it; this export is of "
                         f"the {cls.name!r} family")
    return {}

  @classmethod
  def encode_prompts(cls, config: ml_collections.ConfigDict, texts: list[str], *,
                     text_encoder: str | None = None, tokenizer: str | None = None
                     ) -> list[np.ndarray]:
    """Each prompt's text embedding (Lt, text_dim), the text encoder loaded once (a family
    with ``takes_text``; the others refuse)."""
    del config, texts, text_encoder, tokenizer
    raise InputError("prompt", "prompt", f"the {cls.name!r} family has no text input")

  def set_text(self, embedding: np.ndarray) -> None:
    """Conditions the next trajectories on ``embedding`` (Lt, text_dim) (``encode_prompts``)
    without rebuilding the rollout (the text is an argument of the compiled step)."""
    del embedding
    raise InputError("prompt", "prompt", f"the {self.name!r} family has no text input")

  @classmethod
  def depth_options(cls, estimator: str | None = None, model: str | None = None,
                    align: bool | None = None) -> depth_estimator.DepthOptions:
    """The checked depth choice (the ``--depth_estimator``, ``--depth_model`` and
    ``--depth_align`` flags) for this family's constructor's ``depth``; None: the family's
    default (``depth_estimators[0]``), or ``depth_anything`` when a model is given."""
    return depth_estimator.depth_options(estimator, model, align, default=cls.depth_estimators[0],
                                         allowed=cls.depth_estimators, family=cls.name)

  # ---------------------------------------------------------------- the chunk plan (host)
  @abc.abstractmethod
  def num_chunks(self, num_frames: int) -> int:
    """Chunk steps a trajectory of ``num_frames`` frames takes (0 for a single frame where
    nothing is generated)."""

  @abc.abstractmethod
  def chunk_inputs(self, c: int, lengths: np.ndarray, num_chunks: np.ndarray, Ks, poses,
                   depths, valids) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Host inputs of chunk ``c`` for Bp trajectory rows.

    Args:
      lengths: (Bp,) frames per row (padding rows: 1). num_chunks: (Bp,) (padding rows: 0).
      Ks, poses: Bp arrays (T_b, 3, 3), (T_b, 4, 4). depths: Bp arrays (T_b, H, W) or None.
      valids: Bp entries (T_b, H, W) bool or None (all observed): where the given depth was
        observed; a model writing the given depth lifts nothing from the rest.
    Returns:
      (chunk: the step's per-row inputs (Bp, ...), plan: what :meth:`oracle_chunk` and
      :meth:`trajectory_result` need of this chunk, e.g. frame indices, real frames).
    """

  def check_trajectory(self, where: str, first_frame, first_depth, intrinsics, poses_c2w,
                       depths, oracle_frames) -> None:
    """Family checks of one trajectory beyond the driver's (shapes, poses). Default: a model
    that writes the given depth (``needs_depths``) has the depth of every frame."""
    if not self.needs_depths:
      return
    h, w = self.image_hw
    T = np.shape(poses_c2w)[0]
    if depths is None:
      raise InputError(where, "depths", "with --depth_estimator=given every new frame is "
                       "written with its given depth: give the depth of all frames, or "
                       "estimate it (--depth_estimator=depth_anything --depth_model=...)")
    if np.shape(depths) != (T, h, w):
      raise InputError(where, "depths", f"expected ({T}, {h}, {w}), got {np.shape(depths)}")

  # ---------------------------------------------------------------- jitted pieces
  @abc.abstractmethod
  def params(self) -> tuple:
    """The step's parameters (replicated over the mesh): network states and constants."""

  @abc.abstractmethod
  def start(self, params, state, frame0, depth0, K0, c2w0, rng):
    """Frame 0 of one trajectory into the memory/context: ``(carry, first outputs)``.

    Args: state the memory to write into; frame0 (H, W, 3) in [-1, 1]; depth0 (H, W)
    (all zeros when not given: only a model without ``needs_first_depth`` gets that);
    valid0 (H, W) bool where depth0 was observed (nothing is lifted from the rest: a depth
    hole); K0 (3, 3); c2w0 (4, 4); rng (2,) uint32 key data.
    """

  @abc.abstractmethod
  def step(self, params, carry, chunk, *, oracle: bool):
    """One chunk of one trajectory: read memory -> objects/references -> denoise (the whole
    sampler) -> decode -> write (latents, depth, masks) -> next context. Returns
    ``(carry, outputs)``; outputs hold ``latents`` (dropped by the driver after timing)."""

  @abc.abstractmethod
  def encode_oracle(self, params, arrays: tuple) -> Any:
    """Ground-truth inputs of one row (see :meth:`oracle_chunk`) -> latents."""

  @abc.abstractmethod
  def oracle_chunk(self, encode, gts, order, plan, given, ctx_given) -> dict[str, Any]:
    """Ground-truth inputs of a chunk (the oracle row), encoded outside the step.

    Args:
      encode: ``arrays -> latents``, the jitted batched :meth:`encode_oracle`.
      gts: B entries None or (frames (N, H, W, 3) uint8, depths (N, H, W), valid (N, H, W)
      bool or None = all observed: nothing is lifted from the rest); order: (Bp,)
      the trajectory of each row; plan: :meth:`chunk_inputs`'s; given (Bp,) N per row;
      ctx_given (Bp,) frames that are also the clean context.
    """

  @property
  def frames_per_chunk(self) -> int:
    """Video frames each chunk after frame 0 adds (the small family: ``chunk``)."""
    return self.chunk

  # Video frames per memory write (the Wan family writes one latent per 4 frames).
  frames_per_write = 1

  def read_cameras(self, chunk) -> tuple:
    """(K, c2w) of ``chunk`` the memory is read into (batched like ``chunk``): the timed mode
    re-runs the backend's read on them. Default: one camera per generated frame."""
    return chunk["K"], chunk["c2w"]

  @abc.abstractmethod
  def written(self, chunk, out) -> tuple:
    """(latents, depth, K, c2w, static, frame, rgb or None) the step wrote, batched (Bp, ...):
    the timed mode re-runs the backend's write on them."""

  @abc.abstractmethod
  def trajectory_result(self, b: int, T: int, first, outs, plans, carry) -> dict[str, Any]:
    """Row ``b``'s family outputs (frames, depths, coverage, ...) from the host copies of
    :meth:`start`'s first outputs, every chunk's outputs and plan, and the final carry."""


def observed_rows(valids, idx: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Host: where each row's given depth was observed at its frames of a chunk.

  Args:
    valids: one entry per row, (T_b, H, W) bool or None (all observed).
    idx: (rows, F) frame indices of each row (inside its trajectory).
    hw: (H, W).
  Returns:
    (rows, F, H, W) bool.
  """
  return np.stack([np.ones((len(i),) + tuple(hw), bool) if v is None else np.asarray(v[i], bool)
                   for v, i in zip(valids, idx)])


def refuse_untrained_guidance(config: ml_collections.ConfigDict, scale: float | None,
                              field: str) -> None:
  """Refuses classifier-free guidance when ``config.denoiser.<field>`` (the conditioning
  dropout that trains the unconditional branch) is 0; a config without the field (a
  converted released model) keeps its own training and passes.

  ``scale``: the ``--guidance_scale`` flag, or None for ``config.sampler.guidance_scale``.
  """
  flag = "--guidance_scale" if scale is not None else "config.sampler.guidance_scale"
  scale = float(config.sampler.guidance_scale if scale is None else scale)
  if scale <= 0 or field not in config.denoiser:
    return
  if float(config.denoiser[field]) <= 0:
    raise InputError(flag, "guidance_scale", f"{scale} needs an unconditional branch, and "
                     f"this model was trained without one (config.denoiser.{field} = 0); "
                     f"sample without guidance or train with {field} > 0")


def with_defaults(config: ml_collections.ConfigDict, defaults: dict[str, Any]
                  ) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each missing dotted field of ``defaults`` set (present
  fields keep their values); the helper of the families' ``upgrade``."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for path, value in defaults.items():
      *parents, leaf = path.split(".")
      node = config
      for p in parents:
        if p not in node:
          node[p] = ml_collections.ConfigDict()
        node = node[p]
      if leaf not in node:
        node[leaf] = value
  return config
