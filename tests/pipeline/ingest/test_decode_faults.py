"""Files that fail to decode become rejects and the batch goes on (decompression bombs, giants, a JPEG named
.png, corrupt and unreadable files); decoding memory stays bounded; DICOM reject paths are keyed by the home's
secret."""
import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.base.home import Home
from pipeline.ingest.common import decode_png
from pipeline.ingest.dicom import home_salt, ingest_dicom, reject_path
from pipeline.ingest.nih import ingest_nih
from tests.conftest import gray_image
from tests.pipeline.images.dicom_fixtures import chest, write_dicom
from warehouse import db

BAD = {"bomb_000.png": "too_many_pixels", "giant16_000.png": "too_many_pixels", "jpeg_000.png": "format_mismatch",
       "corrupt_000.png": "unreadable_image", "ioerror_000.png": "decode_error"}


def png(width: int, height: int, depth: int, row) -> bytes:
    """A gray PNG written row by row, `row(r)` giving row r's raw bytes: a 30000x30000 bomb takes 0.2 s."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(b"\0" + row(r)) for r in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def rejects(home) -> list[tuple]:
    con = db.connect(home, read_only=True)
    try:
        return sorted(con.execute("SELECT path, reason, detail FROM rejects").fetchall())
    finally:
        con.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc for a file that fails to read")
@pytest.mark.parametrize("n_good, workers", [(1, 1), (60, 2)], ids=["in-process", "worker-processes"])
def test_bad_files_are_rejects_and_the_batch_goes_on(make_nih, tmp_path, n_good, workers):
    good = [f"{k:08d}_000.png" for k in range(n_good)]
    root = make_nih([(n, "Mass", k) for k, n in enumerate(good)] + [(n, "Mass", 900) for n in BAD], size=32)
    img = root / "images"
    (img / "bomb_000.png").write_bytes(png(30000, 30000, 1, lambda r: bytes(3750)))      # 0.9 G pixels
    (img / "giant16_000.png").write_bytes(png(8000, 8000, 16, lambda r: bytes(16000)))   # 64 M pixels
    Image.fromarray(gray_image(5, 32)).save(img / "jpeg_000.png", format="JPEG")
    data = (img / good[0]).read_bytes()
    (img / "corrupt_000.png").write_bytes(data[:50] + bytes(len(data) - 50))            # header kept, data zeroed
    (img / "ioerror_000.png").unlink()
    (img / "ioerror_000.png").symlink_to("/proc/self/mem")                               # read() fails with EIO
    home = tmp_path / "home"

    summary = ingest_nih(home, root, sizes=(32,), workers=workers)
    assert summary["images"] == n_good and summary["rejects"] == len(BAD)
    con = db.connect(home, read_only=True)
    assert sorted(r[0] for r in con.execute("SELECT image_id FROM images").fetchall()) == good
    con.close()
    got = rejects(home)
    assert [(p, r) for p, r, _ in got] == sorted((f"images/{n}", r) for n, r in BAD.items())
    detail = {p.removeprefix("images/"): d for p, _, d in got}
    assert "8000x8000" in detail["giant16_000.png"] and "50,000,000" in detail["giant16_000.png"]
    assert all("HARVEST_MAX_PIXELS" in detail[n] for n in ("bomb_000.png", "giant16_000.png"))
    assert "JPEG" in detail["jpeg_000.png"] and detail["ioerror_000.png"].startswith("OSError: [Errno 5]")

    again = ingest_nih(home, root, sizes=(32,), workers=workers)
    assert again["skipped_cached"] == n_good and rejects(home) == got


def test_16bit_stretch_equals_the_float64_formula():
    arr = np.random.default_rng(0).integers(100, 60000, (300, 5000)).astype(np.uint16)  # 2 blocks of rows
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    old = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)  # the former whole-image formula
    ref = np.round((old - old.min()) * (255.0 / (old.max() - old.min()))).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(buf.getvalue(), ".png"), ref)


DECODE = {"png": "from pipeline.ingest.common import decode_png; px = decode_png(open(path, 'rb').read(), '.png')",
          "dicom": "from pipeline.images.dicom import read_dicom; px = read_dicom(path).pixels"}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux /proc")
@pytest.mark.parametrize("kind", DECODE)
def test_a_49_megapixel_16bit_image_decodes_under_1_gb(tmp_path, kind):
    """7000x7000 16-bit, just under MAX_PIXELS: the float64 steps run by blocks of rows (formerly 1.4-1.8 GB)."""
    path = tmp_path / f"giant.{kind}"
    if kind == "png":
        steps = np.repeat(np.arange(7, dtype=">u2"), 1000) * 9000
        path.write_bytes(png(7000, 7000, 16, lambda r: (steps + r).tobytes()))
    else:
        write_dicom(path, np.add.outer(np.arange(7000) % 4096, np.zeros(7000)).astype(np.uint16),
                    WindowCenter=2000, WindowWidth=3000)
    # VmHWM, the peak of this process's own memory: ru_maxrss would carry over the parent's peak across exec
    code = (f"path = {str(path)!r}; {DECODE[kind]}; from pipeline.images.cache import resize; resize(px, 256); "
            "print(px.shape, open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    shape, peak_kib = out.stdout.rsplit(" ", 1)
    assert shape == "(7000, 7000)" and int(peak_kib) < 1024 ** 2, f"peak RSS {int(peak_kib) >> 10} MiB"


def test_dicom_reject_paths_are_keyed_by_the_home_secret(tmp_path):
    root = tmp_path / "dicoms"
    root.mkdir()
    write_dicom(root / "good.dcm", chest(64, 64))
    (root / "Doe_John.dcm").write_bytes(b"a patient's name in a file name")
    write_dicom(root / "huge.dcm", chest(64, 64), Rows=10000, Columns=10000)  # the header alone is rejected
    homes = [tmp_path / "a", tmp_path / "b"]
    got = []
    for home in homes:
        assert ingest_dicom(home, root, sizes=(32,))["images"] == 1
        got.append({p: r for p, r, _ in rejects(home)})
    salt = home_salt(Home.resolve(homes[0]))
    assert got[0] == {reject_path("Doe_John.dcm", salt): "not_dicom", reject_path("huge.dcm", salt): "too_many_pixels"}
    unsalted = {hashlib.sha256(n.encode()).hexdigest()[:16] for n in ("Doe_John.dcm", "huge.dcm")}
    assert not {p.split("-")[-1] for p in got[0]} & unsalted
    assert not set(got[0]) & set(got[1])  # another home, another secret: other names

    con = db.connect(homes[0])  # a row named by the former unsalted digest
    con.execute("INSERT INTO rejects VALUES ('ingest.dicom', ?, ?, 'not_dicom', '', now())",
                [str(root.resolve()), f"file-{min(unsalted)}"])
    con.close()
    ingest_dicom(homes[0], root, sizes=(32,))
    assert [(p, r) for p, r, _ in rejects(homes[0])] == sorted(got[0].items())  # same names, no duplicates


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux /proc")
def test_a_file_too_large_for_an_image_is_rejected_from_its_size_unread(make_nih, tmp_path):
    """A sparse 1 GB `.png` (no disk used) beside good files: rejected from its size, never read whole (its read
    would take a 1 GB peak); an archive member from its tar header; the limit follows HARVEST_MAX_FILE_BYTES."""
    import tarfile

    from tests.pipeline.ingest.test_nih_archives import make_archives
    root = make_nih([("00000001_000.png", "Mass", 1), ("00000002_000.png", "Mass", 2), ("huge_000.png", "Mass", 3)])
    with open(root / "images" / "huge_000.png", "r+b") as f:
        f.truncate(1 << 30)
    code = ("import sys; from pipeline.ingest.nih import ingest_nih; s = ingest_nih(sys.argv[1], sys.argv[2], "
            "sizes=(32,), workers=1); print(s['images'], s['rejects'], "
            "open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")

    def ingest(home, source, **env):
        out = subprocess.run([sys.executable, "-c", code, str(home), str(source)], capture_output=True, text=True,
                             check=True, cwd=os.getcwd(), env={**os.environ, **env})
        return [int(v) for v in out.stdout.split()]

    images, n_rejects, peak_kib = ingest(tmp_path / "a", root)
    assert (images, n_rejects) == (2, 1) and peak_kib < 700 * 1024, f"peak RSS {peak_kib >> 10} MiB"
    ((path, reason, detail),) = rejects(tmp_path / "a")
    assert (path, reason) == ("images/huge_000.png", "file_too_large")
    assert "1,073,741,824 bytes" in detail and "HARVEST_MAX_FILE_BYTES" in detail

    (root / "images" / "huge_000.png").unlink()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)).save(root / "images" / "huge_000.png")
    small = (root / "images" / "00000001_000.png").stat().st_size
    assert (root / "images" / "huge_000.png").stat().st_size > small + 1000
    download = make_archives(root, tmp_path / "download", per_archive=3)[0].parent
    with tarfile.open(download / "images_001.tar.gz") as tar:
        assert [m.name for m in tar.getmembers()][-1] == "images/huge_000.png"
    assert ingest(tmp_path / "b", download, HARVEST_MAX_FILE_BYTES=str(small + 1000))[:2] == [2, 1]
    ((path, reason, detail),) = rejects(tmp_path / "b")
    assert (path, reason) == ("images/huge_000.png", "file_too_large") and f"{small + 1000:,}" in detail
