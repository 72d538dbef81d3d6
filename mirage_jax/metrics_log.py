"""Training metrics to JSONL (always) and TensorBoard event files (no TensorFlow needed).

TensorBoard reads ``tfevents`` files: a sequence of length-prefixed, CRC32C-checked records,
each an ``Event`` protocol buffer. Scalars need only four proto fields, so they are encoded
here by hand rather than pulling in TensorFlow or tensorboardX.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Mapping

# ----------------------------------------------------------------------------- CRC32C


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialized ``tensorflow.Event``: wall_time=1 (double), step=2, file_version=3, summary=5."""
  msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    # Summary.value=1 (repeated Value); Value.tag=1 (string), Value.simple_value=2 (float).
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    msg += _field_bytes(5, values)
  return msg


def _record(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# ----------------------------------------------------------------------------- writer


class MetricsWriter:
  """Writes scalar metrics to ``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/``.

  Only process 0 writes (every process computes the same global metrics).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._events = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      tb_dir = os.path.join(workdir, "tensorboard")
      os.makedirs(tb_dir, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
      self._events = open(os.path.join(tb_dir, name), "ab")
      self._events.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
      self._events.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one JSON line ``{"step": step, **scalars}`` and one TensorBoard event."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._events is not None:
      self._events.write(_record(_event(time.time(), int(step), scalars=values)))
      self._events.flush()

  def close(self) -> None:
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Reads back scalar events written by :class:`MetricsWriter`, checking every CRC.

  Returns:
    ``(step, {tag: value})`` per event that holds scalars, in file order.
  """
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc_len,) = struct.unpack("<I", data[pos + 8:pos + 12])
    body = data[pos + 12:pos + 12 + length]
    (crc_body,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    if crc_len != _masked_crc(header) or crc_body != _masked_crc(body):
      raise ValueError(f"{path}: corrupt record at byte {pos}")
    pos += 16 + length
    step, scalars = _parse_event(body)
    if scalars:
      out.append((step, scalars))
  return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, pos


def _fields(buf: bytes):
  """Yields ``(field_number, wire_type, value)`` of a serialized proto message."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      length, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield number, wire, value


def _parse_event(buf: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for number, _, value in _fields(buf):
    if number == 2:
      step = value
    elif number == 5:
      for _, _, v in _fields(value):
        fields = {n: x for n, _, x in _fields(v)}
        scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return step, scalars
