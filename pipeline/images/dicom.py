"""Read one DICOM file into a display-ready 8-bit chest X-ray and PHI-free metadata (docs/design.md#data-contracts, #reliability).

Pixel pipeline (pydicom 3, DICOM PS3.3 C.11 "grayscale pipeline"):

1. Decode the *first* frame only (``pydicom.pixels.pixel_array(ds, index=0)``): a chest X-ray is one frame;
   multi-frame objects (rare for CR/DX) contribute their first frame. pydicom masks the unused high bits above
   *Bits Stored* and sign-extends when *Pixel Representation* is 1, so garbage in the padding bits is ignored.
2. Modality LUT: *Modality LUT Sequence* or *Rescale Slope/Intercept* (``apply_modality_lut``).
3. VOI: the first *VOI LUT Sequence* item if present (``apply_voi``), else the first *Window Center/Width* pair
   (``apply_windowing``, honouring *VOI LUT Function*), else min-max over the image. Black and white are the
   VOI output range (the window's ``y_min..y_max``, or the LUT's smallest..largest entry), mapped to 0..255.
4. Polarity: the output is inverted when the image is MONOCHROME1 or its *Presentation LUT Shape* is INVERSE
   (PS3.3 C.11.6), so that every output looks like MONOCHROME2: air dark, bone bright. The two are not
   multiplied: DX requires INVERSE with MONOCHROME1 (one inversion, said twice); an INVERSE shape on a
   MONOCHROME2 image, seen from some CR units, asks for the one inversion on its own.

Colour (RGB, and YBR_* which pydicom converts to RGB) becomes gray by ITU-R BT.601 luma
``Y = 0.299 R + 0.587 G + 0.114 B`` scaled from ``0..2**BitsStored-1`` to 0..255, with no VOI (the standard
defines none for colour): scanned films and secondary captures stay usable. PALETTE COLOR and other
photometric interpretations are rejected.

PHI: only pseudonymous ids, sex, age in years, view position and pixel spacing leave this module.
Pseudonyms are ``HMAC-SHA256(salt, kind + NUL + value)`` truncated to 16 hex digits: ``p-...`` from
*PatientID*, ``i-...`` from *SOP Instance UID*. Without a salt the fixed ``PROJECT_SALT`` is used, which makes
pseudonyms reproducible by anyone with this code: real deployments must pass their own secret salt.
Reject details are written here and never quote a file's values; pydicom's warnings and log records (which
may quote raw element values) are swallowed while a file is read.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array

from pipeline.images.rejects import Reject, check_pixels

PROJECT_SALT = b"cxr-harvest/default-pseudonym-salt/v1"
"""Used when no salt is given. Public, so NOT a secret: deployments must pass a per-home secret salt."""

# pip package that provides a pydicom decoder for each compressed transfer syntax.
DECODER_PACKAGES = {
    dcm_uid.JPEGBaseline8Bit: "pylibjpeg-libjpeg",
    dcm_uid.JPEGExtended12Bit: "pylibjpeg-libjpeg",
    dcm_uid.JPEGLossless: "pylibjpeg-libjpeg",
    dcm_uid.JPEGLosslessSV1: "pylibjpeg-libjpeg",
    dcm_uid.JPEGLSLossless: "pyjpegls",
    dcm_uid.JPEGLSNearLossless: "pyjpegls",
    dcm_uid.JPEG2000Lossless: "pylibjpeg-openjpeg",
    dcm_uid.JPEG2000: "pylibjpeg-openjpeg",
    dcm_uid.HTJ2KLossless: "pylibjpeg-openjpeg",
    dcm_uid.HTJ2KLosslessRPCL: "pylibjpeg-openjpeg",
    dcm_uid.HTJ2K: "pylibjpeg-openjpeg",
    dcm_uid.RLELossless: "pylibjpeg-rle",
}
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_OTHER_PHOTOMETRIC = ("PALETTE COLOR", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK", "XYB")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_AGE_UNIT_DAYS = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25}
# View Position defined terms (PS3.3 C.8.11.5.1.1); anything else (free text could be PHI) becomes None.
VIEWS = frozenset({"AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO"})


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # uint8 [H, W], MONOCHROME2 look
    meta: dict  # patient_id, image_id, follow_up, sex, age, view, spacing_x, spacing_y

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def read_dicom(source: str | os.PathLike | BinaryIO, salt: bytes | None = None) -> DicomImage:
    """Decode a DICOM file (a path or a binary file object) into a `DicomImage`.

    Raises `Reject(reason, detail)` for any input that cannot be used, never another exception type, so a
    batch records the reject and goes on. `salt` keys the pseudonyms (module docstring).
    """
    try:
        data = source.read() if hasattr(source, "read") else Path(source).read_bytes()
    except OSError as exc:
        raise Reject("unreadable", f"cannot read the file ({type(exc).__name__})") from None
    if not data:
        raise Reject("empty_file", "zero-byte file: the copy or transfer failed; copy it again from the source")
    with _quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            raise Reject("not_dicom", "no DICOM Part 10 header (the 'DICM' prefix at byte 128 is missing); "
                         "only DICOM files belong in the source folder") from None
        except Exception as exc:  # pydicom raises many types for garbage; its text may quote values
            raise Reject("unreadable", f"pydicom could not parse the file ({type(exc).__name__})") from None
        try:
            _check_complete(ds, len(data), caught)
            frame = _first_frame(ds)
            pixels = _to_display(frame, ds)
            meta = _meta(ds, data, salt if salt is not None else PROJECT_SALT)
        except Reject:
            raise
        except Exception as exc:  # a malformed header element (LUT, spacing, ...): reject, don't crash the batch
            raise Reject("bad_header", f"an image attribute is malformed ({type(exc).__name__}); "
                         "check the file with dcmtk `dciodvfy`") from None
    return DicomImage(pixels=pixels, meta=meta)


@contextmanager
def _quiet_pydicom():
    """Swallow pydicom's warnings and log records for one file: they quote raw element values (maybe PHI)."""
    logger = logging.getLogger("pydicom")
    drop = logging.Filter("\0")  # a name no record has: drops everything
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        logger.removeFilter(drop)


