"""Metrics: one JSON object per line in ``metrics.jsonl``, and TensorBoard event files.

The event files are written here in TensorBoard's on-disk format (TFRecord framing of
``Event`` protocol buffers holding scalar summaries), so no TensorFlow, tensorboard or
protobuf package is needed to produce them; ``tensorboard --logdir WORKDIR`` reads them.
"""

from __future__ import annotations

import json
import math
import pathlib
import socket
import struct
import time

import numpy as np

from effseq.train.workdir import WorkdirError, write_atomic

# CRC-32C (Castagnoli), reflected polynomial: TFRecord frames carry masked CRC-32C checksums.
_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars=None, file_version=None) -> bytes:
    """An ``Event`` message: wall_time (1, double), step (2, int64), and either file_version
    (3, string) or a summary (5) of ``Value``s with tag (1) and simple_value (2, float)."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(
                1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)
            )
            for tag, value in scalars.items()
        )
        out += _length_delimited(5, values)
    return out


def frame(record: bytes) -> bytes:
    """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(record))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + record
        + struct.pack("<I", masked_crc32c(record))
    )


class TensorBoardWriter:
    """Scalars to ``DIR/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str | pathlib.Path):
        logdir = pathlib.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = logdir / name
        self._file = open(self.path, "ab")
        self._file.write(frame(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def write(self, step: int, scalars: dict[str, float]):
        finite = {k: float(v) for k, v in scalars.items() if _is_number(v)}
        if finite:
            self._file.write(frame(encode_event(time.time(), step, scalars=finite)))
            self._file.flush()

    def close(self):
        self._file.close()


class MetricsWriteError(WorkdirError):
    """A metrics file could not be written (e.g. the disk is full); names the file."""


class _named:
    """Re-raises an OSError as :class:`MetricsWriteError` naming ``path``."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if (
            kind is not None
            and issubclass(kind, OSError)
            and not isinstance(error, MetricsWriteError)
        ):
            reason = error.strerror or str(error)
            raise MetricsWriteError(
                f"cannot write {self.path}: {reason}; the run stopped, and resumes from its "
                "last checkpoint once this is fixed"
            ) from None
        return False


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _jsonable(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep them visible as strings
    return v


class MetricsWriter:
    """``DIR/metrics.jsonl`` (one object per logged step, with ``step``) and TensorBoard files
    under ``DIR/tensorboard``. Only process 0 writes (``enabled``)."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            workdir = pathlib.Path(workdir)
            self._path = workdir / "metrics.jsonl"
            with _named(self._path):
                self._jsonl = open(self._path, "a")
                self._tb = TensorBoardWriter(workdir / "tensorboard")

    def write(self, step: int, metrics: dict):
        """Appends one record to both files. A failed write (a full disk) raises one error
        naming the file; what it left half-written is dropped when the run resumes."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with _named(self._path):
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        with _named(self._tb.path):
            self._tb.write(step, {k: v for k, v in record.items() if k != "step"})

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str | pathlib.Path, *, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file. A line that does not parse is an error naming
    ``file:line``, except, with ``torn_tail_ok``, a last line without its newline: what a
    write cut short (a kill or a full disk) leaves, dropped."""
    path = pathlib.Path(path)
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == len(lines):  # the text did not end with a newline
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return out


def truncate_jsonl(path: pathlib.Path, step: int) -> int:
    """Keeps the records up to ``step`` (a torn last line dropped), atomically; returns how
    many records were removed."""
    if not path.exists():
        return 0
    records = read_jsonl(path, torn_tail_ok=True)
    kept = [r for r in records if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text():
        write_atomic(path, text)
    return len(records) - len(kept)


def read_records(data: bytes) -> tuple[list[bytes], int]:
    """TFRecord frames -> (records, bytes of complete frames); an incomplete or damaged tail
    frame ends the list."""
    out, at = [], 0
    while at + 12 <= len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        end = at + 12 + length + 4
        if end > len(data) or struct.unpack("<I", data[at + 8 : at + 12])[0] != masked_crc32c(
            header
        ):
            break
        record = data[at + 12 : at + 12 + length]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc32c(record):
            break
        out.append(record)
        at = end
    return out, at


def event_step(record: bytes) -> int:
    """The ``step`` field (2) of an encoded ``Event`` (0 when absent)."""
    at = 0
    while at < len(record):
        key, at = _read_varint(record, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(record, at)
            if number == 2:
                return value
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _read_varint(record, at)
            at += length
        else:
            break
    return 0


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def truncate_events(logdir: pathlib.Path, step: int) -> int:
    """Drops the events after ``step`` (and a torn tail frame) from every event file under
    ``logdir``, atomically per file, so a resumed run logs each step once; returns how many
    events were removed."""
    removed = 0
    for path in sorted(logdir.glob("events.out.tfevents.*")) if logdir.exists() else []:
        data = path.read_bytes()
        records, _ = read_records(data)
        kept = [r for r in records if event_step(r) <= step]
        removed += len(records) - len(kept)
        new = b"".join(frame(r) for r in kept)
        if new != data:
            write_atomic(path, new)
    return removed
