"""``index.html``: one static page per evaluation (no server, no network, no scripts fetched).

It shows, from what the evaluation left in its output directory: PASS/FAIL of every project
claim the benchmark's rows allow (``revisit.claims``, ``scaling.claims``,
``objects_benchmark.claims``), the summary tables, every plot (``*.png``, relative links),
per trajectory the videos side by side (``ground_truth`` first, then each row:
``videos/<trajectory>/<row>.mp4``, H.264 MP4, which Debian's Chromium plays; BENCHMARKS.md),
and the command and model config that produced it. Links are relative, so the directory can
be copied or served as it is.

:func:`write_summary_index` writes the main job's page over several evaluations.
"""

from __future__ import annotations

import html
import json
import os
import urllib.parse
from typing import Any, Mapping, Sequence

from mirage_jax.atomic import atomic_output
from mirage_jax.evaluation import lpips, report

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.pass { color: #fff; background: #2a7d2e; padding: 0 0.4em; font-weight: bold; }
.fail { color: #fff; background: #b3261e; padding: 0 0.4em; font-weight: bold; }
.videos { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.9em; text-align: center; }
img.plot { max-width: 48%; margin: 0.3em; border: 1px solid #ddd; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; }
"""

# Restarts every video of one trajectory together (they autoplay, but start at load times
# that differ); inline, no external script.
_SCRIPT = """
function playTogether(id) {
  for (const v of document.querySelectorAll('#' + id + ' video')) {
    v.currentTime = 0; v.play().catch(() => {});
  }
}
"""

_esc = html.escape


def _url(relative: str) -> str:
  return urllib.parse.quote(relative.replace(os.sep, "/"))


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], float_format=".3f") -> str:
  head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
  body = "".join("<tr>" + "".join(f"<td>{_esc(report.format_cell(r.get(c), float_format))}</td>"
                                  for c in columns) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _claims(claims: Mapping[str, bool]) -> str:
  if not claims:
    return "<p>No project claim applies to the rows of this evaluation.</p>"
  items = "".join(f'<li><span class="{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span> '
                  f"{_esc(claim)}</li>" for claim, ok in claims.items())
  return f'<ul class="claims">{items}</ul>'


def _plots(output_dir: str) -> str:
  names = sorted(n for n in os.listdir(output_dir) if n.endswith(".png"))
  return "".join(f'<img class="plot" src="{_url(n)}" alt="{_esc(n)}" title="{_esc(n)}">'
                 for n in names)


def _videos(output_dir: str, rows: Sequence[str], caption: str) -> str:
  """Per trajectory, ground truth then each row's panel video."""
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  root = os.path.join(output_dir, "videos")
  if not os.path.isdir(root):
    return ""
  order = [revisit.GROUND_TRUTH, *rows]
  parts = [f"<h2>Videos</h2><p>{_esc(caption)}</p>"]
  for k, traj in enumerate(sorted(os.listdir(root))):
    names = [n[:-4] for n in os.listdir(os.path.join(root, traj)) if n.endswith(".mp4")]
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    figures = "".join(
        f'<figure><video src="{_url(f"videos/{traj}/{n}.mp4")}" autoplay loop muted playsinline '
        f'controls preload="auto"></video><figcaption>{_esc(n)}</figcaption></figure>'
        for n in names)
    parts.append(f'<h3>{_esc(traj)} <button onclick="playTogether(\'t{k}\')">play together'
                 f'</button></h3><div class="videos" id="t{k}">{figures}</div>')
  return "".join(parts)


def _revisit_body(metrics: Mapping[str, Any]) -> tuple[dict, str, list[str]]:
  from mirage_jax.evaluation import revisit  # pylint: disable=g-import-not-at-top
  claims, parts, rows = {}, [], []
  for group in ("revisit", "memory_maze"):
    if group not in metrics:
      continue
    summary = metrics[group]["summary"]
    if group == "revisit":
      claims = revisit.claims(summary)
    names = [r for r, s in summary.items() if r != "reference" and isinstance(s, dict)]
    rows += [r for r in names if r not in rows]
    # LPIPS columns always: a number, or that no weights were given.
    columns = [c for c in revisit.SCALARS if c.startswith("lpips")
               or any(summary[r].get(c) is not None for r in names)]
    table_rows = lpips.table_rows([dict(row=revisit.row_label(r), **summary[r]) for r in names],
                                  columns, metrics.get("lpips"))
    table_rows.append(dict(row="ground truth (floor)", **summary.get("reference", {})))
    per_traj = [dict(trajectory=t, **{r: res["rows"][r].get("psnr_revisit") for r in res["rows"]})
                for t, res in metrics[group]["trajectories"].items()]
    parts.append(
        f"<h2>{_esc(group)}: {len(metrics[group]['trajectories'])} trajectories, "
        f"{summary.get('revisit_frames', 0)} revisit frames</h2>"
        + _table(table_rows, ["row", *columns])
        + "<h3>revisit PSNR (dB) per trajectory</h3>" + _table(per_traj, ["trajectory", *names]))
  return claims, "".join(parts), rows


def _scaling_body(metrics: Mapping[str, Any]) -> tuple[dict, str, list[str]]:
  from mirage_jax.evaluation import scaling  # pylint: disable=g-import-not-at-top
  entries = metrics["entries"]
  return (scaling.claims(entries),
          "<h2>Cost against trajectory length</h2>" + _table(entries, list(report.SCALING_FIELDS), ".4f"),
          [])


def _objects_body(metrics: Mapping[str, Any]) -> tuple[dict, str, list[str]]:
  from mirage_jax.evaluation import objects_benchmark as bench  # pylint: disable=g-import-not-at-top
  summary, rows = metrics["summary"], list(metrics["rows"])
  counts = ", ".join(f"{summary[c]} {c.replace('_', ' ')}" for c in bench.COUNTS if c in summary)
  return (bench.claims(summary),
          f"<h2>Moving objects: {len(metrics['trajectories'])} trajectories, {_esc(counts)}</h2>"
          + _table(lpips.table_rows([dict(row=r, **summary[r]) for r in rows if r in summary],
                                    bench.SCALARS, metrics.get("lpips")), ["row", *bench.SCALARS]),
          rows)


def _memory_maze_body(metrics: Mapping[str, Any]) -> tuple[dict, str, list[str]]:
  """The revisit body of the Memory Maze protocol, after its table beside the paper's figures."""
  from mirage_jax.evaluation import memory_maze_protocol as protocol  # pylint: disable=g-import-not-at-top
  claims, body, rows = _revisit_body(metrics)
  head = ("<h2>Memory Maze protocol beside Po et al. 2025</h2><p>"
          + _esc(protocol.format_table(metrics).splitlines()[0]) + "</p>"
          + _table(protocol.table_rows(metrics[protocol.GROUP]["summary"], metrics.get("lpips")),
                   list(protocol.COLUMNS)))
  return claims, head + body, rows


_BODIES = dict(revisit=(_revisit_body, "Each row's video: generated | ground truth | memory "
                        "coverage (white: the memory read covers the pixel)."),
               memory_maze=(_memory_maze_body, "Each row's video: generated | ground truth | "
                            "memory coverage (the first half is given)."),
               scaling=(_scaling_body, ""),
               objects=(_objects_body, "Each row's video: generated | ground truth | predicted "
                        "moving-content mask."))


def _page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}'
          f"</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>\n<body>"
          f"<h1>{_esc(title)}</h1>{body}</body></html>\n")


def write_index(output_dir: str, *, command: Sequence[str] | None = None,
                config_json: str | None = None) -> str:
  """Writes ``<output_dir>/index.html`` for the evaluation whose ``metrics.json`` is there.

  Args:
    output_dir: an evaluation's output directory (``mirage_jax.evaluate --output_dir``).
    command: the command line that produced it (shown verbatim).
    config_json: the model's config as JSON text (shown in a collapsed block).
  Returns:
    The page's path.
  """
  with open(os.path.join(output_dir, "metrics.json")) as f:
    metrics = json.load(f)
  benchmark = metrics["benchmark"]
  make_body, caption = _BODIES[benchmark]
  claims, tables, rows = make_body(metrics)
  settings = {k: v for k, v in metrics.items()
              if not isinstance(v, (dict, list)) or k in ("backends", "rows", "lengths", "pairing")}
  body = (f"<h2>Claims</h2>{_claims(claims)}{tables}<h2>Plots</h2>{_plots(output_dir)}"
          f"{_videos(output_dir, rows, caption)}<h2>Settings</h2>"
          f"<pre>{_esc(json.dumps(settings, indent=2))}</pre>")
  if command:
    body += f"<h2>Command</h2><pre>{_esc(' '.join(command))}</pre>"
  if config_json:
    body += f"<details><summary>Model config</summary><pre>{_esc(config_json)}</pre></details>"
  body += '<p>All numbers: <a href="metrics.json">metrics.json</a>.</p>'
  path = os.path.join(output_dir, "index.html")
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      f.write(_page(f"mirage_jax evaluation: {benchmark}", body))
  return path


def write_summary_index(directory: str, claims: Mapping[str, bool],
                        reports: Mapping[str, str], *, command: Sequence[str] | None = None) -> str:
  """``<directory>/index.html``: every claim's PASS/FAIL and links to the evaluations' pages.

  Args:
    claims: claim -> holds.
    reports: name -> path of an evaluation's ``index.html`` (linked relative to ``directory``).
  """
  links = "".join(f'<li><a href="{_url(os.path.relpath(p, directory))}">{_esc(name)}</a></li>'
                  for name, p in reports.items())
  body = f"<h2>Claims</h2>{_claims(claims)}<h2>Evaluations</h2><ul>{links}</ul>"
  if command:
    body += f"<h2>Command</h2><pre>{_esc(' '.join(command))}</pre>"
  path = os.path.join(directory, "index.html")
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      f.write(_page("mirage_jax: main job report", body))
  return path
