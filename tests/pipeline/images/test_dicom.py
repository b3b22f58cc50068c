"""pipeline.images.dicom.read_dicom: pydicom's own sample files, files written here, rejects and PHI."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, RLELossless

from pipeline.base.home import Home
from pipeline.images.dicom import DECODER_PACKAGES, PROJECT_SALT, parse_age, pseudonym, read_dicom
from pipeline.images.rejects import Reject
from tests.pipeline.images.dicom_fixtures import (MARK, MARKER, MARKER_UID, chest, patch_bytes, phi_elements,
                                                  with_voi_lut, write_dicom)

ROOT = Path(__file__).resolve().parents[3]
PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled(name: str) -> Path:
    """A pydicom sample that ships inside the wheel (never one that pydicom downloads on demand)."""
    path = Path(get_testdata_file(name))
    assert PYDICOM_DATA in path.parents, f"{name} is not bundled with pydicom"
    return path


# name -> what it exercises. All ship in the pydicom 3 wheel; none is skipped.
BUNDLED = {
    "CT_small.dcm": "explicit LE, signed 16-bit, rescale, no window: min-max",
    "MR_small_bigendian.dcm": "explicit big endian",
    "image_dfl.dcm": "deflated explicit LE",
    "6154": "CR, MONOCHROME1, 12 of 16 bits",
    "JPGExtended.dcm": "JPEG extended 12-bit (pylibjpeg-libjpeg)",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline 8-bit YBR_FULL colour",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG lossless SV1, RGB",
    "JPEG2000.dcm": "JPEG 2000 lossy (pylibjpeg-openjpeg)",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "MR_small_RLE.dcm": "RLE lossless",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "SC_rgb_rle_16bit_2frame.dcm": "RLE, 16-bit RGB, two frames",
}


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_samples_decode_to_sensible_uint8(name):
    path = bundled(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    img = read_dicom(path)
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (ds.Rows, ds.Columns)
    assert (img.height, img.width) == (ds.Rows, ds.Columns)
    assert int(img.pixels.max()) - int(img.pixels.min()) >= 50, "dynamic range collapsed"
    assert img.pixels.std() > 5 and len(np.unique(img.pixels)) >= 8, "constant or near-constant image"
    assert img.meta["image_id"].startswith("i-") and img.meta["patient_id"].startswith("p-")


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_encodings_of_one_image_display_identically(name):
    reference = read_dicom(bundled("MR_small.dcm"))
    img = read_dicom(bundled(name))
    np.testing.assert_array_equal(img.pixels, reference.pixels)
    assert img.meta == reference.meta  # same patient, same SOP instance: same pseudonyms


@pytest.mark.parametrize("name", ["6154", "17106"])
def test_rescale_and_window_of_samples_match_dicom_formula(name):
    """A CR (MONOCHROME1) and a CT carry rescale + window: PS3.3 C.11.2.1.2.1 LINEAR, by hand."""
    path = bundled(name)
    ds = pydicom.dcmread(path)
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    expected = np.clip(((values - c) / w + 0.5) * 255, 0, 255)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 255 - expected
    got = read_dicom(path).pixels.astype(float)
    assert np.abs(got - expected).max() <= 0.5 + 1e-6


def test_monochrome1_displays_like_monochrome2(tmp_path):
    anatomy = chest()
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", anatomy))
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", 4095 - anatomy, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1.pixels, mono2.pixels)
    assert (mono2.pixels[MARK] == 255).all(), "bright marker must stay top-left and bright"
    assert (mono2.pixels[-3:, :] == 0).all(), "air must be dark"
    # min-max over a full 0..4095 image is exactly v * 255 / 4095
    np.testing.assert_array_equal(mono2.pixels, np.rint(anatomy * (255 / 4095)).astype(np.uint8))


@pytest.mark.parametrize("photometric, shape, inverted", [
    ("MONOCHROME2", "IDENTITY", False), ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME1", "INVERSE", True),     # DX's required pairing: one inversion, not two
    ("MONOCHROME1", "IDENTITY", True)])
def test_presentation_lut_shape_inverse_inverts_once(tmp_path, photometric, shape, inverted):
    anatomy = chest()
    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", anatomy)).pixels
    got = read_dicom(write_dicom(tmp_path / "x.dcm", anatomy, photometric=photometric,
                                 PresentationLUTShape=shape)).pixels
    np.testing.assert_array_equal(got, 255 - plain if inverted else plain)


def test_bits_above_bits_stored_are_masked(tmp_path):
    anatomy = chest()
    clean = read_dicom(write_dicom(tmp_path / "clean.dcm", anatomy))
    dirty_path = write_dicom(tmp_path / "dirty.dcm", anatomy, high_bit_garbage=True)
    raw = np.frombuffer(pydicom.dcmread(dirty_path).PixelData, np.uint16)
    assert (raw >> 12).any(), "the fixture must really put garbage in the high bits"
    np.testing.assert_array_equal(read_dicom(dirty_path).pixels, clean.pixels)


def test_rescale_and_first_window_give_hand_computed_intensities(tmp_path):
    """HU = 2 v - 1000; window (C=0, W=401) LINEAR: y = ((x + 0.5) / 400 + 0.5) * 255 inside the window."""
    stored = np.zeros((16, 16), np.uint16)
    stored[0, :6] = [0, 450, 500, 525, 550, 600]   # HU -1000, -100, 0, 50, 100, 200
    path = write_dicom(tmp_path / "win.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=[0, 300], WindowWidth=[401, 1500])  # the second pair must be ignored
    px = read_dicom(path).pixels
    # -1000: below -> 0; -100: 64.07 -> 64; 0: 127.82 -> 128; 50: 159.69 -> 160; 100: 191.57 -> 192; 200: above
    assert px[0, :6].tolist() == [0, 64, 128, 160, 192, 255]


def test_sigmoid_window(tmp_path):
    """VOI LUT Function SIGMOID (PS3.3 C.11.2.1.3.1): y = 255 / (1 + exp(-4 (x - c) / w))."""
    stored = np.zeros((16, 16), np.uint16)
    stored[0, :3] = [900, 1000, 1100]  # c - w/4, c + w/4 and far above
    path = write_dicom(tmp_path / "sig.dcm", stored, WindowCenter=950, WindowWidth=200, VOILUTFunction="SIGMOID")
    # 255 / (1 + e) = 68.6 -> 69; 255 / (1 + 1/e) = 186.4 -> 186; 255 / (1 + e**-3) = 242.6 -> 243
    assert read_dicom(path).pixels[0, :3].tolist() == [69, 186, 243]


def test_voi_lut_sequence_beats_window(tmp_path):
    """LUT entries 0..1023 for inputs 100..1123: black and white are the LUT's own min and max."""
    stored = np.zeros((16, 16), np.uint16)
    stored[0, :5] = [0, 100, 612, 1123, 4000]
    lut = list(range(1024))
    path = write_dicom(tmp_path / "lut.dcm", stored, WindowCenter=50, WindowWidth=10, **with_voi_lut(100, lut))
    px = read_dicom(path).pixels
    # 0 < first -> entry 0; 612 -> 512 * 255 / 1023 = 127.62; beyond the table -> last entry
    assert px[0, :5].tolist() == [0, 0, 128, 255, 255]


