"""Figures of the code's shape: import cycles, family branches, module sizes, contract breaks.

  python benchmarks/code_shape.py

Prints, from the source alone (nothing of the project is imported): the import cycles
between modules of mirage_jax/, data_pipelines/ and experiments/; the comparisons with a
family's name (``== "wan"``, ``!= "small"``, ...) outside the registry
``mirage_jax/families/__init__.py``, all and outside ``mirage_jax/families/``; the largest
module and its lines; the lines of the library and of every .py outside tests/; and how many
imports break each rule of the import contract (``tests/test_import_contract.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import test_import_contract as contract  # pylint: disable=g-import-not-at-top


if __name__ == "__main__":
  contract.print_code_shape()
