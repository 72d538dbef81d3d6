"""Local paths and ``gs://`` URLs behind one set of helpers (workdirs, exports, outputs).

Everything that takes a directory (``--workdir``, ``--output``, ``--checkpoint``,
``--output_dir``, ``--data_dir``) may name a local path or a Cloud Storage URL
(``gs://bucket/prefix``). Remote paths go through ``etils.epath`` (which uses fsspec/gcsfs for
``gs://`` when TensorFlow is absent); Orbax and TensorStore read and write ``gs://``
checkpoints natively; ArrayRecord reads ``gs://`` shards natively.

Cloud Storage has no directories, no appends and no renames, so:

* ``makedirs`` is a no-op there (an object's name implies its prefixes);
* one object upload is atomic, so ``write_text`` needs no temporary name there (locally it
  writes a temporary file and renames it);
* files that grow (metrics) are written to a local folder and copied up (:class:`Mirror`);
* outputs made of many files (videos, reports) are written locally, then uploaded
  (:func:`staged_dir`).

Credentials are the usual Google ones (Application Default Credentials). For an emulator:
``STORAGE_EMULATOR_HOST`` (gcsfs), ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore, Orbax) and
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (ArrayRecord).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from typing import IO, Iterator, Sequence

from mirage_jax.errors import InputError


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL with a scheme (``gs://...``), False for a local path."""
  return "://" in os.fspath(path)


