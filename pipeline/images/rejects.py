"""Bad input is a `rejects` row naming the cause, never a crash of the batch (docs/design.md#reliability)."""
from __future__ import annotations

import os

MAX_PIXELS = int(os.environ.get("HARVEST_MAX_PIXELS", 50_000_000))
"""Largest image (width x height) ingested, checked from the header before any pixel is decoded. NIH images
are 1024x1024 and CR/DX detectors up to about 4300x4300 (18.5 MP); a 50 MP 16-bit PNG decodes in ~0.3 GB."""

MAX_FILE_BYTES = int(os.environ.get("HARVEST_MAX_FILE_BYTES", 4 * MAX_PIXELS + (1 << 20)))
"""Largest image file read, checked from its size (`stat`, or an archive member's tar header) before it is read
whole. The default holds an uncompressed image of MAX_PIXELS at 4 bytes a pixel (16-bit gray takes 2, RGBA 4),
plus 1 MiB of headers: 201 MB. NIH's PNGs are about 0.4 MB, an uncompressed 4300x4300 DICOM 37 MB."""


class Reject(Exception):
    """One input item cannot be used. `reason` is short and groupable; `detail` names the cause and the fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable, so a reject travels back from a decoding worker process
        return Reject, (self.reason, self.detail)


def check_pixels(width: int, height: int) -> None:
    """Reject an image larger than MAX_PIXELS, given the size its header declares."""
    if width * height > MAX_PIXELS:
        raise Reject("too_many_pixels", f"{width}x{height} = {width * height:,} pixels is over the limit of "
                     f"{MAX_PIXELS:,} (a decompression bomb, or not a radiograph); set HARVEST_MAX_PIXELS to "
                     "ingest larger images")


def check_file_size(n_bytes: int) -> None:
    """Reject an image file larger than MAX_FILE_BYTES, from its size alone: nothing of it is read."""
    if n_bytes > MAX_FILE_BYTES:
        raise Reject("file_too_large", f"{n_bytes:,} bytes is over the limit of {MAX_FILE_BYTES:,} for an image "
                     "file (no radiograph of HARVEST_MAX_PIXELS pixels needs that many); set HARVEST_MAX_FILE_BYTES "
                     "to ingest larger files")
