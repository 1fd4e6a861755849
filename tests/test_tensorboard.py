"""TensorBoard event files written in pure Python, and MetricsLog's mirror of metrics.jsonl."""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest

from latent_mca.training import metrics, tensorboard as tb


def bitwise_crc32c(data: bytes) -> int:
  """CRC-32C bit by bit, independent of the module's table."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
  return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_vectors():
  # "123456789" is the standard check value; the 32-byte ones are RFC 3720's (iSCSI).
  assert tb.crc32c(b"123456789") == 0xE3069283
  assert tb.crc32c(b"") == 0
  assert tb.crc32c(b"a") == 0xC1D04330
  assert tb.crc32c(bytes(32)) == 0x8A9136AA
  assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tb.crc32c(bytes(range(32))) == 0x46DD794E
  assert tb.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
  assert tb.crc32c(b"6789", tb.crc32c(b"12345")) == 0xE3069283  # continued
  data = bytes(range(256)) * 3
  assert tb.crc32c(data) == bitwise_crc32c(data)


def test_masked_crc():
  # rotr15(0xE3069283) = 0x2507C60D, + 0xA282EAD8 = 0xC78AB0E5 (worked by hand).
  assert tb.masked_crc32c(b"123456789") == 0xC78AB0E5
  assert masked(0xE3069283) == 0xC78AB0E5


def test_record_bytes_by_hand():
  event = tb.encode_event(1.5, 3, scalars={"a": 0.5})
  value = b"\x0a\x01a" + b"\x15" + b"\x00\x00\x00\x3f"  # tag "a"; simple_value 0.5f
  summary = b"\x0a" + bytes([len(value)]) + value  # Summary.value (field 1)
  expected = (b"\x09" + b"\x00\x00\x00\x00\x00\x00\xf8\x3f"  # wall_time 1.5 (double)
              + b"\x10\x03"  # step 3
              + b"\x2a" + bytes([len(summary)]) + summary)  # summary (field 5)
  assert event == expected and len(event) == 23
  length = b"\x17" + bytes(7)  # 23 as uint64
  record = (length + struct.pack("<I", masked(bitwise_crc32c(length))) + expected
            + struct.pack("<I", masked(bitwise_crc32c(expected))))
  assert tb.encode_record(event) == record
  assert tb.encode_scalars(3, {"a": 0.5, "skipped": "text"}, wall_time=1.5) == record

  header = tb.encode_event(2.0, file_version="brain.Event:2")
  assert header == b"\x09" + struct.pack("<d", 2.0) + b"\x1a\x0dbrain.Event:2"
  assert tb.file_header(2.0) == tb.encode_record(header)


def test_step_varints():
  assert tb.encode_event(0.0, 300)[9:] == b"\x10\xac\x02"
  assert tb.encode_event(0.0, -1)[9:] == b"\x10" + b"\xff" * 9 + b"\x01"  # int64: 10 bytes
  assert tb.encode_event(0.0, 0) == b"\x09" + bytes(8)  # proto3 leaves the default out


def test_writer_reader_round_trip(tmp_path):
  with tb.EventWriter(str(tmp_path)) as writer:
    writer.scalars(1, {"loss": 0.25, "eval/acc": 1, "flag": True, "name": "x", "none": None,
                       "list": [1, 2], "np": np.float32(0.75), "neg": -2.5,
                       "nan": math.nan, "inf": -math.inf, "big": 1e300})
    writer.scalars(2**40, {"loss": 0.125})
    writer.scalars(3, {"name": "only text"})  # nothing numeric: no event
    writer.scalars(-7, {"loss": 1.0})
    # Flushed as written: readable before close.
    read = tb.read_scalars(writer.path)
  name = os.path.basename(writer.path)
  assert name.startswith("events.out.tfevents.") and os.listdir(tmp_path) == [name]
  assert repr(tb.read_scalars(str(tmp_path))) == repr(read)  # repr: nan != nan
  nan = [r for r in read if r[1] == "nan"]
  assert len(nan) == 1 and nan[0][0] == 1 and math.isnan(nan[0][2])
  assert [r for r in read if r[1] != "nan"] == [
      (1, "loss", 0.25), (1, "eval/acc", 1.0), (1, "flag", 1.0), (1, "np", 0.75),
      (1, "neg", -2.5), (1, "inf", -math.inf), (1, "big", math.inf),
      (2**40, "loss", 0.125), (-7, "loss", 1.0)]
  data = open(writer.path, "rb").read()
  # The first record: wall_time, then file_version (field 3) alone.
  assert struct.unpack("<Q", data[:8])[0] == 24 and data[12] == 0x09
  assert data[12 + 9:12 + 24] == b"\x1a\x0dbrain.Event:2"


def test_corrupt_files_named(tmp_path):
  with tb.EventWriter(str(tmp_path)) as writer:
    writer.scalars(5, {"loss": 0.5})
  good = open(writer.path, "rb").read()
  cases = {"data CRC": bytearray(good), "length CRC": bytearray(good), "truncated": good[:-3]}
  cases["data CRC"][-6] ^= 0x01  # inside the last event's value
  cases["length CRC"][len(good) - 4 - 23 - 12] ^= 0x01  # the last record's length
  for kind, data in cases.items():
    path = tmp_path / f"events.out.tfevents.{kind.replace(' ', '_')}"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}.*{kind}"):
      tb.read_scalars(str(path))
  assert tb.read_scalars(writer.path) == [(5, "loss", 0.5)]


def tb_scalars(stage_dir) -> list:
  return tb.read_scalars(os.path.join(stage_dir, "tb"))


def test_metrics_log_mirrors_and_resets(tmp_path):
  stage = tmp_path / "stage"
  path = str(stage / "metrics.jsonl")
  log = metrics.MetricsLog(path)
  log.reset([])
  records = [{"step": s, "loss": 2.0**-s, "eval/accuracy": s / 8} for s in (1, 2, 3, 4)]
  for record in records[:2]:
    log.append(record)
  log.append({"note": "no step"})  # jsonl only, as before
  log.append({"step": 3, "loss": 0.25, "phase": "text"})
  assert metrics.read_metrics(path) == records[:2] + [{"note": "no step"},
                                                      {"step": 3, "loss": 0.25, "phase": "text"}]
  assert tb_scalars(stage) == [(1, "loss", 0.5), (1, "eval/accuracy", 0.125),
                               (2, "loss", 0.25), (2, "eval/accuracy", 0.25), (3, "loss", 0.25)]

  # A resumed run: restored history of steps 1-2; the killed run's step 3 must go.
  resumed = metrics.MetricsLog(path)
  (stage / "tb" / ".reset.1.tmp").write_bytes(b"left by a killed reset")
  resumed.reset(records[:2])
  assert sorted(os.listdir(stage / "tb")) == [os.path.basename(resumed._events)]
  resumed.append(records[2])
  expected = [(r["step"], k, v) for r in records[:3] for k, v in r.items() if k != "step"]
  assert tb_scalars(stage) == expected
  assert metrics.read_metrics(path) == records[:3]
  assert not any(name.endswith(".tmp") for name in os.listdir(stage))


def test_metrics_log_append_without_reset(tmp_path):
  log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"))
  log.append({"step": 1, "loss": 2.0})
  log.append({"step": 2, "loss": 1.0})
  files = os.listdir(tmp_path / "tb")
  assert len(files) == 1 and tb.is_event_file(files[0])
  assert tb_scalars(tmp_path) == [(1, "loss", 2.0), (2, "loss", 1.0)]
  metrics.MetricsLog(str(tmp_path / "metrics.jsonl")).append({"step": 3, "loss": 0.5})
  assert len(os.listdir(tmp_path / "tb")) == 2  # mirrors the jsonl, which keeps all three
  assert [s for s, _, _ in tb_scalars(tmp_path)] == [1, 2, 3]


def test_tensorboard_reads_the_files(tmp_path):
  """TensorBoard's own reader (a test dependency) reads what we write."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.compat.proto import event_pb2
  log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"))
  log.reset([{"step": 0, "eval/reward": 0.5}])
  log.append({"step": 10, "loss": 0.25, "eval/reward": 0.75})
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["eval/reward", "loss"]
  assert [(e.step, e.value) for e in acc.Scalars("eval/reward")] == [(0, 0.5), (10, 0.75)]
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 0.25)]
  event = event_pb2.Event.FromString(tb.encode_event(1.5, -3, scalars={"a": 0.5}))
  assert (event.wall_time, event.step, event.summary.value[0].tag,
          event.summary.value[0].simple_value) == (1.5, -3, "a", 0.5)
