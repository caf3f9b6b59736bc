"""Failpoints: named places where a test can make the process die, to prove crash safety.

Set ``IBSTREAM_FAILPOINT=<name>`` in a child process's environment and the process exits at
once (``os._exit``, like SIGKILL: no flush, no cleanup) when it reaches that point. Unset, a
failpoint costs one dict lookup.
"""

from __future__ import annotations

import os

ENV = "IBSTREAM_FAILPOINT"
EXIT_CODE = 77


def failpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(EXIT_CODE)
