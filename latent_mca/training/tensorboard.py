"""TensorBoard scalar event files in pure Python: no TensorFlow, torch or tensorboardX.

A file `events.out.tfevents.<time>.<host>.<pid>.<n>` is a sequence of TFRecords:

  uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

(little-endian), each `data` a serialized `tensorboard.Event` protobuf, encoded by hand:
Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5 }
Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
The first record is the file_version event "brain.Event:2"; then one event per
`scalars` call. TensorBoard reads every file of a folder whose name holds "tfevents".

Values: anything `float()` accepts except str/bytes (ints, bools as 0/1, numpy and
0-d jax scalars) is written as a float32 `simple_value`; NaN and +-inf are kept, finite
values beyond float32's range become +-inf. Anything else (strings, None, lists,
non-scalar arrays) is skipped, so a JSON metric record can be passed as it is.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from typing import Iterator, Mapping

FILE_VERSION = "brain.Event:2"
_FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
_MASK_DELTA = 0xA282EAD8
_UINT64 = (1 << 64) - 1


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    crc = n
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C (Castagnoli) of `data`, continuing from `crc` (the CRC of what came before)."""
  crc ^= 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The CRC TFRecord stores: crc32c rotated right by 15 bits plus 0xa282ead8 (mod 2^32)."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= _UINT64  # int64 two's complement: a negative step takes 10 bytes, as in protobuf
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
    value = math.copysign(math.inf, value)  # struct would raise OverflowError
  return struct.pack("<f", value)


def scalar_value(value) -> float | None:
  """`value` as the float a scalar summary holds, or None for a value that is skipped."""
  if isinstance(value, (str, bytes, bytearray)):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def encode_event(wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """A serialized Event: wall_time, step (left out when 0, as protobuf does), and either
  a file_version or a Summary of `scalars` (tag -> float, written in order)."""
  out = bytearray(b"\x09" + struct.pack("<d", wall_time))
  if step:
    out += b"\x10" + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars is not None:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + _float32(value))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  return bytes(out)


def encode_scalars(step: int, values: Mapping, wall_time: float | None = None) -> bytes:
  """The framed record of one step's scalars (skipped values left out; see the module
  docstring), or b"" when none is left."""
  kept = {str(tag): x for tag, v in values.items() if (x := scalar_value(v)) is not None}
  if not kept:
    return b""
  wall_time = time.time() if wall_time is None else wall_time
  return encode_record(encode_event(wall_time, step, scalars=kept))


def file_header(wall_time: float | None = None) -> bytes:
  """The framed file_version record every event file starts with."""
  wall_time = time.time() if wall_time is None else wall_time
  return encode_record(encode_event(wall_time, file_version=FILE_VERSION))


_counter = itertools.count()


def event_file_name(wall_time: float | None = None) -> str:
  """A new file name TensorBoard reads: events.out.tfevents.<time>.<host>.<pid>.<n>."""
  wall_time = time.time() if wall_time is None else wall_time
  return (f"events.out.tfevents.{int(wall_time):010d}.{socket.gethostname()}"
          f".{os.getpid()}.{next(_counter)}")


def is_event_file(name: str) -> bool:
  """Whether TensorBoard reads a file of this name (it looks for "tfevents" in it)."""
  return "tfevents" in os.path.basename(name)


class EventWriter:
  """Writes scalar summaries to a new event file in `logdir` (made if missing).

  Each `scalars` call is written and flushed at once, so a killed process loses
  nothing already logged. Usable as a context manager.
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, event_file_name(now))
    self._file = open(self.path, "wb")
    self._file.write(file_header(now))
    self._file.flush()

  def scalars(self, step: int, values: Mapping, wall_time: float | None = None) -> None:
    """Logs `values` (tag -> number) at `step`; non-numeric values are skipped."""
    record = encode_scalars(step, values, wall_time)
    if record:
      self._file.write(record)
      self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# Reading.


def _records(path: str) -> Iterator[bytes]:
  """The data of each TFRecord of `path`, both CRCs checked.

  Raises:
    ValueError: a truncated record or a CRC mismatch (file and offset named).
  """
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    header = data[offset:offset + 12]
    if len(header) < 12:
      raise ValueError(f"{path}: truncated record header at byte {offset}")
    length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
    if masked_crc32c(length_bytes) != length_crc:
      raise ValueError(f"{path}: corrupt record at byte {offset} (length CRC mismatch)")
    (length,) = struct.unpack("<Q", length_bytes)
    start, end = offset + 12, offset + 12 + length
    if end + 4 > len(data):
      raise ValueError(f"{path}: truncated record at byte {offset}")
    payload = data[start:end]
    if masked_crc32c(payload) != struct.unpack("<I", data[end:end + 4])[0]:
      raise ValueError(f"{path}: corrupt record at byte {offset} (data CRC mismatch)")
    yield payload
    offset = end + 4


def _fields(message: bytes) -> Iterator[tuple[int, int, int | bytes]]:
  """(field number, wire type, value) of each field of a protobuf message."""
  pos = 0

  def varint() -> int:
    nonlocal pos
    result = shift = 0
    while True:
      byte = message[pos]
      pos += 1
      result |= (byte & 0x7F) << shift
      shift += 7
      if not byte & 0x80:
        return result

  while pos < len(message):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 1:
      value, pos = message[pos:pos + 8], pos + 8
    elif wire == 2:
      size = varint()
      value, pos = message[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = message[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos > len(message):
      raise ValueError(f"field {field} runs past the end of its message")
    yield field, wire, value


def _event_scalars(event: bytes) -> list[tuple[int, str, float]]:
  step, out = 0, []
  for field, wire, value in _fields(event):
    if field == 2 and wire == 0:
      step = value - (1 << 64) if value >> 63 else value
    elif field == 5 and wire == 2:
      for vfield, vwire, entry in _fields(value):
        if vfield != 1 or vwire != 2:
          continue
        tag, simple = None, None
        for efield, ewire, item in _fields(entry):
          if efield == 1 and ewire == 2:
            tag = item.decode()
          elif efield == 2 and ewire == 5:
            simple = struct.unpack("<f", item)[0]
        if tag is not None and simple is not None:
          out.append((tag, simple))
  return [(step, tag, value) for tag, value in out]


def event_files(logdir: str) -> list[str]:
  """The event files of `logdir`, sorted by name (TensorBoard's reading order)."""
  return [os.path.join(logdir, name) for name in sorted(os.listdir(logdir))
          if is_event_file(name)]


def read_scalars(path: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file, or in every event file of a
  folder (in name order), in the order written; values as the float32 stored.

  Raises:
    ValueError: a truncated or corrupt record, or a malformed event (file named).
  """
  paths = event_files(path) if os.path.isdir(path) else [path]
  out = []
  for file in paths:
    for index, event in enumerate(_records(file)):
      try:
        out.extend(_event_scalars(event))
      except (IndexError, UnicodeDecodeError, ValueError, struct.error) as e:
        raise ValueError(f"{file}: malformed event in record {index}: {e}") from None
  return out
