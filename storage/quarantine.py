"""Quarantine: damaged files are moved aside, never deleted, with a note that says what failed.

Layout: ``{data_root}/quarantine/{UTC stamp}/{path relative to data_root}`` plus
``{that path}.note.json`` (what was wrong, which byte ranges and tick times it spans, what was
kept in service). An operator can inspect, restore or delete them; nothing in ibstream reads
them again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ibstream.core.times import iso, now_us
from ibstream.storage.failpoints import failpoint

log = logging.getLogger(__name__)

FOLDER = "quarantine"


@dataclass(frozen=True)
class Damage:
    """A span of a stream that damage destroyed (or may have): reported in coverage as ``damaged``.

    ``start_us``/``end_us`` bound the lost ticks (microseconds UTC, inclusive): the last
    readable tick before the damage and the first after it, or the file's bucket or hour edge.
    """

    contract_id: int
    tick_type: str
    start_us: int
    end_us: int
    file: str  # relative to the data root
    quarantined: str  # relative to the data root ('' when nothing was moved)
    reason: str
    detected_at_us: int
    damaged_bytes: int = 0


def quarantine_root(data_root: Path) -> Path:
    return data_root / FOLDER


def quarantine_file(data_root: Path, path: Path, note: dict, *, keep: bool = False, level: int = logging.ERROR) -> Path:
    """Move ``path`` (or, with ``keep``, hard-link or copy it) into the quarantine, with a note.

    Returns the quarantined path. The note is written first, so a crash never leaves an
    unexplained file; a crash before the move leaves the file where it was (found again later).
    """
    stamp = iso(now_us()).replace(":", "").replace("-", "")
    relative = path.resolve().relative_to(data_root.resolve())
    target = quarantine_root(data_root) / stamp / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    note = {"file": relative.as_posix(), "quarantined_at": iso(now_us()), **note}
    note_path = target.with_name(target.name + ".note.json")
    note_path.write_text(json.dumps(note, indent=2, default=str) + "\n")
    failpoint("quarantine.before_move")
    if keep:
        try:
            os.link(path, target)
        except OSError:
            target.write_bytes(path.read_bytes())
    else:
        os.replace(path, target)
    log.log(level, "quarantined %s -> %s: %s", relative, target.relative_to(data_root), note.get("reason", ""))
    return target


def damage_note(damage: Damage) -> dict:
    note = asdict(damage)
    note["start"] = iso(damage.start_us)
    note["end"] = iso(damage.end_us)
    return note
