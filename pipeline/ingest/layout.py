"""Where the images of an NIH-layout folder are, found without reading them: shared by ingestion, exports and
repair, and light to import (no pandas, no pydicom), so an export starts fast."""
from __future__ import annotations

import os
from pathlib import Path


def image_files(root: Path) -> dict[str, Path]:
    """name -> path, from `images/` and the original `images_001..012/images/` folders. Paths are resolved (a
    folder once, a file only when it is a symbolic link), so a hard link made from one is to the file itself."""
    found: dict[str, Path] = {}
    root = Path(root)
    dirs = [root / "images"] + sorted(root.glob("images_*/images"))
    for d in dirs:
        if d.is_dir():
            real = d.resolve()
            with os.scandir(real) as it:
                for e in it:
                    if e.is_file() and not e.name.startswith("."):
                        found.setdefault(e.name, Path(os.path.realpath(e.path)) if e.is_symlink() else Path(e.path))
    return found
