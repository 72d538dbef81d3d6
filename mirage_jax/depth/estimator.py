"""Where the depth of generated frames comes from: the choice, and the monocular estimator.

``estimator`` (the ``--depth_estimator`` flag of ``generate`` / ``evaluate``):

  * ``given``: the input's depth of every frame (oracle geometry: tests, upper bounds).
    ``generate`` then needs a geometry file with the depth of all frames.
  * ``decoder``: the small family's RGB-D decoder's own depth (that family's default).
  * ``depth_anything``: a Depth Anything V2 export (``--depth_model``: converted from the
    released weights by ``mirage_jax.convert_depth``, or trained by the ``depth`` stage), run
    inside the jitted chunk step on the decoded frames, then aligned (:mod:`.align`):
    a metric model by a robust scale, a relative one by scale and shift of inverse depth,
    fitted to the memory's depth where the memory covers the frame and carried over from
    the last fit (first: frame 0's given depth, or the metric estimate itself) where not.

:class:`Monocular` holds the network (split NNX state, passed to the step as a parameter)
and its two jittable pieces, :meth:`Monocular.first` (frame 0) and :meth:`Monocular.chunk`
(the new frames of a chunk), which both families call from their chunk step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.depth import ESTIMATORS
from mirage_jax.depth import align as align_lib
from mirage_jax.depth import depth_anything
from mirage_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class DepthOptions:
  """Checked depth choice of a world model (:func:`depth_options`).

  Attributes:
    estimator: one of ``ESTIMATORS``.
    model: the Depth Anything V2 export directory (``depth_anything`` only).
    align: fit each estimate to the memory (False: the raw estimate; metric models only).
    min_cells: latent cells of memory coverage a frame needs for its own fit.
  """
  estimator: str
  model: str = ""
  align: bool = True
  min_cells: int = 8


def depth_options(estimator: str | None, model: str | None, align: bool | None, *,
                  default: str, allowed: tuple[str, ...], family: str) -> DepthOptions:
  """The checked :class:`DepthOptions` of the command line's (or caller's) choice.

  ``estimator`` None: ``depth_anything`` when a ``model`` is given, else ``default``.
  Raises an InputError naming the flag for a choice the family cannot take.
  """
  if estimator is None:
    estimator = "depth_anything" if model else default
  if estimator not in ESTIMATORS:
    raise InputError("--depth_estimator", "depth_estimator",
                     f"expected one of {ESTIMATORS}, got {estimator!r}")
  if estimator not in allowed:
    raise InputError("--depth_estimator", "depth_estimator", f"the {family} family takes "
                     f"{allowed}, got {estimator!r}")
  if estimator == "depth_anything" and not model:
    raise InputError("--depth_model", "depth_model", "depth_anything needs a Depth Anything "
                     "V2 export (mirage_jax.convert_depth, or a trained 'depth' stage)")
  if model and estimator != "depth_anything":
    raise InputError("--depth_model", "depth_model", f"only depth_anything reads a depth "
                     f"model; the estimator is {estimator!r}")
  if align is not None and estimator != "depth_anything":
    raise InputError("--depth_align", "depth_align", "only depth_anything is aligned")
  return DepthOptions(estimator, model or "", True if align is None else bool(align))


class Monocular:
  """A Depth Anything V2 network run inside the chunk step, and its alignment.

  The alignment state carried from chunk to chunk is ``fit`` (2,) float32: the last
  (scale, shift) that maps the network's output to depth: metric models ``depth = s * out``
  (shift 0), relative models ``1 / depth = s * out + t``.

  Args:
    model: a ``depth_anything.DepthAnythingV2``; model_cfg: its ``depth_model`` config.
    align: fit to the memory (else the raw metric output: scale 1).
    min_cells: latent cells a frame's own fit needs.
  """

  def __init__(self, model: nnx.Module, model_cfg, *, align: bool = True, min_cells: int = 8):
    self.kind = str(model_cfg.kind)
    if self.kind not in ("metric", "relative"):
      raise InputError("depth model", "kind", f"expected 'metric' or 'relative', got {self.kind!r}")
    if self.kind == "relative" and not align:
      raise InputError("--depth_align", "depth_align", "a relative depth model's output is "
                       "depth only once aligned (its scale and shift are unknown)")
    self.align, self.min_cells = bool(align), int(min_cells)
    self.graphdef, self.state = nnx.split(model)

  @classmethod
  def from_options(cls, options: DepthOptions) -> "Monocular | None":
    """The estimator of ``options`` (None unless ``depth_anything``), its export loaded."""
    if options.estimator != "depth_anything":
      return None
    model, model_cfg = depth_anything.load_export(options.model)
    return cls(model, model_cfg, align=options.align, min_cells=options.min_cells)

  @property
  def needs_first_depth(self) -> bool:
    """A relative model cannot give frame 0 a metric depth: it must be given."""
    return self.kind == "relative"

  def _raw(self, state, rgb):
    """(F, H, W, 3) in [-1, 1] -> (F, H, W) the network's output at image resolution."""
    return depth_anything.estimate(nnx.merge(self.graphdef, state), rgb)

  def _to_depth(self, out, fit):
    """Network output (F, H, W) and fits (F, 2) -> (F, H, W) depth."""
    s, t = fit[:, 0, None, None], fit[:, 1, None, None]
    if self.kind == "metric":
      return out * s
    return 1.0 / jnp.maximum(out * s + t, 1e-6)

  def _fit(self, out, memory_depth, coverage, min_cells):
    """Per-frame fits (F, 2) and which frames got one (F,) bool."""
    if self.kind == "metric":
      s, enough = align_lib.median_scale(out, memory_depth, coverage, min_cells=min_cells)
      return jnp.stack([s, jnp.zeros_like(s)], -1), enough
    a, b, enough = align_lib.inverse_affine(out, memory_depth, coverage, min_cells=min_cells)
    return jnp.stack([a, b], -1), enough

  def first(self, state, frame0, depth0):
    """Frame 0's depth and the first fit.

    Args:
      frame0: (H, W, 3) in [-1, 1]. depth0: (H, W) its given depth, or all zeros when not
        given (then the metric estimate itself is frame 0's depth and the fit is 1).
    Returns:
      depth (H, W) (the given one when given), fit (2,) float32.
    """
    out = self._raw(state, frame0[None])
    given = jnp.any(depth0 > 0)
    fit, _ = self._fit(out, depth0[None], (depth0 > 0)[None], 1)
    if not self.align:
      fit = jnp.array([[1.0, 0.0]], jnp.float32)
    fit = jnp.where(given, fit, jnp.array([[1.0, 0.0]], jnp.float32))
    depth = jnp.where(given, depth0, self._to_depth(out, fit)[0])
    return depth, fit[0]

  def chunk(self, state, rgb, memory_depth, coverage, fit):
    """Depth of a chunk's new frames, each fitted to the memory where it covers enough.

    Args:
      rgb: (F, H, W, 3) decoded frames in [-1, 1].
      memory_depth: (F, h, w) the memory read's depth at their cameras (0 where empty), or
        None (a backend that reads no depth: every frame takes the carried fit).
      coverage: (F, h, w) bool.
      fit: (2,) the carried fit.
    Returns:
      depth (F, H, W) float32, the new carried fit (2,) (the last frame's), own (F,) bool
      the frames fitted to the memory (the others take the newest fit before them).
    """
    out = self._raw(state, rgb)
    f = out.shape[0]
    carried = jnp.broadcast_to(fit, (f, 2))
    if not self.align or memory_depth is None:
      return self._to_depth(out, carried), fit, jnp.zeros((f,), bool)
    own_fit, own = self._fit(out, memory_depth, coverage, self.min_cells)
    # A frame without its own fit takes the newest one before it (frames are in time order).
    last = jax.lax.cummax(jnp.where(own, jnp.arange(f), -1), axis=0)
    fits = jnp.where((last >= 0)[:, None], own_fit[jnp.maximum(last, 0)], carried)
    return self._to_depth(out, fits), fits[-1], own


def abs_rel(depth, true_depth):
  """Mean |depth - true| / true over pixels with true depth > 0 (host or traced)."""
  ok = true_depth > 0
  return jnp.sum(jnp.where(ok, jnp.abs(depth - true_depth) / jnp.where(ok, true_depth, 1.0),
                           0.0)) / jnp.maximum(ok.sum(), 1)


__all__ = ["DepthOptions", "ESTIMATORS", "Monocular", "abs_rel", "depth_options"]