def _epath(path: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  # Other processes (the trainer, other hosts) change the bucket: fsspec's listing cache
  # would keep showing what was there at the first listing.
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
  return epath.Path(path)


def resolve(path: str | os.PathLike) -> str:
  """The form Orbax and TensorStore take: an absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths; ``/``-joined for URLs."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  """A local directory, or a URL prefix with at least one object under it."""
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names directly under ``path`` (files and sub-directories / sub-prefixes)."""
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def list_files(root: str) -> list[str]:
  """Every file under ``root`` at any depth, as sorted ``/``-separated relative paths.

  Under a URL: one recursive listing (fsspec ``find``), not a request per file.
  """
  if is_remote(root):
    import fsspec  # pylint: disable=g-import-not-at-top
    _epath(root)  # the listing-cache setting
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    return sorted(p[len(base) + 1:] for p in fs.find(base) if p.startswith(base + "/"))
  out = []
  for folder, _, names in os.walk(root):
    rel = os.path.relpath(folder, root)
    out += [name if rel == "." else "/".join([*rel.split(os.sep), name]) for name in names]
  return sorted(out)


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; nothing to create under a URL."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """The builtin ``open`` for local paths, epath's for URLs."""
  return _epath(path).open(mode) if is_remote(path) else builtins.open(path, mode)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` so that a reader never sees half of it.

  Locally: a temporary name in the same directory, then ``os.replace``. Under a URL: one
  object upload, which Cloud Storage makes visible whole or not at all.
  """
  if is_remote(path):
    _epath(path).write_text(text)
    return
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                     f".{os.path.basename(path)}.{os.getpid()}.tmp")
  with builtins.open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def remove_tree(path: str) -> None:
  """Removes a local directory tree or every object under a URL prefix (missing: no-op)."""
  if is_remote(path):
    if _epath(path).exists():
      _epath(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def upload(local: str, remote: str) -> None:
  """Copies one local file to ``remote`` (one object upload)."""
  with builtins.open(local, "rb") as src, _epath(remote).open("wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 22)


def download(path: str, local: str) -> None:
  """Copies the file at ``path`` (a URL or a local path) to the local file ``local``."""
  with open(path, "rb") as src, builtins.open(local, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 22)


def read_bytes(path: str | os.PathLike) -> bytes:
  """The whole content of the file at ``path`` (local or URL: one download)."""
  with open(os.fspath(path), "rb") as f:
    return f.read()


@contextlib.contextmanager
def local_file(path: str | os.PathLike) -> Iterator[str]:
  """A local path holding the file at ``path``, for readers of local files only (ffmpeg).

  Local ``path``: yields it. URL: a temporary copy (same base name), deleted when the block
  ends.
  """
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  folder = tempfile.mkdtemp(prefix="mirage_copy_")
  try:
    local = os.path.join(folder, path.rstrip("/").rsplit("/", 1)[-1])
    download(path, local)
    yield local
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def upload_tree(local_dir: str, remote_dir: str, last: Sequence[str] = ()) -> list[str]:
  """Copies every file under ``local_dir`` to the same relative names under ``remote_dir``.

  Files whose base name is in ``last`` go after all the others (a marker that says the folder
  is complete, e.g. TFDS's ``dataset_info.json``).

  Returns:
    The relative names copied (``/``-separated), in upload order.
  """
  names = sorted(list_files(local_dir), key=lambda rel: rel.rpartition("/")[2] in last)
  for rel in names:
    upload(os.path.join(local_dir, *rel.split("/")), join(remote_dir, *rel.split("/")))
  return names


def require_local(path: str | None, flag: str, instead: str = "") -> None:
  """Raises InputError (naming ``flag``) if ``path`` is a URL: the flag takes local paths only.

  For flags whose readers or writers are local-file code (torch, safetensors, numpy, Beam,
  renames); ``instead`` says what to do (e.g. copy the files down first).
  """
  if path and is_remote(path):
    raise InputError(flag, flag.lstrip("-"), f"{path}: takes local paths only"
                     + (f" ({instead})" if instead else ""))


def check_reachable(path: str | None, flag: str) -> None:
  """Raises InputError (naming ``flag``) unless ``path``'s bucket is reachable and visible.

  Local paths and None pass (their own checks come later). Cloud Storage errors vary (no
  credentials: 401/403; no such bucket; no network: connection errors after retries), so
  any failure of one listing is reported, in one line.
  """
  if path is None or not is_remote(path):
    return
  scheme, _, rest = path.partition("://")
  bucket = rest.split("/", 1)[0]
  if not bucket:
    raise InputError(flag, flag.lstrip("-"), f"{path}: no bucket name")
  root = f"{scheme}://{bucket}"
  if scheme == "gs" and importlib.util.find_spec("gcsfs") is None:
    raise InputError(flag, flag.lstrip("-"), f"{path}: gs:// paths need gcsfs (pip install "
                     "'mirage_jax[gcs]')")
  # gcsfs logs a traceback when it gives up; the one line below says it instead.
  quiet = logging.getLogger("gcsfs")
  level = quiet.level
  quiet.setLevel(logging.CRITICAL)
  try:
    found = _epath(root).exists()
  except Exception as e:  # pylint: disable=broad-except  # gcsfs/aiohttp/auth errors vary
    raise InputError(flag, flag.lstrip("-"), f"cannot reach {root} ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]}; credentials? network?)") from None
  finally:
    quiet.setLevel(level)
  if not found:
    raise InputError(flag, flag.lstrip("-"), f"bucket {root} does not exist or these "
                     "credentials cannot see it")


@contextlib.contextmanager
def staged_dir(path: str, flag: str, overwrite: bool = False) -> Iterator[str]:
  """A local directory to write an output folder into; uploaded to ``path`` if it is a URL.

  Local ``path``: yields ``path`` itself. URL: refuses a non-empty prefix unless
  ``overwrite``, yields a fresh temporary directory, uploads its files when the block ends
  without an exception (each file one object: a reader sees whole files), then deletes it.
  """
  if not is_remote(path):
    yield path
    return
  check_reachable(path, flag)
  if not overwrite and isdir(path) and listdir(path):
    raise InputError(flag, flag.lstrip("-"), f"{path} exists and is not empty (pass "
                     "--overwrite to replace its files)")
  local = tempfile.mkdtemp(prefix="mirage_stage_")
  try:
    yield local
    upload_tree(local, path)
  finally:
    shutil.rmtree(local, ignore_errors=True)


class Mirror:
  """A local folder whose files are copied to a remote folder now and then.

  For files that grow by appends (metrics): Cloud Storage objects cannot be appended to, so
  they are written locally and the whole file is uploaded again by :meth:`sync`, at most every
  ``every_s`` seconds (an object takes about one update a second) and at :meth:`close`. A run
  killed between syncs loses the lines since the last one.

  Args:
    remote: the remote folder (a URL).
    resume: file names to download first if they exist (so appends continue them).
    every_s: the least time between two uploads of the same files.
  """

  def __init__(self, remote: str, resume: Sequence[str] = (), every_s: float = 30.0):
    self.remote, self.every_s = remote, float(every_s)
    self.local = tempfile.mkdtemp(prefix="mirage_mirror_")
    for name in resume:
      if exists(join(remote, name)):
        download(join(remote, name), os.path.join(self.local, name))
    self._uploaded: dict[str, tuple[int, int]] = {
        name: self._stamp(os.path.join(self.local, name)) for name in resume
        if os.path.exists(os.path.join(self.local, name))}
    self._last = -float("inf")

  @staticmethod
  def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns

  def sync(self, force: bool = False) -> None:
    """Uploads the files changed since the last upload (if ``every_s`` has passed or ``force``)."""
    if not force and time.monotonic() - self._last < self.every_s:
      return
    for root, _, names in os.walk(self.local):
      for name in names:
        full = os.path.join(root, name)
        rel = os.path.relpath(full, self.local)
        stamp = self._stamp(full)
        if self._uploaded.get(rel) != stamp:
          upload(full, join(self.remote, *rel.split(os.sep)))
          self._uploaded[rel] = stamp
    self._last = time.monotonic()

  def close(self) -> None:
    """Uploads what changed, then deletes the local folder."""
    try:
      self.sync(force=True)
    finally:
      shutil.rmtree(self.local, ignore_errors=True)
