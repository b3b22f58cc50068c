"""The home folder: everything a run writes lives under one directory (docs/design.md#data-contracts)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "harvest-data"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: "str | os.PathLike | Home | None" = None) -> "Home":
        """`--home` wins, then `$HARVEST_HOME`, then `./harvest-data`. A Home passes through."""
        if isinstance(home, Home):
            return home
        path = home or os.environ.get("HARVEST_HOME") or DEFAULT_HOME
        return cls(Path(path).expanduser().resolve())

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def make(self) -> "Home":
        for p in (self.root, self.data, self.cache, self.checkpoints, self.exports, self.reports):
            p.mkdir(parents=True, exist_ok=True)
        return self
