"""The import contract: which module may import which (docs/DESIGN.md, "Shape of the code").

Reads the source with ``ast`` and imports nothing of the project, so it runs in a second
and also on a tree that does not import. Scanned: ``mirage_jax/``, ``data_pipelines/``,
``experiments/`` (tests and benchmarks may import anything). Every import counts, those
inside functions too: a deferred import is still a dependency.

An edge A -> B exists when A's source names B:
  * ``import B`` / ``import B as x``: B (the longest prefix of B that is a module here);
  * ``from P import n``: ``P.n`` when that is a module, else P (``n`` is a name in P);
  * relative imports are resolved against A's package first.
Running a package's ``__init__`` before its submodule is NOT an edge: ``pkg/__init__`` that
imports ``pkg.sub``, with ``pkg.sub`` importing ``pkg.other`` (or ``from pkg import other``,
a module), is no cycle. ``pkg.sub`` doing ``from pkg import helper`` (a name defined or
re-exported by ``pkg/__init__``) or ``import pkg`` is an edge to ``pkg`` and, with the
``__init__`` importing ``pkg.sub``, a real cycle: it works only by import order.

Rules (each a test below; the message names the rule and the module pair):
  (a) no import cycles;
  (b) nothing under ``mirage_jax/`` or ``data_pipelines/`` imports ``experiments``;
  (c) no module imports a command-line module (``CLIS``; each module with a ``__main__``
      block must be listed there);
  (d) layers: a module imports only the layers its own layer lists in ``LAYERS``; every
      module belongs to a layer;
  (e) a family never imports another family; the registry ``mirage_jax.families`` imports
      no family (it loads them by name); layers marked ``via_registry`` reach a family only
      through the registry (``mirage_jax.families.get``), never ``mirage_jax.families.<name>``.

``python benchmarks/code_shape.py`` prints the figures of :func:`code_shape` (cycles, family
string branches, module sizes); ``pytest -s`` prints them too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mirage_jax", "data_pipelines", "experiments")

# Layer -> (modules, layers it may import). A module belongs to the layer of its longest
# matching entry ("a.b" matches a.b and a.b.*, "=a" only a). Entries that do not exist are fine.
LAYERS: dict[str, dict] = {
    # L0: no model, no family, no config.
    "core": dict(modules=(
        "mirage_jax.errors", "mirage_jax.paths", "mirage_jax.atomic", "mirage_jax.geometry",
        "mirage_jax.diffusion", "mirage_jax.sharding", "mirage_jax.distributed",
        "mirage_jax.checkpoint", "mirage_jax.metrics_log", "mirage_jax.prefetch", "mirage_jax.faults",
        "mirage_jax.weight_files",
        "=mirage_jax"), may_import=("core",)),
    # L1: shared network blocks, the spatial memory, the world-model interface, and the
    # training pieces a family's stage builds on (the Stage protocol, FLOP counting).
    "base": dict(modules=(
        "mirage_jax.nn", "mirage_jax.memory", "mirage_jax.world_model", "mirage_jax.depth",
        "mirage_jax.text",
        "mirage_jax.training.flops", "mirage_jax.training.stage"),
        may_import=("core", "base")),
    # L1 (beside base): clip sources, dataset builders and readers. They read and write
    # frames and latents; they know no model. Pre-encoding to latents needs a family's VAE,
    # so it is a command-line tool (data_pipelines.encode_latents, in CLIS).
    "data": dict(modules=("data_pipelines",), may_import=("core", "data")),
    # L2: one package per family, and the registry that loads them by name.
    "families": dict(modules=("mirage_jax.families",),
                     may_import=("core", "base", "data", "families")),
    # Configs: experiments/ may use families' config helpers; the library never imports it.
    "configs": dict(modules=("experiments",),
                    may_import=("core", "base", "data", "families", "configs")),
    # L3: the one rollout driver, the training loop, evaluation. Family-agnostic: a family
    # only through mirage_jax.families.get.
    "services": dict(modules=(
        "mirage_jax.rollout", "mirage_jax.training", "mirage_jax.evaluation"),
        may_import=("core", "base", "data", "families", "services"), via_registry=True),
    # L4: command-line tools. Imported by nothing (rule c), so they may import any layer.
    "clis": dict(modules=(
        "mirage_jax.main", "mirage_jax.generate", "mirage_jax.evaluate", "mirage_jax.export",
        "mirage_jax.aot", "mirage_jax.convert_wan", "mirage_jax.convert_depth",
        "mirage_jax.convert_text", "mirage_jax.worldscore_generate", "mirage_jax.evaluate_re10k",
        "mirage_jax.main_job",
        "data_pipelines.build", "data_pipelines.encode_latents", "data_pipelines.make_geometry",
        "data_pipelines.cut_clips"),
        may_import=("core", "base", "data", "families", "services", "clis")),
}
CLIS = frozenset(LAYERS["clis"]["modules"])
REGISTRY = "mirage_jax.families"
# (importer, imported) -> why it is allowed anyway. Empty: the contract holds everywhere.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Module:
  name: str
  path: str  # relative to ROOT
  is_package: bool
  tree: ast.Module


@functools.cache
def modules() -> dict[str, Module]:
  """Every module of PACKAGES, by dotted name."""
  found = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
      for f in sorted(filenames):
        if not f.endswith(".py"):
          continue
        path = os.path.relpath(os.path.join(dirpath, f), ROOT)
        parts = path[:-3].split(os.sep)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
          tree = ast.parse(fh.read(), path)
        found[name] = Module(name, path, is_package, tree)
  return found


def _resolve(name: str, mods: dict[str, Module]) -> str | None:
  """The longest prefix of dotted ``name`` that is a module here, or None (not ours)."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    if ".".join(parts[:i]) in mods:
      return ".".join(parts[:i])
  return None


