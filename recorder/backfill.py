"""The backfill job: coverage gaps filled from IB's historical ticks, within a budget.

:class:`Backfiller` takes the gaps the store says are ready (:meth:`Store.backfill_candidates
<ibstream.storage.store.Store.backfill_candidates>`: closed, their hours archived), the most
recent first and, among those ending together, the shortest first; skips those that ended more
than ``backfill_max_age`` ago; fetches each one's ticks over a :class:`~recorder.history.HistorySession`
(its own IB connection, paced by IB's rules) and hands them to :meth:`Store.backfill
<ibstream.storage.store.Store.backfill>`, which drops the ticks the live edges already hold,
clamps ``ts`` into the gap and marks its coverage. ``proto_docs/backfill.md`` has the rules.

What becomes of a gap:

``backfilled``         IB answered every page.
``partly_backfilled``  IB refused a later page (its message is the note); the ticks before it are
                       stored, and the gap is tried again on later runs.
``unfillable``         IB refused the first page (no data, no permissions, no such contract): its
                       message is the note; never tried again.
left a gap             the connection went, a request went unanswered, the run was stopped or the
                       budget was spent: nothing of it is stored, the next run tries it again.

The budget: a run starts no new gap once it has sent ``backfill_max_requests`` requests (a gap
begun is finished, so a long one is never starved). The recording process runs it every
``backfill_interval`` (:meth:`Backfiller.start`); ``ibstream backfill`` runs it once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from ibstream.core.errors import IbstreamError, InvalidRequestError, ServerUnavailableError
from ibstream.core.times import US_PER_SECOND, duration_us, iso, now_us
from ibstream.recorder.history import HistoryRefused, HistorySession
from ibstream.settings import Settings
from ibstream.storage.index import CoverageInterval
from ibstream.storage.store import Store

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, int], Iterator]  # the CLI's progress bar: (items, description, total)


def _no_progress(items: Iterable, description: str, total: int) -> Iterator:
    yield from items


@dataclass(frozen=True)
class GapOutcome:
    """What one run did with one gap: its new ``status`` (``gap``: left as it was, for a later run), IB's
    ``note`` when it refused, ``fetched`` historical ticks, ``added`` to the store, ``duplicates``
    the live edges already held."""

    contract_id: int
    tick_type: str
    start_us: int
    end_us: int
    reason: str  # why it was a gap: disconnected, gateway_silent, ...
    status: str
    note: str = ""
    fetched: int = 0
    added: int = 0
    duplicates: int = 0
    requests: int = 0

    def describe(self) -> str:
        span = f"{iso(self.start_us)} .. {iso(self.end_us)} ({self.reason})"
        what = {"backfilled": f"{self.added:,} ticks added", "gap": "left for the next run",
                "partly_backfilled": f"{self.added:,} ticks added, then refused", "unfillable": "nothing from IB"}
        note = f": {self.note}" if self.note else ""
        return f"{self.contract_id}/{self.tick_type} {span}: {self.status}, {what.get(self.status, '')}, " \
               f"{self.requests} requests{note}"


@dataclass
class BackfillReport:
    """One run: an outcome per gap tried, how many waited (``left``: budget or an early end) or were
    too old, requests sent, pacing violations met and, if the run ended early, why (``stopped``)."""

    gaps: list[GapOutcome] = field(default_factory=list)
    left: int = 0
    too_old: int = 0
    requests: int = 0
    pacing_violations: int = 0
    stopped: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for gap in self.gaps if gap.status == status)

    @property
    def added(self) -> int:
        return sum(gap.added for gap in self.gaps)

    def summary(self) -> str:
        text = (f"{self.count('backfilled')} gaps backfilled, {self.count('partly_backfilled')} partly, "
                f"{self.count('unfillable')} unfillable; {self.added:,} ticks added "
                f"({sum(g.duplicates for g in self.gaps):,} already held at the edges); {self.requests} requests"
                f" ({self.pacing_violations} pacing violations)")
        left = self.left + self.count("gap")
        if left:
            text += f"; {left} gaps left for the next run"
        if self.too_old:
            text += f"; {self.too_old} older than IBSTREAM_BACKFILL_MAX_AGE skipped"
        return text + (f"; stopped early: {self.stopped}" if self.stopped else "")


class Backfiller:
    """Fills ``store``'s coverage gaps from IB (``settings``: ``ib_host``, ``ib_port``, ``backfill_*``)."""

    def __init__(self, store: Store, settings: Settings | None = None, *,
                 session: Callable[[], HistorySession] | None = None):
        """``session`` makes the IB session of a run (default: a :class:`HistorySession` over ``settings``)."""
        self.store = store
        self.settings = settings or Settings.of(store.settings)
        self.stop = threading.Event()  # set: a running fetch ends at once, the gap stays a gap
        self._session = session or (lambda: HistorySession(self.settings, stop=self.stop))
        self._failing: str | None = None
        self._scheduler = None

    # -- one run ---------------------------------------------------------------------------------

    def due(self, now: int | None = None) -> tuple[list[CoverageInterval], int]:
        """The gaps to try, in order, and how many ready ones are older than ``backfill_max_age``."""
        now = now_us() if now is None else now
        oldest = now - duration_us(self.settings.backfill_max_age)
        ready = [gap for gap in self.store.backfill_candidates(now) if gap.end_us is not None]
        due = [gap for gap in ready if gap.end_us is not None and gap.end_us >= oldest]
        due.sort(key=lambda gap: (-(gap.end_us or 0), (gap.end_us or 0) - gap.start_us))
        return due, len(ready) - len(due)

    def run(self, progress: Progress | None = None, now: int | None = None) -> BackfillReport:
        """Backfill what is due now, within the budget. Connects only when a gap is due; a gateway that
        cannot be reached raises :class:`~ibstream.core.errors.ServerUnavailableError`."""
        due, too_old = self.due(now)
        report = BackfillReport(too_old=too_old)
        if not due:
            return report
        with self._session() as session:
            for position, gap in enumerate((progress or _no_progress)(due, "backfill", len(due))):
                if session.requests >= self.settings.backfill_max_requests:
                    report.left = len(due) - position
                    break
                before = session.requests
                try:
                    outcome = self._fill(session, gap)
                except ServerUnavailableError as exc:  # the connection or the run ended: this gap and the rest wait
                    report.stopped = str(exc)
                    report.left = len(due) - position
                    break
                finally:
                    report.requests, report.pacing_violations = session.requests, session.pacing_violations
                outcome = replace(outcome, requests=session.requests - before)
                report.gaps.append(outcome)
                log.info("backfill %s", outcome.describe())
        return report

    def _fill(self, session: HistorySession, gap: CoverageInterval) -> GapOutcome:
        assert gap.end_us is not None
        base = GapOutcome(gap.contract_id, gap.tick_type, gap.start_us, gap.end_us, gap.reason, status="gap")
        details = self.store.index.contract(gap.contract_id)
        if details is None:  # no exchange to ask IB on: the recorder stores it once it resolves the contract
            return replace(base, note="no contract details stored (record it from IB first)")
        first, last = self.store.gap_seconds(gap.contract_id, gap.tick_type, gap.start_us, gap.end_us)
        try:
            ticks = session.fetch_ticks(details, gap.tick_type, first, last,
                                        closes=self._closes(gap.contract_id, first, last + US_PER_SECOND))
            status, note = "backfilled", ""
        except HistoryRefused as refused:
            ticks, note = refused.ticks, str(refused)
            status = "partly_backfilled" if ticks is not None and ticks.num_rows else "unfillable"
            if status == "unfillable" and gap.status != "gap":  # a partial one stays as it is: tried again later
                return replace(base, note=note)
        assert ticks is not None
        try:
            result = self.store.backfill(gap.contract_id, gap.tick_type, gap.start_us, gap.end_us, ticks,
                                         status=status, reason=note)
        except InvalidRequestError as exc:  # the gap or what follows it changed since it was fetched
            return replace(base, note=f"not stored, tried again next run: {exc}")
        return replace(base, status=status, note=note, fetched=ticks.num_rows, added=result.added,
                       duplicates=result.duplicates)

    def _closes(self, contract_id: int, start_us: int, end_us: int) -> list[int]:
        """The contract's session closes (trading hours) inside the gap: no request may cross one."""
        try:
            sessions = self.store.sessions(contract_id).sessions("extended", start_us, end_us)
        except (IbstreamError, ValueError) as exc:  # no hours stored, or none IB reported for these dates
            log.debug("no sessions for %d (%s): the gap is asked for in one piece", contract_id, exc)
            return []
        return [s.close_us for s in sessions if start_us < s.close_us < end_us]

    # -- on a schedule ---------------------------------------------------------------------------

    def run_scheduled(self) -> BackfillReport | None:
        """One scheduled run: a failure is one log line when it starts and one when it ends."""
        try:
            report = self.run()
        except (IbstreamError, OSError) as exc:
            if self._failing is None:
                log.error("backfill cannot run: %s; it tries again every %g min", exc,
                          self.settings.backfill_interval.total_seconds() / 60)
            self._failing = str(exc)
            return None
        if self._failing is not None:
            log.warning("backfill runs again (it had stopped: %s)", self._failing)
            self._failing = None
        if report.gaps or report.stopped:
            log.info("backfill run: %s", report.summary())
        return report

    def start(self) -> None:
        """Run every ``backfill_interval`` on a background thread (the first run one interval from now)."""
        from apscheduler.schedulers.background import BackgroundScheduler

        from ibstream.storage.store import niced

        every = self.settings.backfill_interval.total_seconds()
        self._scheduler = scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(niced(self.run_scheduled), "interval", seconds=every, id="backfill", max_instances=1,
                          coalesce=True, next_run_time=datetime.now(UTC) + timedelta(seconds=every))
        scheduler.start()

    def shutdown(self) -> None:
        """Stop the schedule; a run in progress ends at once (its gap stays a gap)."""
        self.stop.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def run_backfill(settings: Settings, store: Store | None = None, progress: Progress | None = None) -> BackfillReport:
    """One backfill run over ``store`` (default: the store at ``settings.data_root``, opened for writing:
    it raises :class:`~ibstream.core.errors.StorageError` while a recorder holds it)."""
    if store is not None:
        return Backfiller(store, settings).run(progress)
    from ibstream.storage.maintenance import require_store

    require_store(settings)
    with Store(settings) as opened:
        return Backfiller(opened, settings).run(progress)
