"""Write small, fully specified DICOM files with pydicom for the DICOM reader tests.

`chest()` is a 12-bit toy radiograph in MONOCHROME2 sense (high = dense = bright): air 0, lungs low,
mediastinum and spine high, and a saturated marker block in the top-left corner so orientation is testable.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless,
                         DigitalXRayImageStorageForPresentation)

MARKER = "ZQXPHIMARKER"  # put into every identifying field; must never come out of the reader
MARKER_UID = "1.2.826.0.1.3680043.8.498.777000111222333444555"  # SOP Instance UID of PHI-tagged files
MARK = (slice(2, 8), slice(2, 8))  # the top-left marker block of `chest()`


def chest(height: int = 48, width: int = 40) -> np.ndarray:
    """uint16 [H, W] with values 0..4095 (both ends present): a crude PA chest."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.full((height, width), 600, np.int32)                        # soft tissue
    for cx in (0.3 * width, 0.7 * width):                                # two lungs, darker
        lung = ((x - cx) / (0.17 * width)) ** 2 + ((y - 0.5 * height) / (0.33 * height)) ** 2 < 1
        img[lung] = 200 + (y[lung] * 7) % 50
    img[:, int(0.46 * width):int(0.54 * width)] = 3000                   # spine, bright
    img[-3:, :] = 0                                                      # air strip at the bottom
    img[MARK] = 4095                                                     # orientation marker
    return img.astype(np.uint16)


def write_dicom(path: str | Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, signed: bool = False, transfer_syntax: str = ExplicitVRLittleEndian,
                high_bit_garbage: bool = False, frames: int = 1, **elements) -> Path:
    """Write `pixels` ([H, W], [H, W, 3] for RGB, or [F, H, W] with `frames`) as a DX image.

    `elements` set or override any attribute by keyword (`WindowCenter=...`, `PatientName=...`); a value of
    None deletes it. `high_bit_garbage` fills the bits above `bits_stored` with noise (real scanners do).
    """
    path = Path(path)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = elements.get("SOPInstanceUID", "1.2.826.0.1.3680043.8.498.1")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-0001"
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = "F", "045Y", "PA"
    ds.ImagerPixelSpacing = [0.2, 0.15]
    if pixels is not None:
        arr = np.asarray(pixels)
        colour = photometric in ("RGB", "YBR_FULL")
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
        ds.BitsAllocated = 8 if arr.dtype.itemsize == 1 else 16
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(signed)
        if colour:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        raw = arr.astype(np.uint16 if ds.BitsAllocated == 16 else np.uint8)
        if high_bit_garbage:
            noise = np.random.default_rng(0).integers(0, 2 ** (16 - bits_stored), raw.shape, dtype=np.uint16)
            raw = (raw & (2**bits_stored - 1)) | (noise << bits_stored).astype(np.uint16)
        ds.PixelData = raw.tobytes()
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, encoding_plugin="pydicom" if transfer_syntax == RLELossless else "")
    ds.save_as(path, enforce_file_format=True)
    return path


def voi_lut_item(first: int, data: list[int], bits: int = 16) -> Dataset:
    """One VOI LUT Sequence item (PS3.3 C.11.2): inputs first.. map to `data`."""
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item.add_new(0x00283006, "US", data)  # LUT Data
    return item


def with_voi_lut(first: int, data: list[int]) -> dict:
    return {"VOILUTSequence": Sequence([voi_lut_item(first, data)])}


def phi_elements() -> dict:
    """Identifying attributes carrying MARKER (free text) or MARKER_UID (UIDs)."""
    return dict(PatientName=f"{MARKER}^Jane", PatientID=MARKER, AccessionNumber=MARKER[:16],
                PatientBirthDate="19450102", InstitutionName=MARKER, ReferringPhysicianName=MARKER,
                StudyInstanceUID=MARKER_UID + ".1", SeriesInstanceUID=MARKER_UID + ".2",
                SOPInstanceUID=MARKER_UID, StudyID=MARKER[:16], OtherPatientIDs=MARKER)


def patch_bytes(path: Path, old: bytes, new: bytes) -> Path:
    """Overwrite a placeholder in a written file: how tests plant values pydicom refuses to write."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path