def edges(mods: dict[str, Module]) -> dict[tuple[str, str], int]:
  """(importer, imported) -> line of the first such import, for every edge (module docstring)."""
  found: dict[tuple[str, str], int] = {}
  for m in mods.values():
    package = m.name if m.is_package else m.name.rpartition(".")[0]
    for node in ast.walk(m.tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
          base = ".".join(base + ([node.module] if node.module else []))
        else:
          base = node.module
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      for t in targets:
        target = _resolve(t, mods)
        if target and target != m.name:
          found[(m.name, target)] = min(node.lineno, found.get((m.name, target), node.lineno))
  return found


def layer_of(name: str) -> str | None:
  best, best_len = None, -1
  for layer, spec in LAYERS.items():
    for pattern in spec["modules"]:
      exact = pattern.startswith("=")
      pattern = pattern.lstrip("=")
      if (name == pattern or not exact and name.startswith(pattern + ".")) and (
          len(pattern) > best_len):
        best, best_len = layer, len(pattern)
  return best


def family_of(name: str) -> str | None:
  """``x`` for mirage_jax.families.x[.*], else None (the registry itself included)."""
  if name.startswith(REGISTRY + "."):
    return name.split(".")[2]
  return None


def cycles(graph: dict[tuple[str, str], int]) -> list[list[str]]:
  """The import cycles: one shortest cycle (a -> ... -> a) per strongly connected group."""
  succ: dict[str, list[str]] = {}
  for a, b in sorted(graph):
    succ.setdefault(a, []).append(b)
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def strong(v):  # Tarjan; the graph is small, recursion is fine
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in succ.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for v in sorted(succ):
    if v not in index:
      strong(v)
  found = []
  for group in sorted(groups):
    start, members = group[0], set(group)
    paths, seen = {start: [start]}, {start}
    queue = [start]
    while queue:  # breadth first: the shortest way back to start
      v = queue.pop(0)
      for w in succ.get(v, ()):
        if w == start:
          found.append(paths[v] + [start])
          queue = []
          break
        if w in members and w not in seen:
          seen.add(w)
          paths[w] = paths[v] + [w]
          queue.append(w)
  return found


def _has_main_block(tree: ast.Module) -> bool:
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
      return True
  return False


def violations() -> dict[str, list[str]]:
  """Rule -> messages ("rule: importer (path:line) imports imported"), one per bad edge."""
  mods = modules()
  graph = edges(mods)
  out: dict[str, list[str]] = {r: [] for r in ("a", "b", "c", "d", "e")}

  def where(a, b):
    return f"{a} ({mods[a].path}:{graph[(a, b)]}) imports {b}"

  out["a"] = ["(a) import cycle: " + " -> ".join(c) for c in cycles(graph)
              if not all((x, y) in ALLOWED for x, y in zip(c, c[1:]))]
  for name, m in sorted(mods.items()):
    if _has_main_block(m.tree) and name not in CLIS:
      out["c"].append(f"(c) {name} ({m.path}) has a __main__ block: list it in CLIS")
    if layer_of(name) is None:
      out["d"].append(f"(d) {name} ({m.path}) is in no layer: add it to LAYERS")
  for (a, b) in sorted(graph):
    if (a, b) in ALLOWED:
      continue
    la, lb = layer_of(a), layer_of(b)
    if b.split(".")[0] == "experiments" and a.split(".")[0] != "experiments":
      out["b"].append(f"(b) the library never imports experiments/: {where(a, b)}")
    elif b in CLIS:
      out["c"].append(f"(c) command-line modules are imported by nothing: {where(a, b)}")
    elif la and lb and lb not in LAYERS[la]["may_import"]:
      out["d"].append(f"(d) layer {la} may import only {'/'.join(LAYERS[la]['may_import'])}, "
                      f"not {lb}: {where(a, b)}")
    fa, fb = family_of(a), family_of(b)
    if fb and fa and fa != fb:
      out["e"].append(f"(e) a family never imports another family: {where(a, b)}")
    elif fb and a == REGISTRY:
      out["e"].append(f"(e) the registry loads families by name only: {where(a, b)}")
    elif fb and la and LAYERS[la].get("via_registry"):
      out["e"].append(f"(e) layer {la} reaches a family only through "
                      f"mirage_jax.families.get: {where(a, b)}")
  return out


def _check(rule: str) -> None:
  found = violations()[rule]
  assert not found, f"{len(found)} violation(s) of rule ({rule}):\n" + "\n".join(found)


def test_no_import_cycles():
  _check("a")


def test_library_does_not_import_experiments():
  _check("b")


def test_no_module_imports_a_cli():
  _check("c")


def test_imports_point_down_the_layers():
  _check("d")


def test_families_are_independent_and_reached_through_the_registry():
  _check("e")


# --- figures of the code's shape (benchmarks/code_shape.py) --------------------------------

FAMILY_NAMES = ("wan", "small")


def _names_a_family(node: ast.AST) -> bool:
  if isinstance(node, ast.Constant):
    return node.value in FAMILY_NAMES
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return any(_names_a_family(e) for e in node.elts)
  return False


def family_branches(mods: dict[str, Module]) -> list[str]:
  """``path:line`` of each comparison with a family's name (``== "wan"``, ``!= "small"``,
  ``in ("wan", ...)``) outside the registry: each one is a family branch in shared code."""
  found = []
  for name, m in sorted(mods.items()):
    if name == REGISTRY:
      continue
    for node in ast.walk(m.tree):
      if isinstance(node, ast.Compare) and any(
          _names_a_family(x) for x in [node.left, *node.comparators]):
        found.append(f"{m.path}:{node.lineno}")
  return found


def code_shape() -> dict:
  """The figures: import cycles, family branches, largest module, lines of .py outside tests/."""
  mods = modules()
  sizes = {}
  for dirpath, dirnames, filenames in os.walk(ROOT):
    rel = os.path.relpath(dirpath, ROOT)
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in (
        "__pycache__", "node_modules") and not (rel == "." and d == "tests")]
    for f in filenames:
      if f.endswith(".py"):
        with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
          sizes[os.path.normpath(os.path.join(rel, f))] = sum(1 for _ in fh)
  library = {p: n for p, n in sizes.items() if p.split(os.sep)[0] in PACKAGES}
  largest = max(library, key=library.get)
  found = cycles(edges(mods))
  branches = family_branches(mods)
  return {"import_cycles": len(found), "cycles": [" -> ".join(c) for c in found],
          "family_branches": len(branches),
          "family_branches_outside_families": sum(
              not b.startswith(os.path.join("mirage_jax", "families", "")) for b in branches),
          "branches": branches,
          "largest_module": largest, "largest_module_lines": library[largest],
          "library_lines": sum(library.values()), "py_lines_outside_tests": sum(sizes.values()),
          "violations": {r: len(v) for r, v in violations().items()}}


def print_code_shape() -> None:
  for key, value in code_shape().items():
    if isinstance(value, list):
      print(f"{key}:", *value, sep="\n  ")
    else:
      print(f"{key}: {value}")


def test_print_code_shape():
  print()
  print_code_shape()
