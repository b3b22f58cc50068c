"""Bad input is a `rejects` row naming the cause, never a crash of the batch (DESIGN.md section 8)."""
from __future__ import annotations


class Reject(Exception):
    """One input item cannot be used. `reason` is short and groupable; `detail` names the cause and the fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
