"""How Prefect's log lines read on a `harvest` console (`flows/logging.yml`, which `flows/cli.py` names in
`PREFECT_LOGGING_SETTINGS_PATH` unless the user set their own):
- A record with an exception (a failed task or flow run, a crash, Ctrl-C) is one line: its message and the
  exception's type and first line. The full traceback still reaches the home's Prefect database (the API
  handler formats its own copy), where `harvest ui` shows it; `HARVEST_TRACEBACKS=1` prints it here as well.
- "View at http://127.0.0.1:<port>/..." names a loopback server that is gone when the command ends: it reads
  "see `harvest ui`" instead.
- The console handler writes to :data:`STDERR`, whatever `sys.stderr` is at the time of each line, not the one
  of the moment logging was set up (which, in a notebook or a test capturing output, may be closed since).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import sys

from prefect.logging.formatters import PrefectFormatter

class _CurrentStderr:
    """`sys.stderr` as it is now, looked up on every call."""

    def __getattr__(self, name: str):
        return getattr(sys.stderr, name)


STDERR = _CurrentStderr()
_LOOPBACK_LINK = re.compile(r"View at https?://127\.0\.0\.1:\d+/\S*")


class OneLineFormatter(PrefectFormatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        loud = os.environ.get("HARVEST_TRACEBACKS") not in (None, "", "0")
        if (loud or not record.exc_info) and not _LOOPBACK_LINK.search(message):
            return super().format(record)
        quiet = copy.copy(record)     # the other handlers (the API's) keep the record as it was
        message = _LOOPBACK_LINK.sub("see `harvest ui` for this run", message)
        if record.exc_info and not loud:
            exc = record.exc_info[1]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            message = f"{message} ({type(exc).__name__}{': ' + first if first else ''})"
            quiet.exc_info, quiet.exc_text, quiet.stack_info = None, None, None
        quiet.msg, quiet.args = message, None
        return super().format(quiet)
