"""SQS message attributes of every DataType, read without raising."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from billingd.sources.letters import sqs_text as _text
from billingd.sources.sqs_wire import chunks as _chunks
from billingd.sources.sqs_wire import entry_size as _size
from billingd.sources.sqs_wire import read_attributes, settleable
from billingd.sources.sqs_wire import receive_count as _count

DATA_TYPES = st.sampled_from(["String", "Number", "Binary", "String.x", "Number.int", "Binary.png", "", "Nonsense"])
VALUE = st.fixed_dictionaries(
    {"DataType": DATA_TYPES},
    optional={
        "StringValue": st.one_of(st.text(), st.integers(), st.none()),
        "BinaryValue": st.one_of(st.binary(), st.text()),
    },
)


@given(
    st.one_of(st.none(), st.text(), st.dictionaries(st.text(max_size=5), st.one_of(VALUE, st.integers(), st.text())))
)
def test_any_attribute_map_reads_as_names_to_text_or_bytes(raw):
    attributes = read_attributes(raw)
    assert all(isinstance(v, str | bytes) for v in attributes.values())


def test_binary_attributes_stay_bytes_and_strings_stay_text():
    raw = {
        "content_encoding": {"DataType": "Binary", "BinaryValue": b"gzip"},
        "n": {"DataType": "Number.custom", "StringValue": "12"},
        "s": {"DataType": "String.x", "StringValue": "t"},
    }
    assert read_attributes(raw) == {"content_encoding": b"gzip", "n": "12", "s": "t"}


@given(st.one_of(st.none(), st.text(), st.integers()))
def test_any_receive_count_is_a_count(value):
    assert 1 <= _count(value) <= 1_000_000


def test_characters_sqs_refuses_are_replaced():
    assert _text("a\x00b\ud800c\x1fd\te") == "a\ufffdb\ufffdc\ufffdd\te"


def test_batches_stay_under_the_size_limit():
    entries = [{"Id": str(i), "MessageBody": "x" * 100_000, "MessageAttributes": {}} for i in range(7)]
    chunks = _chunks(entries)
    assert [len(c) for c in chunks] == [2, 2, 2, 1]
    assert all(sum(_size(e) for e in c) <= 256 * 1024 for c in chunks)


def test_answer_entries_without_a_receipt_handle_are_skipped_and_the_rest_kept() -> None:
    good = {"MessageId": "m-1", "ReceiptHandle": "rh-1", "Body": "{}"}
    junk = ["text", 7, None, {"MessageId": "m-2"}, {"ReceiptHandle": 12345}, {"ReceiptHandle": ["a"]}]
    assert settleable([junk[0], good, *junk[1:]]) == ([good], len(junk))
    assert settleable({"ReceiptHandle": "rh"}) == ([], 1)  # not a list at all
    assert settleable(None) == ([], 0)  # an empty receive


def test_a_fifo_dead_letter_is_deduplicated_per_receive_not_per_message():
    """Issue 24, item 13: with the message id as `MessageDeduplicationId`, a replayed letter that
    failed again within SQS's 5-minute window was accepted by SQS and silently dropped."""
    from billingd.config import convert
    from billingd.config.model import Settings
    from billingd.sources.base import Delivery, Disposition, Settlement
    from billingd.sources.sqs_wire import dead_letter_entry

    entry = {"name": "fifo", "type": "sqs", "handler": "usage", "queue_url": "http://q/x.fifo",
             "dead_letter_queue_url": "http://q/x-dlq.fifo"}  # fmt: skip
    settings = convert({"sources": [entry]}, Settings).sources[0]

    def letter(receipt: str) -> dict:
        message = {"Body": "{}", "ReceiptHandle": receipt, "MessageId": "m-1"}
        delivery = Delivery(b"{}", "m-1", 1, {}, message, "g-1")
        return dead_letter_entry("0", Settlement(delivery, Disposition.DEAD_LETTER, "bad"), settings, keep_theirs=True)

    first, again, replayed = letter("receipt-1"), letter("receipt-1"), letter("receipt-2")
    assert first["MessageDeduplicationId"] == again["MessageDeduplicationId"]  # one receive: one letter
    assert first["MessageDeduplicationId"] != replayed["MessageDeduplicationId"]
    assert first["MessageDeduplicationId"] != "m-1"
    assert len(first["MessageDeduplicationId"]) <= 128 and first["MessageGroupId"] == "g-1"