def test_rle_lossless_written_here_round_trips(tmp_path):
    anatomy = chest()
    plain = read_dicom(write_dicom(tmp_path / "plain.dcm", anatomy))
    path = write_dicom(tmp_path / "rle.dcm", anatomy, transfer_syntax=RLELossless)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    img = read_dicom(path)
    np.testing.assert_array_equal(img.pixels, plain.pixels)
    assert (img.pixels[MARK] == 255).all() and img.pixels[-1, -1] == 0


def test_multiframe_takes_first_frame(tmp_path):
    anatomy = chest()
    frames = np.stack([anatomy, anatomy[::-1]])  # second frame upside down
    img = read_dicom(write_dicom(tmp_path / "mf.dcm", frames, frames=2))
    np.testing.assert_array_equal(img.pixels, read_dicom(write_dicom(tmp_path / "one.dcm", anatomy)).pixels)


def test_rgb_becomes_bt601_luma(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2], rgb[0, 3] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    px = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)).pixels
    assert px.shape == (16, 16)
    assert px[0, :4].tolist() == [76, 150, 29, 255]  # 0.299, 0.587, 0.114 of 255, rounded


def test_metadata_is_parsed_and_pseudonymised(tmp_path):
    path = write_dicom(tmp_path / "m.dcm", chest(), PatientAge="006M", ViewPosition="AP",
                       PixelSpacing=[0.143, 0.139])
    meta = read_dicom(path, salt=b"home-secret").meta
    assert meta == {"patient_id": pseudonym("patient", "PID-0001", b"home-secret"),
                    "image_id": pseudonym("image", "1.2.826.0.1.3680043.8.498.1", b"home-secret"),
                    "follow_up": None, "sex": "F", "age": 0, "view": "AP", "spacing_x": 0.139, "spacing_y": 0.143}
    assert meta["patient_id"] != pseudonym("patient", "PID-0001", PROJECT_SALT), "the salt must matter"
    assert read_dicom(path).meta["patient_id"] == pseudonym("patient", "PID-0001", PROJECT_SALT)
    # ImagerPixelSpacing is the fallback; a missing PatientID still yields a (per-image) pseudonym
    meta = read_dicom(write_dicom(tmp_path / "n.dcm", chest(), PatientID=None, PatientSex="O")).meta
    assert (meta["spacing_y"], meta["spacing_x"], meta["sex"]) == (0.2, 0.15, None)
    assert meta["patient_id"].startswith("p-")


