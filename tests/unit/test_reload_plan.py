"""The reload plan: which sources start, stop or restart; which sections need a restart."""

from __future__ import annotations

from billingd.daemon.reload import plan_reload
from tests.support import amqp_source, make_settings


def test_plan_compares_sources_by_name():
    a, b, c = amqp_source("sms_dlr"), amqp_source("sms_dlr"), amqp_source("sms_billing")
    running = make_settings([a, b])
    new = make_settings([{**a, "prefetch": 50}, c], redis={"timeout": "5s"})
    plan = plan_reload(running, new)
    assert [s.name for s in plan.changed] == [a["name"]]
    assert plan.removed == [b["name"]]
    assert [s.name for s in plan.added] == [c["name"]]
    assert plan.unchanged == []
    assert "redis" in plan.needs_restart and "http" in plan.needs_restart  # make_settings picks a new port


def test_identical_settings_change_nothing():
    a = amqp_source("sms_dlr")
    settings = make_settings([a])
    plan = plan_reload(settings, settings)
    assert (plan.added, plan.removed, plan.changed, plan.needs_restart) == ([], [], [], [])
    assert plan.unchanged == [a["name"]]
