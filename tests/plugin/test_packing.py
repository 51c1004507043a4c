"""A model travels as one Array: packing is lossless, few objects, and both ends agree."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlsc_flwr.packing import (
    PACKED_KEY,
    PackingError,
    PackingGrid,
    is_packed,
    pack_record,
    packed_arrays_mod,
    unpack_record,
)
from fedlsc_flwr.wire import array_from_numpy, array_view

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower


def _model_like(num_tensors: int = 300, seed: int = 0) -> ArrayRecord:
    """A record shaped like EfficientNet-Lite0-SA's: many tensors, some integer, one
    scalar, one large enough to be chunked."""
    rng = np.random.default_rng(seed)
    arrays = {f"block.{i}.weight": array_from_numpy(
        rng.normal(size=(i % 7 + 1, 3)).astype(np.float32)) for i in range(num_tensors - 3)}
    arrays["bn.num_batches_tracked"] = array_from_numpy(np.array(12, dtype=np.int64))
    arrays["head.weight"] = array_from_numpy(rng.normal(size=(7, 1280)).astype(np.float16))
    arrays["big.weight"] = array_from_numpy(rng.normal(size=(2_000_000,)).astype(np.float32))
    return ArrayRecord(arrays)


def test_unpack_gives_back_every_array_byte_for_byte_in_order():
    record = _model_like()
    packed = pack_record(record)
    assert is_packed(packed) and list(packed) == [PACKED_KEY]
    back = unpack_record(packed)
    assert list(back) == list(record)
    for key in record:
        a, b = record[key], back[key]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == \
            (b.dtype, tuple(b.shape), b.stype, b.data)
        np.testing.assert_array_equal(array_view(b), array_view(a))


def test_a_packed_model_is_a_handful_of_objects_instead_of_one_per_tensor():
    record = _model_like()
    message = Message(RecordDict({"arrays": record}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
    unpacked_objects = len(get_all_nested_objects(message))
    message.content = RecordDict({"arrays": pack_record(record)})
    packed_objects = len(get_all_nested_objects(message))
    assert unpacked_objects > 300  # one per tensor, plus the big one's chunks
    # message, RecordDict, ArrayRecord, one Array and its 5 MB chunks (8 MB: 2 chunks)
    assert packed_objects <= 6, packed_objects


def test_records_with_fewer_than_two_arrays_and_unpacked_records_pass_through():
    one = ArrayRecord({"w": array_from_numpy(np.ones(3, np.float32))})
    assert pack_record(one) is one and unpack_record(one) is one
    assert pack_record(ArrayRecord()).count_bytes() == 0
    packed = pack_record(_model_like(5))
    assert pack_record(packed) is packed  # not packed twice


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"XXXXXXXX" + d[8:], "do not start with"),
    (lambda d: d[:-1], "bytes after the manifest"),
    (lambda d: d + b"\0", "bytes after the manifest"),
    (lambda d: d[:16] + b"{" + d[17:], "unreadable manifest"),
])
def test_damaged_packed_arrays_are_refused_with_the_reason(damage, message):
    packed = pack_record(_model_like(5))[PACKED_KEY]
    data = damage(packed.data)
    bad = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),),
                                         stype=packed.stype, data=data)})
    with pytest.raises(PackingError, match=message):
        unpack_record(bad)


def _train_message(record: ArrayRecord) -> Message:
    return Message(RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _echo_handler(seen: list[Message]):
    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg)
        arrays = msg.content["arrays"]
        return Message(RecordDict({"arrays": ArrayRecord(dict(arrays.items())),
                                   "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)
    return handler


def test_the_client_mod_unpacks_for_the_handler_and_packs_its_reply():
    record = _model_like(20)
    seen: list[Message] = []
    reply = packed_arrays_mod(_train_message(pack_record(record)), _context(),
                              _echo_handler(seen))
    assert list(seen[0].content["arrays"]) == list(record)  # the handler saw tensors
    assert is_packed(reply.content["arrays"])
    assert list(unpack_record(reply.content["arrays"])) == list(record)
    assert reply.content["metrics"]["num-examples"] == 1


def test_the_client_mod_answers_an_unpacked_message_unpacked():
    record = _model_like(20)
    reply = packed_arrays_mod(_train_message(record), _context(), _echo_handler([]))
    assert not is_packed(reply.content["arrays"])
    assert list(reply.content["arrays"]) == list(record)


class _LoopbackGrid:
    """Pushes through the client mod at once; records what went on the wire."""

    def __init__(self) -> None:
        self.sent: list[ArrayRecord] = []  # what went on the wire
        self.replies: dict[str, Message] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for i, message in enumerate(messages):
            self.sent.append(message.content["arrays"])
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            reply = packed_arrays_mod(message, _context(), _echo_handler([]))
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def get_node_ids(self):
        return [1, 2]


def test_the_grid_packs_what_it_sends_once_and_unpacks_the_replies():
    record = _model_like(20)
    inner = _LoopbackGrid()
    grid = PackingGrid(inner, poll_interval=0.0)
    replies = grid.send_and_receive([_train_message(record), _train_message(record)])
    assert len(replies) == 2
    sent = inner.sent
    assert all(is_packed(r) for r in sent) and sent[0] is sent[1]  # packed once
    for reply in replies:  # the strategy sees tensors
        assert list(reply.content["arrays"]) == list(record)
        assert reply.content["arrays"]["big.weight"].data == record["big.weight"].data
    assert grid.get_node_ids() == [1, 2]  # everything else is the wrapped Grid's
