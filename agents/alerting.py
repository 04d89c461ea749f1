"""Stage 4 of the worker: findings and fleet KPI windows -> alert rules -> chat webhooks.

The rules engine and receivers are in rules/; this module keeps the firing findings, drives the
engine on a clock, dispatches notifications and checkpoints the alert state in a Faust table.
`add_alerting` registers it on a worker (agents/worker.py builds one).

Silences come from their compacted topic, read on at every tick (one added anywhere holds at the
next); notifications wait until the topic has been read to where it was at startup, so a restart
never notifies what a silence mutes. The live alerts go to their topic for `laggard alerts list`
(rules/shared_state.py).

Nothing here stops alerting for good: a rules file that is bad at startup (with no checkpointed
rules to fall back on) leaves an engine without rules that keeps every finding taken meanwhile
(firing and resolved, checkpointed), so they are all evaluated once the file is fixed; a bad
reload keeps the last good rules; a record on the silences topic that is not a silence is skipped
(logged, counted); a notification a webhook does not take is deferred and checkpointed
(rules/receivers/delivery.py); a tick that fails is logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from laggard.agents.core import Input, WorkerCore, log
from laggard.agents.metrics import Counters
from laggard.results import Finding
from laggard.rules.alert_lifecycle import AlertEngine
from laggard.rules.loader import DEFAULT_RULES, RulesFileInvalid, load_rules
from laggard.rules.model import RulesConfig
from laggard.rules.receivers.delivery import DeadLetter, DeliveryOutcome, Dispatcher, SentLog
from laggard.rules.shared_state import ALERTS_KEY, HEARTBEAT_S, SilenceBook, SilenceFeed, board_record, this_writer
from laggard.topics import alert_ticks_name, worker_tables

# Findings are re-delivered after a restart (at-least-once). A transition no newer than the last one
# taken for its fingerprint is such a repeat; ended ones are remembered this long (event time).
TRANSITION_MEMORY_S = 3600.0
# The timer's message on the alert channel (beside the clusters' fleet KPI windows).
TICK = b"tick"
# Findings kept while no rules are in force (bad rules file at startup), newest kept past this.
MAX_UNEVALUATED = 10_000
# How long one tick waits for the silences topic while it has not been read to its end yet.
SILENCES_CATCH_UP_S = 5.0


@dataclass
class Alerting:
    """The rules engine (rules/) fed with the findings that are firing now. Detectors emit state
    changes only, so the firing set is kept here and shown to the engine on every tick."""

    engine: AlertEngine
    dispatcher: Dispatcher
    rules_mtime: float
    counters: Counters
    firing: dict[str, Finding] = field(default_factory=dict)
    latest: dict[str, float] = field(default_factory=dict)  # finding fingerprint -> window_start taken
    # Findings taken while there are no rules (a bad rules file at startup), in order, for the
    # rules that replace it; None while rules are in force.
    unevaluated: list[Finding] | None = None

    def take(self, finding: Finding, now: float) -> None:
        """Show a transition to the engine at once: a resolved one ends its alert (the firing set
        alone would only let it go stale)."""
        key = finding.fingerprint
        if finding.window_start <= self.latest.get(key, float("-inf")):
            return
        self.latest[key] = finding.window_start
        self.engine.observe_finding(finding, now)
        if self.unevaluated is not None:
            self.unevaluated = [*self.unevaluated[-(MAX_UNEVALUATED - 1):], finding]
        if finding.state == "firing":
            self.firing[key] = finding
            return
        self.firing.pop(key, None)
        forget_before = finding.window_start - TRANSITION_MEMORY_S
        self.latest = {k: t for k, t in self.latest.items() if k in self.firing or t >= forget_before}

    def state(self) -> dict[str, Any]:
        return {"engine": self.engine.snapshot(), "sent": self.dispatcher.sent_log.to_dict(),
                "deferred": self.dispatcher.deferred_state(),
                "firing": [f.model_dump(mode="json") for f in self.firing.values()], "latest": self.latest,
                "unevaluated": [f.model_dump(mode="json") for f in self.unevaluated or ()],
                # Stand-in rules (none, while the file is bad) are not rules a restart may fall back on.
                "rules": self.engine.config.model_dump(mode="json", by_alias=True) if self.unevaluated is None else None}

def rules_mtime(path: Path) -> float:
    """The file's mtime; -1 while it is missing (a change like any other, reported once)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


