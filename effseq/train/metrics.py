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
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            self._tb = TensorBoardWriter(workdir / "tensorboard")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._tb.write(step, {k: v for k, v in record.items() if k != "step"})

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
