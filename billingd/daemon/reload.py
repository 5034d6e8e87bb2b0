"""What a config reload (SIGHUP) changes: a pure comparison of the running and the new settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from billingd.config.model import AnySource, Settings

#: Sections read once at start: a change to them needs a restart to take effect.
RESTART_SECTIONS = ("daemon", "http", "supervisor", "redis", "stripe", "razorpay", "breakers", "reconcile")


@dataclass(frozen=True)
class ReloadPlan:
    """Sources to start, stop, and restart (drain, then start with the new settings)."""

    added: list[AnySource] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[AnySource] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    """Sections that differ but only take effect after a restart of the process."""


def plan_reload(running: Settings, new: Settings) -> ReloadPlan:
    """Compare source by source (by `name`); a source is changed when any of its keys differ."""
    old = {s.name: s for s in running.sources}
    plan = ReloadPlan()
    for source in new.sources:
        if source.name not in old:
            plan.added.append(source)
        elif source != old[source.name]:
            plan.changed.append(source)
        else:
            plan.unchanged.append(source.name)
    names = {s.name for s in new.sources}
    plan.removed.extend(name for name in old if name not in names)
    plan.needs_restart.extend(s for s in RESTART_SECTIONS if getattr(running, s) != getattr(new, s))
    return plan
