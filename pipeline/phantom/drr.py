"""Digitally reconstructed radiographs: line integrals of mu through the CT, in a PA and an AP geometry.

Image formation (per anatomy variant and view, `make_base`):
1. Each coronal slab of the atlas is magnified about the central ray by its depth's magnification
   M(y) = SID / (SID - d(y)), d = distance to the detector (PA: detector anterior, SID 1.8 m; AP: detector
   posterior, SID 1.0 m), normalized at mid-body, and shifted for patient obliquity and lordotic tilt; the
   slabs are summed. Soft-tissue and bone density factors weight the two material channels.
2. Heart size: the heart is scaled in 3-D about its centre; in projection its path length becomes
   T'(u) = s T(c + (u - c) / s), and the lung it displaces turns into tissue: dP = (T' - T)(mu_heart - mu_lung).
3. The variant's 2-D warp (rigid rotation, scale, position, smooth elastic field, lung inflation) resamples the
   native map into the size x size output frame.
4. Log-domain exposure: I = exp(-P) plus a low-frequency scatter term, detector blur, L = -log I; unsharp
   "edge enhancement" as in clinical processing; quantum noise with sigma ~ 1/sqrt(I); window to 8 bit.

Findings (`Lesion`) are local deltas of P: they are resampled into the output frame through the same maps and
passed through the linearized chain dL = c * enhance(blur(dP)), c = primary / (primary + scatter).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipeline.phantom.anatomy import MU_WATER, NATIVE, PIX, TOP_PAD, Atlas

SID = {"PA": 1800.0, "AP": 1000.0}   # source-image distance, mm
AIR_GAP = 20.0                        # mm between skin and detector
MU_HEART_MINUS_LUNG = MU_WATER * (1.04 - 0.15)
DETECTOR_BLUR = 0.9                   # px at 1024
ENHANCE_GAIN, ENHANCE_RADIUS = 0.7, 10   # unsharp mask: L + g (L - box^3(L)), radius in px at 1024
SCATTER = 0.12
FIELD_ZOOM = 1.1                      # the output field covers NATIVE / FIELD_ZOOM native px...
FIELD_CENTER_ROW = 236.0              # ...centred here: neck to upper abdomen, like a chest radiograph
FOOTPRINT = 0.1                       # a finding's footprint: |dP| >= FOOTPRINT * max |dP|


@dataclass(frozen=True)
class Variant:
    """One patient's anatomy: the parameters of the 3-D and 2-D variety (see `sample_variant`)."""
    scale: float
    rotation: float        # degrees, in-plane
    shift: tuple           # (row, col) native px
    elastic: tuple         # 4x4x2 control displacements, native px
    inflation: float       # vertical stretch of the thorax below the apices
    soft: float            # soft-tissue density factor
    bone: float            # bone density factor
    heart: float           # heart scale (3-D)
    obliquity: float       # degrees, rotation about the vertical axis
    tilt: float            # degrees, lordotic tilt
    exposure: float        # mAs-like factor on quantum noise


def sample_variant(rng: np.random.Generator) -> Variant:
    return Variant(scale=float(rng.uniform(0.92, 1.06)), rotation=float(rng.normal(0, 1.5)),
                   shift=(float(rng.normal(0, 8)), float(rng.normal(0, 8))),
                   elastic=tuple(np.round(rng.normal(0, 3.0, 32), 4)),
                   inflation=float(rng.uniform(0.94, 1.07)), soft=float(rng.uniform(0.9, 1.12)),
                   bone=float(rng.uniform(0.8, 1.2)), heart=float(rng.uniform(0.92, 1.04)),
                   obliquity=float(rng.normal(0, 2.0)), tilt=float(rng.normal(0, 2.5)),
                   exposure=float(rng.uniform(0.7, 1.4)))


@dataclass
class ViewGeometry:
    mag: np.ndarray        # [S] magnification per slab, relative to mid-body
    shift: np.ndarray      # [S, 2] (row, col) native px
    y_ref: float

    def at(self, y: float, atlas: Atlas):
        """Magnification and shift at depth y (mm), interpolated between slabs."""
        m = float(np.interp(y, atlas.slab_y, self.mag))
        s = (float(np.interp(y, atlas.slab_y, self.shift[:, 0])), float(np.interp(y, atlas.slab_y, self.shift[:, 1])))
        return m, s


