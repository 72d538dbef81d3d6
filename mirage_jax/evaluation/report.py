"""Report outputs: metrics JSON, the scaling-benchmark file, console tables and plots.

Every file is written atomically (``mirage_jax.atomic.atomic_output``, re-exported here): to a
temporary name in the target directory, then ``os.replace``d into place, so a reader never
sees a half-written file and a failed write leaves any previous file untouched.

Plots use matplotlib's object API (``Figure`` + the Agg canvas ``savefig`` picks for PNG),
not pyplot, so no global backend or figure state is touched.

``scaling.json`` schema: a JSON list of entries, one per (backend, trajectory length)::

  {"backend": str, "frames": int, "cache_bytes": int,
   "memory_seconds_per_chunk": float, "chunk_seconds": float}

``frames`` > 0; the other numbers >= 0 and finite; no other keys.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mirage_jax.atomic import atomic_output  # noqa: F401 (re-exported: report.atomic_output)
from mirage_jax.errors import InputError

SCALING_FIELDS = {
    "backend": str,
    "frames": int,
    "cache_bytes": int,
    "memory_seconds_per_chunk": float,
    "chunk_seconds": float,
}


# ----------------------------------------------------------------------------- JSON


def _to_json(value: Any) -> Any:
  """NumPy/JAX values to plain JSON types; non-finite floats to None (strict JSON)."""
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, str) or value is None or isinstance(value, bool):
    return value
  if hasattr(value, "__array__") or isinstance(value, (int, float, np.generic)):
    array = np.asarray(value)
    if array.dtype.kind in "biuU":
      return array.tolist()
    # Floats of any width (bfloat16 included, whose dtype kind is not "f").
    return _nan_to_none(array.astype(np.float64).tolist())
  raise TypeError(f"write_metrics_json: cannot store {type(value).__name__} as JSON")


def _nan_to_none(value):
  if isinstance(value, list):
    return [_nan_to_none(v) for v in value]
  return value if math.isfinite(value) else None


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
  """Writes a (nested) dict of numbers, arrays and strings as indented strict JSON.

  Arrays become lists; NaN and +-inf become ``null`` (e.g. a masked PSNR over an empty mask).
  """
  text = json.dumps(_to_json(metrics), indent=2, allow_nan=False)
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text + "\n")


# ----------------------------------------------------------------------------- scaling.json


def validate_scaling(entries: Any, where: str) -> list[dict[str, Any]]:
  """Checks a scaling list against the schema; returns it with canonical Python types.

  Raises:
    InputError: naming ``where`` and the field, e.g. ``[3].cache_bytes``.
  """
  if not isinstance(entries, list):
    raise InputError(where, "scaling", f"expected a JSON list of entries, got {type(entries).__name__}")
  out = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, Mapping):
      raise InputError(where, f"[{i}]", f"expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(SCALING_FIELDS))
    if unknown:
      raise InputError(where, f"[{i}].{unknown[0]}", f"unknown field (allowed: {', '.join(SCALING_FIELDS)})")
    clean = {}
    for name, kind in SCALING_FIELDS.items():
      field = f"[{i}].{name}"
      if name not in entry:
        raise InputError(where, field, "missing")
      value = entry[name]
      if kind is str:
        if not isinstance(value, str) or not value:
          raise InputError(where, field, f"expected a non-empty string, got {value!r}")
      elif kind is int:
        # bool is an int subclass in Python; a flag where a count belongs is a bug upstream.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
          raise InputError(where, field, f"expected an integer, got {value!r}")
        value = int(value)
        if value < (1 if name == "frames" else 0):
          raise InputError(where, field, f"expected {'> 0' if name == 'frames' else '>= 0'}, got {value}")
      else:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
          raise InputError(where, field, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
          raise InputError(where, field, f"expected a finite number >= 0, got {value}")
      clean[name] = value
    out.append(clean)
  return out


def write_scaling_json(path: str | os.PathLike, entries: Sequence[Mapping[str, Any]]) -> None:
  """Validates ``entries`` (see module docstring) and writes them atomically."""
  clean = validate_scaling(list(entries), os.fspath(path))
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(clean, f, indent=2, allow_nan=False)
      f.write("\n")


def read_scaling_json(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads and validates a scaling file.

  Raises:
    InputError: missing file, invalid JSON, or a bad entry (names the field).
  """
  where = os.fspath(path)
  try:
    with open(where) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise InputError(where, "scaling", "file not found") from e
  except json.JSONDecodeError as e:
    raise InputError(where, "scaling", f"invalid JSON: {e}") from e
  return validate_scaling(data, where)


# ----------------------------------------------------------------------------- tables


def format_cell(value: Any, float_format: str = ".3f") -> str:
  """One table cell: floats with ``float_format``; missing values and NaN as ``-``."""
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)):
    return "-" if math.isnan(value) else format(float(value), float_format)
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 float_format: str = ".3f") -> str:
  """Markdown table (also readable as plain text) of ``rows`` restricted to ``columns``.

  Floats use ``float_format``; missing values and NaN show as ``-``.
  """
  body = [[format_cell(row.get(c), float_format) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[k]) for r in body]) for k, c in enumerate(columns)]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |" for r in body]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _figure(**kwargs):
  """A matplotlib ``Figure``: imported here, so that the commands that never plot (training,
  export, most refusals) start without matplotlib."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(**kwargs)


def _save(fig, path: str | os.PathLike) -> None:
  with atomic_output(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_quality_vs_frame(path: str | os.PathLike, curves: Mapping[str, Any],
                          ylabel: str = "PSNR (dB)", title: str | None = None) -> None:
  """One line per backend of a per-frame metric against frame index, saved as PNG.

  Args:
    curves: backend name -> (T,) per-frame values (NaN gaps are left as gaps).
  """
  fig = _figure(figsize=(7, 4))
  ax = fig.subplots()
  for name, values in curves.items():
    values = np.asarray(values, np.float64).reshape(-1)
    ax.plot(np.arange(values.size), values, label=name, linewidth=1.5)
  ax.set_xlabel("frame index")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_cost_vs_length(path: str | os.PathLike, entries: Sequence[Mapping[str, Any]],
                        title: str | None = None) -> None:
  """Log-log cost against trajectory length per backend, saved as PNG.

  Left panel: cache bytes. Right panel: memory seconds per chunk (solid) and whole-chunk
  seconds (dashed). Zero values (e.g. the no-memory backend's cache) cannot sit on a log axis
  and are left out of the lines.

  Args:
    entries: validated scaling entries (see :func:`validate_scaling`).
  """
  entries = validate_scaling(list(entries), os.fspath(path))
  fig = _figure(figsize=(11, 4))
  ax_bytes, ax_time = fig.subplots(1, 2)
  backends = sorted({e["backend"] for e in entries})
  for k, name in enumerate(backends):
    rows = sorted((e for e in entries if e["backend"] == name), key=lambda e: e["frames"])
    frames = np.array([e["frames"] for e in rows], np.float64)
    colour = f"C{k % 10}"

    def line(ax, key, style, label):
      y = np.array([e[key] for e in rows], np.float64)
      keep = y > 0
      if keep.any():
        ax.plot(frames[keep], y[keep], style, color=colour, marker="o", markersize=3, label=label)

    line(ax_bytes, "cache_bytes", "-", name)
    line(ax_time, "memory_seconds_per_chunk", "-", f"{name} (memory)")
    line(ax_time, "chunk_seconds", "--", f"{name} (chunk)")
  for ax, ylabel in ((ax_bytes, "cache bytes"), (ax_time, "seconds per chunk")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trajectory length (frames)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  _save(fig, path)