def _truncated(where: str) -> Reject:
    return Reject("truncated", f"the file ends inside {where}: the copy is incomplete; copy it again")


def _check_complete(ds, size: int, caught: list) -> None:
    """pydicom stops quietly at end of file; a short last element or a missing delimiter means truncation."""
    if any("End of file" in str(w.message) for w in caught):
        raise _truncated("an undefined-length element (no sequence delimiter)")
    tags = list(ds.keys())
    if not tags:
        raise _truncated("the header")
    if ds.file_meta.get("TransferSyntaxUID") == dcm_uid.DeflatedExplicitVRLittleEndian:
        return  # positions refer to the inflated stream, not the file
    last = ds.get_item(max(tags))
    length = getattr(last, "length", 0xFFFFFFFF)
    if length == 0xFFFFFFFF or getattr(last, "value_tell", None) is None:
        return
    end = last.value_tell + length
    # Fewer bytes than declared; or leftover bytes too short for an element header before any Pixel Data.
    if end > size or (end < size and "PixelData" not in ds):
        raise _truncated("a data element")


def _first_frame(ds) -> np.ndarray:
    """Check what the decoder needs, then decode frame 0 (see the module docstring)."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise Reject("unsupported_bit_depth", "float pixel data is a parametric map, not a radiograph")
        raise Reject("no_pixel_data", "the file has no Pixel Data (7FE0,0010): not an image object")
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise Reject("unreadable", "the file meta has no Transfer Syntax UID (0002,0010); rewrite the header "
                     "(e.g. dcmtk `dcmconv`)")
    _check_decoder(dcm_uid.UID(tsyntax))
    bits, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits not in (8, 16) or not isinstance(stored, int) or not 1 <= stored <= bits:
        raise Reject("unsupported_bit_depth", f"Bits Allocated {bits}, Bits Stored {stored}: "
                     "only 8- or 16-bit radiographs are supported")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _MONO + _COLOUR:
        named = photometric if photometric in _OTHER_PHOTOMETRIC else "an unknown value"  # never echo free text
        raise Reject("unsupported_photometric", f"Photometric Interpretation {named} is not supported "
                     "(MONOCHROME1/2, RGB or YBR only)")
    check_pixels(ds.get("Columns") or 0, ds.get("Rows") or 0)  # from the header, before decoding
    try:
        frame = pixel_array(ds, index=0)
    except Exception as exc:
        if isinstance(exc, ValueError) and "less than expected" in str(exc):
            raise _truncated("the Pixel Data") from None
        raise Reject("decode_error", f"the {tsyntax.name} pixel data could not be decoded "
                     f"({type(exc).__name__}); the data is corrupt or the header does not match it") from None
    expected = 2 if photometric in _MONO else 3
    if frame.ndim != expected or min(frame.shape[:2]) < 1:
        raise Reject("decode_error", f"decoded frame has shape {frame.shape}, expected {expected} dimensions")
    return frame


def _check_decoder(tsyntax: dcm_uid.UID) -> None:
    """A compressed transfer syntax needs a pydicom plugin: name the pip package that provides it."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise Reject("unsupported_transfer_syntax", f"pydicom has no decoder for '{tsyntax.name}'; transcode "
                     "the file to an uncompressed syntax (e.g. dcmtk `dcmconv +te`)") from None
    if not decoder.is_available:
        package = DECODER_PACKAGES.get(tsyntax, "python-gdcm")
        also = " (or pylibjpeg-libjpeg)" if package == "pyjpegls" else ""
        raise Reject("missing_decoder", f"no decoder installed for '{tsyntax.name}': "
                     f"pip install {package}{also}")