@pytest.mark.parametrize("value, years", [("045Y", 45), ("006M", 0), ("018M", 1), ("104W", 1), ("400D", 1),
                                          ("", None), (None, None), ("45", None), ("abcY", None)])
def test_parse_age(value, years):
    assert parse_age(value) == years


def reject_of(source) -> Reject:
    with pytest.raises(Reject) as info:
        read_dicom(source)
    return info.value


def test_rejects_empty_non_dicom_and_no_pixels(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert reject_of(tmp_path / "empty.dcm").reason == "empty_file"
    (tmp_path / "note.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    assert reject_of(tmp_path / "note.dcm").reason == "not_dicom"
    assert reject_of(write_dicom(tmp_path / "nopix.dcm", None)).reason == "no_pixel_data"
    assert reject_of(tmp_path / "absent.dcm").reason == "unreadable"
    flat = write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 7, np.uint16))
    assert reject_of(flat).reason == "blank_image"
    assert reject_of(bundled("liver_1frame.dcm")).reason == "unsupported_bit_depth"     # 1-bit
    assert reject_of(bundled("rtdose_1frame.dcm")).reason == "unsupported_bit_depth"    # 32-bit
    assert reject_of(bundled("examples_palette.dcm")).reason == "unsupported_photometric"


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_files_are_rejected(tmp_path, keep):
    data = write_dicom(tmp_path / "full.dcm", chest()).read_bytes()
    cut = len(data) + keep if keep < 0 else int(len(data) * keep)
    assert reject_of(io.BytesIO(data[:cut])).reason == "truncated"


def test_truncated_inside_header_and_encapsulated_data(tmp_path):
    data = write_dicom(tmp_path / "full.dcm", chest()).read_bytes()
    start = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag: cut inside its element header
    assert reject_of(io.BytesIO(data[:start + 5])).reason == "truncated"
    rle = bundled("MR_small_RLE.dcm").read_bytes()
    assert reject_of(io.BytesIO(rle[:-300])).reason == "truncated"
    assert reject_of(bundled("MR_truncated.dcm")).reason == "truncated"


def test_transfer_syntax_without_any_decoder(tmp_path):
    path = write_dicom(tmp_path / "mpeg.dcm", chest())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom has no decoder at all
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds.save_as(path)
    rej = reject_of(path)
    assert rej.reason == "unsupported_transfer_syntax" and "MPEG2" in rej.detail


# Runs in a fresh interpreter that sees the environment as after `pip uninstall pylibjpeg-libjpeg`:
# its module cannot be imported and its pylibjpeg entry points are gone.
_NO_LIBJPEG = """
import importlib.metadata as md
import sys
sys.modules["libjpeg"] = None
_entry_points = md.entry_points
md.entry_points = lambda **kw: md.EntryPoints(
    ep for ep in _entry_points(**kw) if not ep.value.startswith("libjpeg")) if kw else _entry_points()
from pipeline.images.dicom import read_dicom
from pipeline.images.rejects import Reject
for path in sys.argv[1:]:
    try:
        read_dicom(path)
        print("decoded")
    except Reject as rej:
        print(rej.reason, "|", rej.detail)
"""


def test_missing_decoder_names_the_package_to_install():
    jpeg_ls, jpeg_lossless = bundled("MR_small_jpeg_ls_lossless.dcm"), bundled("SC_rgb_jpeg_gdcm.dcm")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _NO_LIBJPEG, str(jpeg_ls), str(jpeg_lossless)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert lines[0].startswith("missing_decoder |") and "pip install pyjpegls" in lines[0]
    assert lines[1].startswith("missing_decoder |") and "pip install pylibjpeg-libjpeg" in lines[1]
    assert DECODER_PACKAGES[JPEGLSLossless] == "pyjpegls"
    # the same files decode here, where the plugin is installed
    assert read_dicom(jpeg_ls).pixels.shape == (64, 64)


def _phi_free(text: str) -> None:
    for needle in (MARKER, MARKER_UID, "19450102", "PID-0001", "Doe^Jane"):
        assert needle not in text, f"PHI {needle!r} leaked"


