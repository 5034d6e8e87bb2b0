"""`AckPlan` against a model of RabbitMQ's acknowledgement rules (hypothesis)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from billingd.sources.acks import AckPlan


class BrokerChannel:
    """RabbitMQ's rules for one channel: tags 1..n outstanding; acking or nacking a tag that is
    not outstanding is PRECONDITION_FAILED (the channel closes)."""

    def __init__(self, n: int) -> None:
        self.outstanding = set(range(1, n + 1))
        self.acked: set[int] = set()
        self.nacked: set[int] = set()

    def ack(self, tag: int, multiple: bool = False) -> None:
        assert tag in self.outstanding, f"unknown delivery tag {tag}"
        covered = {t for t in self.outstanding if t <= tag} if multiple else {tag}
        self.outstanding -= covered
        self.acked |= covered

    def nack(self, tag: int) -> None:
        assert tag in self.outstanding, f"unknown delivery tag {tag}"
        self.outstanding.remove(tag)
        self.nacked.add(tag)


@st.composite
def settlements(draw):
    """Tags 1..n, each acked or nacked, settled in a random order and random batch sizes."""
    n = draw(st.integers(1, 40))
    order = draw(st.permutations(range(1, n + 1)))
    kinds = {tag: draw(st.sampled_from(["ack", "ack", "ack", "nack"])) for tag in order}
    cuts = sorted(draw(st.sets(st.integers(1, n), max_size=n)))
    batches, start = [], 0
    for cut in [*cuts, n]:
        if cut > start:
            batches.append(order[start:cut])
            start = cut
    return n, kinds, batches


@given(settlements())
def test_plans_never_ack_unsettled_or_unknown_tags_and_settle_everything(case):
    n, kinds, batches = case
    broker, plan = BrokerChannel(n), AckPlan()
    frames = 0
    for batch in batches:
        # a multiple-ack may only cover tags that are settled by the time it is sent
        settled_now = {t for b in batches[: batches.index(batch) + 1] for t in b}
        acks = [t for t in batch if kinds[t] == "ack"]
        nacks = [t for t in batch if kinds[t] == "nack"]
        upto, singles = plan.plan(acks, nacks)
        for tag in nacks:
            broker.nack(tag)
        if upto is not None:
            assert all(t in settled_now for t in range(1, upto + 1))
            broker.ack(upto, multiple=True)
            frames += 1
        for tag in singles:
            broker.ack(tag)
            frames += 1
    assert not broker.outstanding
    assert broker.acked == {t for t, k in kinds.items() if k == "ack"}
    assert broker.nacked == {t for t, k in kinds.items() if k == "nack"}
    assert frames <= sum(k == "ack" for k in kinds.values())


def test_in_order_acks_take_one_frame_per_flush():
    plan = AckPlan()
    assert plan.plan(range(1, 21)) == (20, [])
    assert plan.plan([22, 23]) == (None, [22, 23])
    assert plan.plan([21]) == (21, [])
    assert plan.pending == 0
