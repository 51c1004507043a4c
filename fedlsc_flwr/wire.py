"""The wire protocol between the FedLSC strategies and a site's ClientApp.

What travels in a round, besides Flower's own ``arrays``/``metrics``/``config`` records:

- ConfigRecord keys the server sets: :data:`PERSONALIZED_LAYERS_KEY` (layers that stay on
  the sites), :data:`PROXIMAL_MU_KEY` (μ of Eq. 7, Flower's FedProx name) and
  :data:`UPDATE_DTYPE_KEY` ("float16" asks for w_i − w_g in float16: half the bytes).
- A ConfigRecord :data:`SITE_RECORD_KEY` in every reply, naming the site, and optionally
  :data:`TIMING_RECORD_KEY`, when the site did what (for round-cost reports).
- Arrays in ``.npy`` bytes, read without a copy (:func:`array_view`) and written with one
  (:func:`array_from_numpy`).

numpy and Flower's record types only: the ClientApp imports this, not the strategies.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
from flwr.app import Array, ConfigRecord, Message

from fedlsc_flwr.similarity import layer_of

#: ConfigRecord key that tells clients which layers stay on the site.
PERSONALIZED_LAYERS_KEY = "personalized-layers"
#: ConfigRecord key of the proximal coefficient μ (the name Flower's FedProx uses).
PROXIMAL_MU_KEY = "proximal-mu"
#: ConfigRecord key: "float16" asks clients to reply with w_i − w_g in float16.
UPDATE_DTYPE_KEY = "update-dtype"
UPDATE_DTYPES = ("float32", "float16")
#: ConfigRecord key: True asks clients to add CLASS_COUNTS_METRIC to their train replies
#: (the class-weighted head aggregation needs it; off, sites do not disclose it).
CLASS_COUNTS_KEY = "report-class-counts"
#: Train-reply metric, when asked for: the site's number of training images per class.
CLASS_COUNTS_METRIC = "train-class-counts"
#: ConfigRecord key: the federation's training images per class (the sum of the sites'
#: last reported counts), for sites that balance their sampling over the federation.
CLASS_TOTALS_KEY = "class-totals"
#: ConfigRecord a ClientApp adds to its replies: {"name": "<site name>"}.
SITE_RECORD_KEY = "site"
#: ConfigRecord of a float16 reply: {tensor key: e}, the delta was sent as Δw·2^e.
UPDATE_SCALE_KEY = "update-scale"
#: A float16 delta is scaled so that its largest |value| lies in (2^13, 2^14]: far from
#: float16's overflow (65504) and from its subnormals (< 6.1e-5), whatever the delta's size.
_FLOAT16_TOP_EXPONENT = 14
#: ConfigRecord a ClientApp may add to its replies: wall-clock marks (seconds since the
#: epoch) of how it handled the message, e.g. "train-start" and "train-end".
TIMING_RECORD_KEY = "timing"


def is_personalized(key: str, layers: Collection[str]) -> bool:
    """Does tensor ``key`` stay on the site? ``layers`` holds layer or tensor names."""
    return key in layers or layer_of(key) in layers


# ------------------------------------------------------------------ site identity
def site_record(name: str) -> ConfigRecord:
    """What a ClientApp puts under :data:`SITE_RECORD_KEY` in every reply."""
    return ConfigRecord({"name": name})


def site_name_in(msg: Message) -> str | None:
    """The site name a reply carries, if any."""
    if msg.has_error() or SITE_RECORD_KEY not in msg.content.config_records:
        return None
    name = msg.content.config_records[SITE_RECORD_KEY].get("name")
    return str(name) if name else None


# ------------------------------------------------------------------ payload
def message_bytes(message: Message) -> int:
    """Bytes of array payload a message carries (what dominates the traffic)."""
    if message.has_error():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values()
               for array in record.values())


# ------------------------------------------------------------------ float16 deltas
def encode_update(local: np.ndarray, sent: np.ndarray, update_dtype: str
                  ) -> tuple[np.ndarray, int]:
    """What a site sends back for one tensor, and the power-of-two exponent ``e`` it was
    scaled by: its weights (e = 0), or (w_i − w_g)·2^e in float16.

    Unscaled float16 deltas lose small updates: below 6.1e-5 float16 is subnormal, and
    at |Δ| ≈ 1e-7 the error was 17 % of the update's norm. A power of two scales exactly.
    """
    if update_dtype != "float16" or local.dtype.kind != "f":
        return local, 0
    delta = local.astype(np.float64) - sent
    top = float(np.max(np.abs(delta))) if delta.size else 0.0
    if not np.isfinite(top) or top == 0.0:  # NaN/Inf go out as they are, to be refused
        return delta.astype(np.float16), 0
    exponent = _FLOAT16_TOP_EXPONENT - int(np.ceil(np.log2(top)))
    return np.ldexp(delta, exponent).astype(np.float16), exponent


def decode_update(received: np.ndarray, global_value: np.ndarray, exponent: int = 0
                  ) -> np.ndarray:
    """w_i from a float16 delta sent as Δw·2^e: w_g + Δw, in the global tensor's dtype."""
    delta = np.ldexp(received.astype(np.float64), -exponent) if exponent else received
    return (global_value + delta.astype(global_value.dtype)).astype(global_value.dtype)


# ------------------------------------------------------------------ .npy codec
def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an Array's bytes, without the copy ``Array.numpy()`` makes.

    The ``.npy`` header is checked against the Array's declared dtype and shape with
    byte comparisons (parsing it with numpy costs more than the aggregation itself);
    anything unexpected falls back to numpy's own reader.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or data[:6] != b"\x93NUMPY":
        return array.numpy()
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    header = data[:start]
    expected_shape = repr(shape).encode()
    if (f"'descr': '{dtype.str}'".encode() not in header
            or b"'shape': " + expected_shape not in header
            or len(data) - start != math.prod(shape) * dtype.itemsize):
        value = array.numpy()
        if value.shape != shape:
            raise ValueError(f"holds shape {value.shape}, declared {shape}")
        return value
    order = "F" if b"'fortran_order': True" in header else "C"
    flat = np.frombuffer(data, dtype=dtype, offset=start)
    return flat.reshape(shape, order=order)


def array_from_numpy(value: np.ndarray) -> Array:
    """An Array holding ``value`` in ``.npy`` format, as ``Array(value)`` makes it, but
    with one copy of the data instead of three (header and data joined once)."""
    if not value.flags.c_contiguous:
        value = value.copy(order="C")
    if value.dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    header = f"{{'descr': {value.dtype.str!r}, 'fortran_order': False, 'shape': {value.shape!r}, }}"
    # numpy pads so that the data starts on a 64-byte boundary, ending with a newline
    padding = -(10 + len(header) + 1) % 64
    header_bytes = (header + " " * padding + "\n").encode("latin1")
    prefix = b"\x93NUMPY\x01\x00" + len(header_bytes).to_bytes(2, "little") + header_bytes
    data = b"".join([prefix, memoryview(value.reshape(-1).view(np.uint8))])
    return Array(dtype=str(value.dtype), shape=tuple(int(d) for d in value.shape),
                 stype="numpy.ndarray", data=data)
