"""The channel between two threads: merging while busy, order, bounds, wake-ups."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from dataflare.batch.batcher import concat_batches, split_batch
from dataflare.batch.channel import Channel
from dataflare.streaming.messages import Barrier, Data, End, Message, Watermark


def ids(start: int, count: int) -> pa.RecordBatch:
    return pa.record_batch([pa.array(range(start, start + count))], names=["id"])


def data(channel: int, start: int, count: int, created_ns: int = 0) -> Data:
    return Data(channel, ids(start, count), created_ns)


def drain(channel: Channel) -> list[Message]:
    out = []
    while len(channel):
        message = channel.get()
        assert message is not None
        out.append(message)
    return out


def id_lists(messages: list[Message]) -> list[list[int] | str]:
    return [
        m.batch.column("id").to_pylist() if isinstance(m, Data) else type(m).__name__
        for m in messages
    ]


def test_waiting_data_is_merged_in_order() -> None:
    channel = Channel(capacity=4, max_rows=100)
    for start, created in ((0, 30), (3, 20), (5, 10)):
        assert channel.put(data(0, start, 3 if start == 0 else 2, created))

    [merged] = drain(channel)

    assert isinstance(merged, Data)
    assert merged.batch.column("id").to_pylist() == [0, 1, 2, 3, 4, 5, 6]
    assert merged.created_ns == 30  # the oldest rows' time
    assert merged.channel == 0


def test_control_messages_keep_their_place() -> None:
    channel = Channel(capacity=8, max_rows=100)
    channel.put(data(0, 0, 2))
    channel.put(data(0, 2, 2))
    channel.put(Watermark(0, 123, 0))
    channel.put(data(0, 4, 1))
    channel.put(Barrier(0, 7))
    channel.put(data(0, 5, 1))
    channel.put(End(0))

    messages = drain(channel)

    assert id_lists(messages) == [
        [0, 1, 2, 3],
        "Watermark",
        [4],
        "Barrier",
        [5],
        "End",
    ]


def test_channels_and_schemas_are_not_merged() -> None:
    channel = Channel(capacity=8, max_rows=100)
    channel.put(data(0, 0, 2))
    channel.put(data(1, 2, 2))  # another upstream channel
    other = pa.record_batch([pa.array(["a"])], names=["name"])
    channel.put(Data(1, other, 0))  # another schema

    messages = drain(channel)

    assert [m.channel for m in messages] == [0, 1, 1]
    assert id_lists(messages[:2]) == [[0, 1], [2, 3]]
    assert isinstance(messages[2], Data)
    assert messages[2].batch.column("name").to_pylist() == ["a"]


def test_merged_batches_stay_within_max_rows() -> None:
    channel = Channel(capacity=8, max_rows=25)
    for index in range(6):
        channel.put(data(0, index * 10, 10))

    messages = drain(channel)

    assert [len(ids) for ids in id_lists(messages)] == [20, 20, 20]
    merged = concat_batches([m.batch for m in messages if isinstance(m, Data)])
    assert merged.column("id").to_pylist() == list(range(60))


def test_full_channel_blocks_producer_until_get() -> None:
    channel = Channel(capacity=2, max_rows=1)  # max_rows 1: nothing merges
    channel.put(data(0, 0, 1))
    channel.put(data(0, 1, 1))
    done = threading.Event()

    def produce() -> None:
        channel.put(data(0, 2, 1))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not done.wait(0.2)  # blocked: the channel is full

    first = channel.get()
    producer.join(10)

    assert done.is_set()
    assert id_lists([first] if first else []) == [[0]]
    assert id_lists(drain(channel)) == [[1], [2]]


def test_full_channel_still_merges() -> None:
    channel = Channel(capacity=1, max_rows=100)
    channel.put(data(0, 0, 1))

    assert channel.put(data(0, 1, 1))  # returns at once: merged into the last

    assert id_lists(drain(channel)) == [[0, 1]]


def test_waiting_consumer_gets_message_at_once() -> None:
    channel = Channel(capacity=2, max_rows=100)
    received: list[Message | None] = []
    consumer = threading.Thread(target=lambda: received.append(channel.get()))
    consumer.start()

    channel.put(data(0, 0, 3))
    consumer.join(10)

    assert not consumer.is_alive()
    assert id_lists([m for m in received if m is not None]) == [[0, 1, 2]]


def test_wake_interrupts_get_once() -> None:
    channel = Channel(capacity=2, max_rows=100)
    received: list[Message | None] = []
    consumer = threading.Thread(target=lambda: received.append(channel.get()))
    consumer.start()

    channel.wake()
    consumer.join(10)

    assert received == [None]
    channel.put(End(0))
    assert isinstance(channel.get(), End)


def test_close_wakes_blocked_producer_and_consumer() -> None:
    full = Channel(capacity=1, max_rows=1)
    full.put(data(0, 0, 1))
    empty = Channel(capacity=1, max_rows=1)
    results: list[object] = []
    producer = threading.Thread(target=lambda: results.append(full.put(End(0))))
    consumer = threading.Thread(target=lambda: results.append(empty.get()))
    producer.start()
    consumer.start()

    full.close()
    empty.close()
    producer.join(10)
    consumer.join(10)

    assert not producer.is_alive()
    assert not consumer.is_alive()
    assert sorted(results, key=repr) == [False, None]
    assert full.put(End(0)) is False


@pytest.mark.parametrize(
    ("rows", "size", "parts"), [(10, 10, [10]), (25, 10, [10, 10, 5])]
)
def test_split_batch(rows: int, size: int, parts: list[int]) -> None:
    pieces = split_batch(ids(0, rows), size)

    assert [p.num_rows for p in pieces] == parts
    assert concat_batches(pieces).column("id").to_pylist() == list(range(rows))