def test_no_phi_in_result_exceptions_warnings_or_logs(tmp_path, caplog):
    phi = phi_elements()
    with pytest.warns(UserWarning, match="VR AS"):  # an invalid age string: pydicom complains, quoting it
        good = write_dicom(tmp_path / "good.dcm", chest(), **phi, PatientAge=MARKER, ViewPosition=MARKER)
    # pydicom logs "Invalid value for VR IS: '<value>'" when it reads this Number of Frames
    frames = patch_bytes(write_dicom(tmp_path / "frames.dcm", chest(), **phi, NumberOfFrames="987654321098"),
                         b"987654321098", MARKER.encode())
    bad = [write_dicom(tmp_path / "nopix.dcm", None, **phi),
           write_dicom(tmp_path / "deep.dcm", chest(), **phi, BitsStored=20), frames]
    data = good.read_bytes()
    bad_bytes = [data[:len(data) // 2], data[:data.index(b"\xe0\x7f\x10\x00") + 5]]
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # writing the fixture above logs pydicom's complaint about the bad age; reading must not
    rejected = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = read_dicom(good)
        texts = [repr(img.meta), str(img.meta)]
        for source in bad + [io.BytesIO(b) for b in bad_bytes]:
            try:
                read_dicom(source)
            except Reject as rej:
                texts += [rej.reason, rej.detail, "".join(traceback.format_exception(rej))]
                rejected += 1
    assert rejected == 5
    assert img.meta["age"] is None and img.meta["view"] is None and img.meta["sex"] == "F"
    assert img.meta["patient_id"] == pseudonym("patient", MARKER, PROJECT_SALT)
    texts += [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    _phi_free("\n".join(texts))
    assert MARKER.encode() not in img.pixels.tobytes()


def test_ingest_dicom_end_to_end_keeps_display_and_leaks_no_phi(tmp_path):
    """Real ingestion into a home: cache orientation and intensity hold; no byte of PHI lands in the home."""
    from pipeline.images.cache import gather
    from pipeline.ingest.dicom import home_salt, ingest_dicom
    from warehouse.db import connect

    root, home = tmp_path / "dicoms", tmp_path / "home"
    (root / "sub").mkdir(parents=True)
    phi, anatomy = phi_elements(), chest(64, 64)
    mono1 = write_dicom(root / f"{MARKER}_chest.dcm", 4095 - anatomy, photometric="MONOCHROME1", **phi)
    rle = write_dicom(root / "sub" / "rle.dcm", anatomy[::-1], transfer_syntax=RLELossless,
                      **{**phi, "SOPInstanceUID": MARKER_UID + ".9"})
    write_dicom(root / f"{MARKER}_nopix.dcm", None, **phi)
    data = mono1.read_bytes()
    (root / "sub" / "cut.dcm").write_bytes(data[:len(data) // 2])
    (root / "notes.dcm").write_bytes(f"{MARKER} Doe^Jane notes".encode())

    summary = ingest_dicom(home, root, sizes=(256,))
    assert summary["images"] == 2 and summary["rejects"] == 3

    con = connect(home)
    try:
        rows = con.execute("SELECT image_id, patient_id, width, height, view, source_sha256 FROM images "
                           "ORDER BY image_id").fetchall()
        reasons = sorted(r[0] for r in con.execute("SELECT reason FROM rejects").fetchall())
        entries = dict(con.execute("SELECT source_sha256, shard FROM cache_entries WHERE size = 256").fetchall())
        rows_of = dict(con.execute("SELECT source_sha256, row FROM cache_entries WHERE size = 256").fetchall())
    finally:
        con.close()
    assert reasons == ["no_pixel_data", "not_dicom", "truncated"]
    salt = home_salt(Home.resolve(home))
    expected = read_dicom(mono1, salt=salt).meta
    by_id = {r[0]: r for r in rows}
    assert expected["image_id"] in by_id and read_dicom(rle, salt=salt).meta["image_id"] in by_id
    _, patient, width, height, view, sha = by_id[expected["image_id"]]
    assert (patient, width, height, view) == (expected["patient_id"], 64, 64, "PA")

    cached = gather(home / "cache", 256, np.array([entries[sha]]), np.array([rows_of[sha]]))[0]
    scale = 256 // 64  # the 6x6 marker at rows/cols 2..7 covers 8..31 in the 256 cache
    assert cached[8 + scale:32 - scale, 8 + scale:32 - scale].min() >= 250, "marker must stay top-left, bright"
    assert cached[-3 * scale + 3:, :].max() <= 5, "the 3-row air strip at the bottom must stay dark"
    np.testing.assert_allclose(cached.astype(float).mean(), read_dicom(mono1).pixels.mean(), atol=2)

    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "warehouse.duckdb" for p in files) and any(p.suffix == ".u8" for p in files)
    for path in files:
        blob = path.read_bytes()
        for needle in (MARKER, MARKER_UID, "Doe^Jane", "19450102"):
            assert needle.encode() not in blob, f"PHI {needle!r} found in {path.relative_to(home)}"