def _to_display(frame: np.ndarray, ds) -> np.ndarray:
    """Stored values -> uint8 MONOCHROME2 display (steps 2-4 of the module docstring), by blocks of rows: the
    float64 steps cost one block's temporaries, not several times the image (a 50 MP frame stays under 1 GB)."""
    if frame.ndim == 3:  # colour, already RGB
        full = 2.0 ** int(ds.BitsStored) - 1
        return by_rows(frame, lambda b: to_uint8(b.astype(np.float64) @ _LUMA, 0.0, full))
    ranges = [_apply_voi(apply_modality_lut(frame[r], ds), ds)[1:] for r in row_blocks(frame)]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if hi <= lo:
        raise Reject("blank_image", "every pixel has the same value: nothing to learn from")
    pixels = by_rows(frame, lambda b: to_uint8(_apply_voi(apply_modality_lut(b, ds), ds)[0], lo, hi))
    if (str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
            or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"):
        pixels = 255 - pixels
    return pixels


def _apply_voi(values: np.ndarray, ds) -> tuple[np.ndarray, float, float]:
    """VOI LUT, else window, else min-max; returns (output, black level, white level)."""
    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = descriptor[0] or 2**16, descriptor[1]
        lut = apply_voi(np.arange(first, first + entries), ds, 0)  # the whole table: its output range
        # LUT indices are integers; a fractional rescale is rounded to the nearest entry.
        out = apply_voi(np.rint(values).astype(np.int64), ds, 0)
        return out, float(lut.min()), float(lut.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            out = apply_windowing(values, ds, 0)
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)  # saturate: y_min, y_max
            return out, float(min(lo, hi)), float(max(lo, hi))
        except (ValueError, TypeError, IndexError):
            pass  # an invalid window (e.g. width < 1): fall back to min-max as if none were given
    return values, float(values.min()), float(values.max())


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map `lo..hi` linearly to 0..255, rounded half to even and clipped."""
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def row_blocks(arr: np.ndarray) -> list[slice]:
    """Blocks of rows of about 1 M pixels each."""
    rows = max(1, 2 ** 20 // max(1, arr.shape[1]))
    return [slice(r, r + rows) for r in range(0, arr.shape[0], rows)]


def by_rows(arr: np.ndarray, fn) -> np.ndarray:
    """uint8 `[H, W]` from `fn(block)` of each row block of `arr` (`[H, W, ...]`): elementwise work in float64
    then needs one block's worth of memory."""
    out = np.empty(arr.shape[:2], np.uint8)
    for r in row_blocks(arr):
        out[r] = fn(arr[r])
    return out


def pseudonym(kind: str, value: str, salt: bytes) -> str:
    """`kind` is 'patient', 'image' or 'file' (a reject's path); the kind is hashed too, so id spaces never collide."""
    digest = hmac.new(salt, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[0]}-{digest[:16]}"


def _meta(ds, data: bytes, salt: bytes) -> dict:
    sop = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop:  # SOP Instance UID is type 1, but a broken export may lack it: key the image by its bytes
        sop = "sha256:" + hashlib.sha256(data).hexdigest()
    patient = str(ds.get("PatientID", "") or "").strip()
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    spacing_y, spacing_x = _spacing(ds)
    return {
        "patient_id": pseudonym("patient", patient, salt) if patient
        else pseudonym("patient", "unknown\0" + sop, salt),  # unknown patient: one pseudonym per image
        "image_id": pseudonym("image", sop, salt),
        "follow_up": None,  # DICOM has no NIH-style follow-up number
        "sex": sex if sex in ("M", "F") else None,
        "age": parse_age(ds.get("PatientAge")),
        "view": view if view in VIEWS else None,
        "spacing_x": spacing_x,
        "spacing_y": spacing_y,
    }


def parse_age(value) -> int | None:
    """DICOM AS ('045Y', '006M', '012W', '003D') -> whole years; None when absent or malformed."""
    match = _AGE.match(str(value or "").upper())
    if not match:
        return None
    count, unit = int(match.group(1)), match.group(2)
    return count if unit == "Y" else int(count * _AGE_UNIT_DAYS[unit] // 365.25)


def _spacing(ds) -> tuple[float | None, float | None]:
    """(row spacing, column spacing) in mm from Pixel Spacing, else Imager Pixel Spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, col = (float(v) for v in ds.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return row, col
    return None, None