class AlertingStage:
    """Findings, the timer's ticks and the fleet KPI windows share one agent (ticks and windows on
    one single-partition channel), so every alert decision, notification and state checkpoint
    happens inside stream iteration (Faust tables accept writes only there): a restarted worker
    resumes with the sent log and sends nothing twice."""

    def __init__(self, core: WorkerCore) -> None:
        self.core, self.settings, self.counters = core, core.settings, core.counters
        self.input = core.topic(self.settings.topic_findings, alert_ticks_name(self.settings))
        self.state_table = core.app.Table("alert-state", default=dict,
                                          partitions=worker_tables(self.settings)["alert-state"])
        self.alerting: Alerting | None = None
        self.silences = SilenceBook()  # filled by `feed`, or by hand where there is no broker (tests)
        self.feed: SilenceFeed | None = None
        self.board_topic = core.topic(self.settings.topic_alerts)
        self.board_shown: tuple[float, list[Any]] = (float("-inf"), [])  # when published, and what
        # Per input topic (one partition each): the next offset not taken; after a start or takeover,
        # the checkpoint's until `catch_up` has re-read what lies between it and Faust's first message.
        self.resume: dict[str, int] = {}

    def rules_path(self) -> Path:
        return self.settings.rules_file or DEFAULT_RULES

    def startup_rules(self, saved: dict[str, Any]) -> tuple[RulesConfig, bool]:
        """(rules, whether they are real): the rules file; if it is bad, the last good rules from the
        checkpoint (a restart must not stop alerting), or, when there are none, the default receivers
        and routes with no rules: the findings are kept and evaluated once the file is fixed."""
        path = self.rules_path()
        try:
            return load_rules(path), True
        except RulesFileInvalid as err:
            self.counters.rules_reload_failures += 1
            if saved.get("rules"):
                log.error("rules file %s is invalid, keeping the last good rules (from the checkpoint): %s", path, err)
                return RulesConfig.model_validate(saved["rules"]), True
            log.error("rules file %s is invalid and no earlier rules are checkpointed: no alerts until it is fixed "
                      "(the findings taken meanwhile are kept for it): %s", path, err)
            return load_rules(DEFAULT_RULES).model_copy(update={"rules": []}), False

    def make_alerting(self, saved: dict[str, Any], config: RulesConfig | None = None) -> Alerting:
        """The stage's state from a checkpoint, with `config` (else the rules file's): findings taken
        while there were no rules are evaluated by the rules that replace them now."""
        path = self.rules_path()
        config, real = (config, True) if config is not None else self.startup_rules(saved)
        dispatcher = Dispatcher(config.receivers, dead_letter=self.notification_dead_letter,
                                sent_log=SentLog(saved.get("sent")), deferred=saved.get("deferred", ()))
        for name, why in dispatcher.problems.items():
            log.warning("receiver %s cannot send: %s", name, why)
        firing = (Finding.model_validate(data) for data in saved.get("firing", []))
        engine = AlertEngine(config, saved.get("engine"), render_failures=self.counters.template_render_failures)
        unevaluated = [Finding.model_validate(data) for data in saved.get("unevaluated", [])]
        if real:
            now = time.time()
            for finding in unevaluated:  # in order: one that fired and resolved meanwhile is announced
                engine.observe_finding(finding, now)
        return Alerting(engine, dispatcher, rules_mtime(path), self.counters,
                        firing={f.fingerprint: f for f in firing}, latest=saved.get("latest", {}),
                        unevaluated=None if real else unevaluated)

    async def notification_dead_letter(self, letter: DeadLetter) -> None:
        await self.core.deadletter_topic.send(key=b"notification", value=letter.model_dump_json().encode())

    async def reload_rules(self, current: Alerting) -> Alerting:
        """A changed rules file is loaded; a bad (or vanished) one is refused with its errors and the
        last good rules stay in force."""
        path = self.rules_path()
        mtime = rules_mtime(path)
        if mtime == current.rules_mtime:
            return current
        current.rules_mtime = mtime
        try:
            config = load_rules(path)
        except RulesFileInvalid as err:
            self.counters.rules_reload_failures += 1
            log.error("rules file %s not reloaded, keeping the last good rules: %s", path, err)
            return current
        try:
            reloaded = self.make_alerting(current.state(), config)
        except Exception as err:  # the new receivers cannot be set up: the current ones keep sending
            self.counters.rules_reload_failures += 1
            log.error("rules file %s not reloaded, keeping the last good rules: %s: %s", path, type(err).__name__, err)
            return current
        log.warning("rules file %s reloaded", path)
        await current.dispatcher.aclose()
        return reloaded

    def count(self, outcomes: list[DeliveryOutcome]) -> None:
        for outcome in outcomes:
            self.counters.notifications += outcome.status == "sent"
            self.counters.notifications_deferred += outcome.status == "deferred"
            self.counters.notifications_failed += outcome.status == "dead_lettered"

    async def send_due_notifications(self, current: Alerting, now: float) -> None:
        for finding in current.firing.values():
            current.engine.observe_finding(finding, now)
        silences = list(self.silences.silences.values())
        self.count(await current.dispatcher.retry_deferred())
        self.count([await current.dispatcher.dispatch(n) for n in current.engine.advance(now, silences)])

    async def read_silences(self) -> bool:
        """Read on in the silences topic; True once it has been read to where it was at startup."""
        if self.feed is None:
            self.feed = await asyncio.to_thread(SilenceFeed, self.settings, self.silences)
        was_caught_up = self.feed.caught_up
        for problem in await asyncio.to_thread(self.feed.read, 0.0 if was_caught_up else SILENCES_CATCH_UP_S):
            self.counters.silence_records_skipped += 1
            log.error("%s", problem)
        if not self.feed.caught_up:
            log.warning("silences topic %s not read to its end yet: notifications wait", self.settings.topic_silences)
        return self.feed.caught_up

    async def publish_board(self, current: Alerting, now: float) -> None:
        """The live alerts on their topic when they change, and every HEARTBEAT_S (it says this worker alerts)."""
        alerts = current.engine.active_alerts()
        shown = [(a.fingerprint, a.status, a.silenced_by, a.inhibited, a.annotations) for a in alerts]
        if shown == self.board_shown[1] and now - self.board_shown[0] < HEARTBEAT_S:
            return
        await self.board_topic.send(key=ALERTS_KEY, value=board_record(alerts, now, this_writer()))
        self.board_shown = (now, shown)

    async def tick(self, current: Alerting, now: float) -> Alerting:
        """The rules file reloaded if changed, due notifications sent and the live alerts published."""
        current = await self.reload_rules(current)
        if await self.read_silences():
            await self.send_due_notifications(current, now)
            await self.publish_board(current, now)
        return current

    def take(self, current: Alerting, message: Input) -> None:
        """A finding, or a cluster's fleet KPI window from the alert channel; ValueError if neither."""
        if message.topic == self.settings.topic_findings:
            current.take(Finding.model_validate_json(message.value or b""), time.time())
        else:
            current.engine.observe_window(json.loads(message.value or b""), time.time())

    def is_tick(self, message: Input) -> bool:
        return message.topic != self.settings.topic_findings and message.value == TICK

    async def take_input(self, current: Alerting, message: Input) -> None:
        """A finding or a fleet KPI window, taken; one the stage cannot read is dead-lettered. Ticks
        re-read from Kafka are past: skipped."""
        if self.is_tick(message):
            return
        try:
            self.take(current, message)
        except ValueError as err:
            await self.core.reject_stage_message(message, err)

    def resume_from(self, saved: dict[str, Any]) -> dict[str, int]:
        """Where the checkpoint leaves each input: an input it took nothing from, at its start."""
        if "resume" not in saved:  # no checkpoint: Faust starts at the earliest message itself
            return {}
        return {topic: saved["resume"].get(topic, 0) for topic in (self.settings.topic_findings,
                                                                   alert_ticks_name(self.settings))}

    async def catch_up(self, current: Alerting) -> None:
        """After a start or takeover: what lies between the checkpoint and the group's commit, where
        Faust resumes (a crash between the two), re-read now, not when the input's next message comes."""
        for topic, start in self.resume.items():
            try:
                end = (await self.core.group_resume_offsets(topic)).get(0, start)
            except Exception as err:  # then the gap is read again before the input's next message
                log.warning("cannot read the group's offsets of %s now (%s: %s)", topic, type(err).__name__, err)
                continue
            for offset, value in await self.core.replay(topic, 0, start, end):
                await self.take_input(current, Input(topic, 0, offset, value))
            self.resume[topic] = max(start, end)

    async def alert_on_findings(self, stream: faust.StreamT) -> None:
        """The state is checkpointed once per tick (a finding may come every few milliseconds, and
        the whole state is hundreds of KB) with the offsets it holds; what came after the last
        checkpoint is re-read after a crash (`catch_up`), so nothing taken is lost."""
        async for event in stream.events():
            message = Input.of(event)
            if self.alerting is None:
                saved = self.state_table.get("state") or {}
                self.alerting, self.resume = self.make_alerting(saved), self.resume_from(saved)
                await self.catch_up(self.alerting)
            current = self.alerting
            expected = self.resume.get(message.topic, message.offset)
            if message.offset < expected:
                continue  # in the checkpoint already: Faust delivers it again after a restart
            await self.core.take_skipped(message, expected, lambda skipped: self.take_input(current, skipped))
            self.resume[message.topic] = message.offset + 1
            if not self.is_tick(message):
                await self.take_input(current, message)
                continue
            try:
                self.alerting = await self.tick(current, time.time())
            except Exception:  # the agent must outlive it: the findings are kept, the next tick tries again
                self.counters.alert_tick_failures += 1
                log.exception("alert tick failed; trying again on the next one")
            self.state_table["state"] = {**self.alerting.state(), "resume": self.resume}

    async def forget_alerting(self, app: faust.App, revoked: set, **kwargs: Any) -> None:
        """Whoever gets the alert channel next starts from the table, not from stale memory."""
        if self.alerting is not None and any(tp.topic == self.settings.topic_findings for tp in revoked):
            stale, self.alerting = self.alerting, None
            self.board_shown = (float("-inf"), [])
            # In the background: a notification being sent right now may finish first.
            asyncio.ensure_future(stale.dispatcher.aclose())

    async def alert_tick(self) -> None:
        await self.core.alert_channel.send(value=TICK, partition=0)


def add_alerting(core: WorkerCore) -> AlertingStage:
    """Stage 4's agent, revocation handler and clock, registered on the worker's app."""
    stage = AlertingStage(core)
    app = core.app
    app.agent(stage.input, name="alert_on_findings")(stage.alert_on_findings)
    app.on_partitions_revoked.connect(stage.forget_alerting)
    app.timer(interval=1.0, name="alert_tick")(stage.alert_tick)
    return stage