def view_geometry(atlas: Atlas, variant: Variant, view: str) -> ViewGeometry:
    post, ant = atlas.body_y
    sid = SID[view]
    y = atlas.slab_y.astype(float)
    d = (ant + AIR_GAP - y) if view == "PA" else (y - post + AIR_GAP)
    y_ref = (post + ant) / 2
    d_ref = (ant + AIR_GAP - y_ref) if view == "PA" else (y_ref - post + AIR_GAP)
    mag = (sid - d_ref) / (sid - d)
    dy = y - y_ref
    shift = np.stack([-dy * np.tan(np.radians(variant.tilt)), dy * np.tan(np.radians(variant.obliquity))], 1) / PIX
    return ViewGeometry(mag=mag.astype(np.float32), shift=shift.astype(np.float32), y_ref=y_ref)


def _slab_affine(img: np.ndarray, mag: float, shift, order: int = 1) -> np.ndarray:
    """Magnify about the native centre and shift: out(u) = img(c + (u - shift - c) / mag)."""
    c = (NATIVE - 1) / 2
    offset = c - (c + np.asarray(shift, float)) / mag
    return ndimage.affine_transform(img, np.full(2, 1 / mag), offset=offset, order=order, mode="nearest")


def compose(slabs: np.ndarray, geom: ViewGeometry) -> np.ndarray:
    """Sum of the slab projections, each placed with its depth's magnification and shift (step 1)."""
    out = np.zeros(slabs.shape[1:], np.float32)
    for s in range(slabs.shape[0]):
        if slabs[s].any():
            out += _slab_affine(slabs[s], float(geom.mag[s]), geom.shift[s])
    return out


def heart_delta(t_heart: np.ndarray, scale: float) -> np.ndarray:
    """dP of scaling the heart by `scale` in 3-D (step 2); its path length grows by the same factor."""
    if abs(scale - 1) < 1e-6:
        return np.zeros_like(t_heart)
    w = t_heart.sum()
    rows, cols = np.indices(t_heart.shape)
    c = np.array([(rows * t_heart).sum() / w, (cols * t_heart).sum() / w])
    scaled = scale * ndimage.affine_transform(t_heart, np.full(2, 1 / scale), offset=c - c / scale, order=1)
    return ((scaled - t_heart) * MU_HEART_MINUS_LUNG).astype(np.float32)


def output_coords(variant: Variant, size: int, atlas_apex_row: float) -> np.ndarray:
    """Output pixel (row, col) -> native (row, col): rotation, scale, position, elastic field, inflation."""
    k = NATIVE / size
    g = np.arange(size, dtype=np.float32) - (size - 1) / 2
    rr, cc = np.meshgrid(g, g, indexing="ij")
    th = np.radians(variant.rotation)
    ct, st = np.float32(np.cos(th)), np.float32(np.sin(th))
    f = np.float32(k / (variant.scale * FIELD_ZOOM))
    c = (NATIVE - 1) / 2
    row = FIELD_CENTER_ROW + f * (ct * rr - st * cc) + variant.shift[0]
    col = c + f * (st * rr + ct * cc) + variant.shift[1]
    ctrl = np.asarray(variant.elastic, np.float32).reshape(2, 4, 4)
    field = np.stack([ndimage.zoom(ctrl[i], size / 4, order=3, mode="nearest", grid_mode=True) for i in range(2)])
    row += field[0]
    col += field[1]
    # inflation: the thorax below the apices is stretched (deeper breath = taller lungs, lower diaphragm)
    row = np.where(row > atlas_apex_row, atlas_apex_row + (row - atlas_apex_row) / variant.inflation, row)
    return np.stack([row, col]).astype(np.float32)


def _box3(x: np.ndarray, radius: int) -> np.ndarray:
    """Three box filters ~ a Gaussian of sigma ~ radius, O(1) per pixel whatever the radius."""
    n = 2 * radius + 1
    for _ in range(3):
        x = ndimage.uniform_filter(x, n, mode="nearest")
    return x


def enhance(L: np.ndarray, size: int) -> np.ndarray:
    """Clinical unsharp masking, linear in L so that deltas can be processed locally."""
    r = max(1, round(ENHANCE_RADIUS * size / 1024))
    return L + ENHANCE_GAIN * (L - _box3(L, r))


def detector_blur(x: np.ndarray, size: int) -> np.ndarray:
    return ndimage.gaussian_filter(x, DETECTOR_BLUR * size / 1024, mode="nearest", truncate=3.0)


@dataclass
class Base:
    """A precomputed radiograph of one (variant, view) before findings and noise."""
    variant: Variant
    view: str
    size: int
    geom: ViewGeometry
    coords: np.ndarray       # [2, size, size] output -> native
    P: np.ndarray            # [size, size] line integral
    L: np.ndarray            # [size, size] processed log image
    gain: np.ndarray         # [size, size] primary fraction c (linearized chain)
    sigma: np.ndarray        # [size//2, size//2] noise sigma in L units
    window: tuple            # (lo, hi) in L units
    t_heart: np.ndarray      # [NATIVE, NATIVE] heart path length in this view, variant heart size applied
    t_lung: np.ndarray       # [NATIVE, NATIVE] lung path length in this view
    ctr: float               # cardiothoracic ratio of the base
    spacing: float           # mm per output pixel at the detector
    extra: dict = field(default_factory=dict)


