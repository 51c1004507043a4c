"""A model travels as one Array: fewer objects for Flower's transport to move.

Flower 1.42 moves a message as one object per Array (plus 5 MB chunks), each its own
authenticated request from ServerApp to SuperLink to SuperNode to ClientApp and back,
at most two at a time on a 2-core host. EfficientNet-Lite0-SA has 300 tensors and
Res2Net50-SA about 1,000: on the loopback deployment moving the 300 took 13-20 s each
way, on a quiet machine. Packed, a model is one Array of three 5 MB chunks.

:func:`pack_record` joins an ArrayRecord's Arrays, each with its own ``.npy`` bytes,
into one Array under :data:`PACKED_KEY` (a JSON manifest, then the bytes);
:func:`unpack_record` gives back the same ArrayRecord. Both ends opt in:

- the ServerApp wraps its Grid in :class:`PackingGrid` (outgoing messages packed,
  replies unpacked before the strategy sees them);
- the ClientApp adds the mod :func:`packed_arrays_mod` (incoming messages unpacked,
  replies packed only when the message came packed, so it also answers a server that
  does not pack).

The strategies never see a packed record. numpy-free: Flower's record types only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

#: The one key of a packed ArrayRecord.
PACKED_KEY = "fedlsc.packed"
#: ``Array.stype`` of a packed record, with its format version.
PACKED_STYPE = "fedlsc.packed-arrays.v1"
_MAGIC = b"FLSCPK1\x00"
_LENGTH_BYTES = 8


class PackingError(ValueError):
    """A packed ArrayRecord that cannot be read back (says what is wrong)."""


def is_packed(record: ArrayRecord) -> bool:
    """Is ``record`` one packed Array (as :func:`pack_record` makes it)?"""
    return len(record) == 1 and PACKED_KEY in record \
        and record[PACKED_KEY].stype == PACKED_STYPE


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array; a record of fewer than two Arrays is returned as it is."""
    if len(record) < 2 or is_packed(record):
        return record
    manifest = [[key, array.dtype, list(array.shape), array.stype, len(array.data)]
                for key, array in record.items()]
    header = json.dumps(manifest, separators=(",", ":")).encode()
    data = b"".join([_MAGIC, len(header).to_bytes(_LENGTH_BYTES, "little"), header,
                     *(array.data for array in record.values())])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),),
                                          stype=PACKED_STYPE, data=data)})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord :func:`pack_record` packed; any other record as it is."""
    if not is_packed(record):
        return record
    data = memoryview(record[PACKED_KEY].data)
    if bytes(data[:len(_MAGIC)]) != _MAGIC:
        raise PackingError(f"packed arrays do not start with {_MAGIC!r}")
    start = len(_MAGIC) + _LENGTH_BYTES
    length = int.from_bytes(data[len(_MAGIC):start], "little")
    try:
        manifest = json.loads(bytes(data[start:start + length]))
        entries = [(str(key), str(dtype), tuple(int(d) for d in shape), str(stype),
                    int(size)) for key, dtype, shape, stype, size in manifest]
    except (ValueError, TypeError) as err:
        raise PackingError(f"packed arrays have an unreadable manifest: {err}") from err
    offset = start + length
    if offset + sum(size for *_, size in entries) != len(data):
        raise PackingError(
            f"packed arrays hold {len(data) - offset} bytes after the manifest, "
            f"the manifest lists {sum(size for *_, size in entries)}")
    arrays: dict[str, Array] = {}
    for key, dtype, shape, stype, size in entries:
        if size < 0 or key in arrays:
            raise PackingError(f"packed arrays list '{key}' twice or with size {size}")
        arrays[key] = Array(dtype=dtype, shape=shape, stype=stype,
                            data=bytes(data[offset:offset + size]))
        offset += size
    return ArrayRecord(arrays)


def _map_array_records(content: RecordDict, convert: Any) -> RecordDict:
    """``content`` with ``convert`` applied to each ArrayRecord (same object if none
    changed)."""
    converted = {name: convert(record) for name, record in content.array_records.items()}
    if all(converted[name] is content[name] for name in converted):
        return content
    return RecordDict({name: converted.get(name, record) for name, record in content.items()})


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord packed."""
    return _map_array_records(content, pack_record)


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with every packed ArrayRecord unpacked."""
    return _map_array_records(content, unpack_record)


def carries_packed(message: Message) -> bool:
    return message.has_content() and any(
        is_packed(record) for record in message.content.array_records.values())


def packed_arrays_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """ClientApp mod: unpack an incoming packed message; pack the reply if it was."""
    packed = carries_packed(msg)
    if packed:
        msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


class PackingGrid:
    """A ServerApp Grid that packs the ArrayRecords of the messages it pushes and unpacks
    those of the replies it pulls; delegates everything else to ``grid``.

    A record sent to several sites (the same ArrayRecord object) is packed once, and
    Flower sends identical objects once."""

    def __init__(self, grid: Any, poll_interval: float = 0.2) -> None:
        self._grid = grid
        self.poll_interval = poll_interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        packed: dict[int, ArrayRecord] = {}

        def pack_once(record: ArrayRecord) -> ArrayRecord:
            if id(record) not in packed:
                packed[id(record)] = pack_record(record)
            return packed[id(record)]

        messages = list(messages)
        for message in messages:
            if message.has_content():
                message.content = _map_array_records(message.content, pack_once)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            if carries_packed(reply):
                reply.content = unpack_content(reply.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's ``Grid.send_and_receive`` through this Grid's push and pull."""
        return send_and_receive_by_polling(self, messages, timeout, self.poll_interval)


def send_and_receive_by_polling(grid: Any, messages: Iterable[Message],
                                timeout: float | None, poll_interval: float
                                ) -> list[Message]:
    """What Flower's ``Grid.send_and_receive`` does (push, then pull until every message
    is answered or ``timeout`` passes), pulling every ``poll_interval`` seconds: Flower
    1.42's deployment Grid waits a fixed 3 s between pulls."""
    waiting = set(grid.push_messages(list(messages)))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_interval)
    return replies