def apex_row(atlas: Atlas) -> float:
    rows = np.flatnonzero(atlas.slab_lung.sum(0).max(1) > 1.0)
    return float(rows[0]) if rows.size else NATIVE / 4


def cardiothoracic_ratio(t_heart: np.ndarray, t_lung: np.ndarray, thr: float = 3.0) -> float:
    """Widest horizontal extent of the heart over the widest inner thoracic (lung) extent."""
    def widest(mask):
        cols = np.flatnonzero(mask.any(0))
        return float(cols[-1] - cols[0] + 1) if cols.size else 0.0
    return widest(t_heart > thr) / max(widest(t_lung > thr), 1.0)


def make_base(atlas: Atlas, variant: Variant, view: str, size: int = 1024) -> Base:
    geom = view_geometry(atlas, variant, view)
    mats = variant.soft * atlas.slab_soft + variant.bone * atlas.slab_bone
    P_nat = compose(mats, geom)
    t_heart0 = compose(atlas.slab_heart, geom)
    t_lung = compose(atlas.slab_lung, geom)
    dh = heart_delta(t_heart0, variant.heart)
    P_nat += dh
    t_heart = np.maximum(t_heart0 + dh / MU_HEART_MINUS_LUNG, 0)
    coords = output_coords(variant, size, apex_row(atlas))
    P = ndimage.map_coordinates(P_nat, coords, order=3, mode="nearest").astype(np.float32)
    np.maximum(P, 0, out=P)
    I = np.exp(-P)
    small = ndimage.zoom(I, 1 / 16, order=1)
    scatter = SCATTER * ndimage.zoom(ndimage.gaussian_filter(small, 4), 16, order=1)[:size, :size]
    Id = detector_blur(I, size)
    total = Id + scatter
    L = enhance(-np.log(total), size).astype(np.float32)
    gain = (Id / total).astype(np.float32)
    # quantum noise: relative sigma of the counts -> sigma of L; half-resolution field, upsampled per image
    sigma = (0.006 / np.sqrt(variant.exposure * total[::2, ::2])).clip(0, 0.08).astype(np.float32)
    body = P > 0.5
    lo, hi = np.percentile(L[body], [2.0, 99.7]) if body.any() else (0.0, 1.0)
    spacing = PIX * float(np.interp(geom.y_ref, atlas.slab_y, geom.mag)) * (NATIVE / size) / (variant.scale * FIELD_ZOOM)
    return Base(variant=variant, view=view, size=size, geom=geom, coords=coords, P=P, L=L, gain=gain,
                sigma=sigma, window=(float(lo), float(hi)), t_heart=t_heart, t_lung=t_lung,
                ctr=cardiothoracic_ratio(t_heart, t_lung), spacing=spacing)


@dataclass
class Lesion:
    """A finding as a local 2-D delta of the line integral, `dp[a, b]`, with the affine that maps native view
    coordinates (row, col) to its local index: local = A @ native + t."""
    finding: str
    dp: np.ndarray
    A: np.ndarray
    t: np.ndarray
    box_from: np.ndarray | None = None   # optional footprint map (same grid as dp), e.g. the enlarged heart


def lesion_from_volume(atlas: Atlas, geom: ViewGeometry, finding: str, dmu: np.ndarray, origin) -> Lesion:
    """Project a half-res 3-D delta of mu (sum along y) and place it with the magnification and shift of its
    mean depth (a lesion is small against the source distance, so one depth is exact to ~1%)."""
    dy = atlas.spacing[1]
    dp = (dmu.sum(1) * dy).astype(np.float32)                # [i, k]
    w = np.abs(dmu).sum((0, 2))
    j_full = (origin[1] + np.arange(dmu.shape[1])) * 2 + 0.5
    y_all = (j_full - (atlas.shape_full[1] - 1) / 2) * dy / 2
    y = float((y_all * w).sum() / w.sum()) if w.sum() > 0 else 0.0
    m, s = geom.at(y, atlas)
    c = (NATIVE - 1) / 2
    # native view (row, col) -> native central -> half-res voxel (i, k) -> local (i - i0, k - k0)
    # central: col_c = 2 i + 0.5, row_c = TOP + (K - 1 - k) dz / PIX
    kz = atlas.spacing[2] / PIX
    K = atlas.shape_full[2]
    # col_c = c + (col - s1 - c) / m ; i = (col_c - 0.5) / 2 - i0
    # row_c = c + (row - s0 - c) / m ; k = K - 1 - (row_c - TOP) / kz - k0
    A = np.array([[0.0, 1 / (2 * m)], [-1 / (m * kz), 0.0]])
    t = np.array([(c - (s[1] + c) / m - 0.5) / 2 - origin[0],
                  K - 1 - (c - (s[0] + c) / m - TOP_PAD) / kz - origin[2]])
    return Lesion(finding=finding, dp=dp, A=A, t=t)


def lesion_from_native(finding: str, dp: np.ndarray, box_from: np.ndarray | None = None) -> Lesion:
    """A lesion given in the native view frame, cropped to where it (or its footprint map) is non-zero."""
    support = (dp != 0) if box_from is None else (dp != 0) | (box_from > 0)
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    r0, r1 = max(rows[0] - 2, 0), rows[-1] + 3
    c0, c1 = max(cols[0] - 2, 0), cols[-1] + 3
    crop = (slice(r0, r1), slice(c0, c1))
    return Lesion(finding=finding, dp=dp[crop].astype(np.float32), A=np.eye(2), t=-np.array([r0, c0], float),
                  box_from=None if box_from is None else box_from[crop].astype(np.float32))


def project_lesion(base: Base, lesion: Lesion):
    """Resample a lesion into the output frame -> (row slice, col slice, dP window, footprint window)."""
    ny, nx = lesion.dp.shape
    step = 8
    cs = base.coords[:, ::step, ::step]
    loc = np.tensordot(lesion.A, cs, axes=1) + lesion.t[:, None, None]
    inside = (loc[0] > -2) & (loc[0] < ny + 1) & (loc[1] > -2) & (loc[1] < nx + 1)
    if not inside.any():
        return None
    r, c = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    size = base.size
    rs = slice(max(r[0] * step - step, 0), min(r[-1] * step + 2 * step, size))
    cs_ = slice(max(c[0] * step - step, 0), min(c[-1] * step + 2 * step, size))
    win = base.coords[:, rs, cs_]
    loc = np.tensordot(lesion.A, win, axes=1) + lesion.t[:, None, None]
    dP = ndimage.map_coordinates(lesion.dp, loc, order=1, mode="constant", cval=0.0).astype(np.float32)
    fp = dP if lesion.box_from is None else ndimage.map_coordinates(lesion.box_from, loc, order=1, cval=0.0)
    return rs, cs_, dP, fp


def footprint_box(rs: slice, cs: slice, fp: np.ndarray, frac: float = FOOTPRINT):
    """Box (x, y, w, h) of the pixels where |fp| >= frac * max |fp|, in output pixels; None if empty."""
    a = np.abs(fp)
    mx = a.max() if a.size else 0.0
    if mx <= 0:
        return None
    m = a >= frac * mx
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return (float(cs.start + cols[0]), float(rs.start + rows[0]),
            float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def apply_lesion(base: Base, L: np.ndarray, rs: slice, cs: slice, dP: np.ndarray) -> None:
    """Add the linearized response of dP to the processed log image L (in place), with a processing margin."""
    size = base.size
    m = 3 * max(1, round(ENHANCE_RADIUS * size / 1024)) + 4
    r0, r1 = max(rs.start - m, 0), min(rs.stop + m, size)
    c0, c1 = max(cs.start - m, 0), min(cs.stop + m, size)
    pad = np.zeros((r1 - r0, c1 - c0), np.float32)
    pad[rs.start - r0: rs.stop - r0, cs.start - c0: cs.stop - c0] = dP
    dL = enhance(detector_blur(pad, size), size)
    L[r0:r1, c0:c1] += dL * base.gain[r0:r1, c0:c1]


def expose(base: Base, L: np.ndarray, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
    """Quantum noise, then the display window (with a mild per-image exposure and gamma jitter) -> uint8."""
    h = base.size // 2
    noise = rng.standard_normal((h, h), dtype=np.float32) * base.sigma
    L = L + np.repeat(np.repeat(noise, 2, 0), 2, 1)[: base.size, : base.size]
    lo, hi = base.window
    span = hi - lo
    lo = lo + span * float(rng.uniform(-0.03, 0.03))
    hi = hi + span * float(rng.uniform(-0.03, 0.03))
    gamma = float(rng.uniform(0.85, 1.15))
    lut = (255 * np.linspace(0, 1, 4096) ** gamma).round().astype(np.uint8)
    idx = np.clip((L - lo) * (4095 / (hi - lo)), 0, 4095).astype(np.int32)
    return lut[idx]
