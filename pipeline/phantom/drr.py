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

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.phantom.anatomy import MU_WATER, N_SLABS, NATIVE, PIX, TOP_PAD, Atlas

SID = {"PA": 1800.0, "AP": 1000.0}   # source-image distance, mm
AIR_GAP = 20.0                        # mm between skin and detector
MU_HEART_MINUS_LUNG = MU_WATER * (1.04 - 0.15)
DETECTOR_BLUR = 0.9                   # px at 1024
ENHANCE_GAIN, ENHANCE_RADIUS = 1.0, 10   # unsharp mask: L + g (L - box^3(L)), radius in px at 1024
SCATTER = 0.12
FIELD_ZOOM = 1.1                      # the output field covers NATIVE / FIELD_ZOOM native px...
FIELD_CENTER_ROW = 246.0              # ...centred here: neck to upper abdomen, like a chest radiograph
FOOTPRINT = 0.05                      # a finding's footprint: |dP| >= FOOTPRINT * max |dP|


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
    return Variant(scale=float(rng.uniform(0.97, 1.08)), rotation=float(rng.normal(0, 1.5)),
                   shift=(float(np.clip(rng.normal(0, 5), -8, 10)), float(rng.normal(0, 8))),
                   elastic=tuple(np.round(rng.normal(0, 3.0, 32), 4)),
                   inflation=float(rng.uniform(0.94, 1.07)), soft=float(rng.uniform(0.9, 1.12)),
                   bone=float(rng.uniform(0.8, 1.2)), heart=float(rng.uniform(0.86, 0.97)),
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


def heart_delta(t_heart: np.ndarray, scale: float, t_lung: np.ndarray) -> np.ndarray:
    """dP of scaling the heart by `scale` in 3-D (step 2); its path length grows by the same factor. The heart
    rests on the diaphragm, so it grows about its lowest point (up and sideways); it can only displace lung
    that is there (|dT| <= lung path), and a smaller heart gives its room back to lung."""
    if abs(scale - 1) < 1e-6:
        return np.zeros_like(t_heart)
    w = t_heart.sum()
    rows, cols = np.indices(t_heart.shape)
    heart_rows = np.flatnonzero((t_heart > 0.2 * t_heart.max()).any(1))
    c = np.array([float(heart_rows[-1]), (cols * t_heart).sum() / w])
    scaled = scale * ndimage.affine_transform(t_heart, np.full(2, 1 / scale), offset=c - c / scale, order=1)
    dt = np.clip(scaled - t_heart, -t_heart, t_lung)
    return (dt * MU_HEART_MINUS_LUNG).astype(np.float32)


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


def apex_row(atlas: Atlas) -> float:
    rows = np.flatnonzero(atlas.slab_lung.sum(0).max(1) > 1.0)
    return float(rows[0]) if rows.size else NATIVE / 4


def cardiothoracic_ratio(t_heart: np.ndarray, t_lung: np.ndarray, thr: float = 3.0) -> float:
    """Widest horizontal extent of the heart over the widest inner thoracic (lung) extent."""
    def widest(mask):
        cols = np.flatnonzero(mask.any(0))
        return float(cols[-1] - cols[0] + 1) if cols.size else 0.0
    return widest(t_heart > thr) / max(widest(t_lung > thr), 1.0)


def pixel_spacing(variant: Variant, size: int) -> float:
    """mm per output pixel in the mid-body plane (where the magnification is normalized to 1)."""
    return PIX * (NATIVE / size) / (variant.scale * FIELD_ZOOM)


def make_base(atlas: Atlas, variant: Variant, view: str, size: int = 1024) -> Base:
    geom = view_geometry(atlas, variant, view)
    mats = variant.soft * atlas.slab_soft + variant.bone * atlas.slab_bone
    P_nat = compose(mats, geom)
    t_heart0 = compose(atlas.slab_heart, geom)
    t_lung = compose(atlas.slab_lung, geom)
    dh = heart_delta(t_heart0, variant.heart, t_lung)
    P_nat += dh
    t_heart = np.maximum(t_heart0 + dh / MU_HEART_MINUS_LUNG, 0)
    coords = output_coords(variant, size, apex_row(atlas))
    P = ndimage.map_coordinates(P_nat, coords, order=3, mode="nearest").astype(np.float32)
    np.maximum(P, 0, out=P)
    I = np.exp(-P)
    body = P > 0.5
    small = ndimage.zoom(I * body, 1 / 16, order=1)    # scatter arises in the body, not in the open beam
    scatter = SCATTER * ndimage.zoom(ndimage.gaussian_filter(small, 4), 16, order=1)[:size, :size]
    Id = detector_blur(I, size)
    total = Id + scatter
    L = enhance(-np.log(total), size).astype(np.float32)
    gain = (Id / total).astype(np.float32)
    # quantum noise: relative sigma of the counts -> sigma of L; half-resolution field, upsampled per image
    sigma = (0.006 / np.sqrt(variant.exposure * total[::2, ::2])).clip(0, 0.08).astype(np.float32)
    lo, hi = np.percentile(L[body], [2.0, 99.7]) if body.any() else (0.0, 1.0)
    spacing = pixel_spacing(variant, size)
    return Base(variant=variant, view=view, size=size, geom=geom, coords=coords, P=P, L=L, gain=gain,
                sigma=sigma, window=(float(lo), float(hi)), t_heart=t_heart, t_lung=t_lung,
                ctr=cardiothoracic_ratio(t_heart, t_lung), spacing=spacing)


@dataclass
class Part:
    """A 2-D delta of the line integral `dp[r, c]` on a local grid aligned with the native view frame, with
    the diagonal map native (row, col) -> local (r, c) = a * (row, col) + t. `box_from`: optional footprint map
    on the same grid (e.g. the enlarged heart), used for the box instead of |dp|."""
    dp: np.ndarray
    a: np.ndarray
    t: np.ndarray
    box_from: np.ndarray | None = None

    def native_extent(self):
        lo = -self.t / self.a
        hi = (np.array(self.dp.shape) - 1 - self.t) / self.a
        return np.minimum(lo, hi), np.maximum(lo, hi)


@dataclass
class Lesion:
    """One finding instance: one part per atlas slab it occupies (each slab has its own magnification)."""
    finding: str
    parts: list

    def canvas(self):
        """Sum of the parts on one native-view grid -> (origin (row, col), dP map, footprint map or None)."""
        ext = [p.native_extent() for p in self.parts]
        lo = np.floor(np.min([e[0] for e in ext], 0)).astype(int) - 1
        hi = np.ceil(np.max([e[1] for e in ext], 0)).astype(int) + 2
        shape = tuple(hi - lo)
        dp = np.zeros(shape, np.float32)
        fp = None
        for p in self.parts:
            off = p.a * lo + p.t
            dp += ndimage.affine_transform(p.dp, p.a, offset=off, output_shape=shape, order=1, cval=0.0)
            if p.box_from is not None:
                fp = ndimage.affine_transform(p.box_from, p.a, offset=off, output_shape=shape, order=1, cval=0.0)
        return lo, dp, fp


def lesion_from_volume(atlas: Atlas, geom: ViewGeometry, finding: str, dmu: np.ndarray, origin,
                       step=(1, 1, 1)) -> Lesion:
    """Project a half-res 3-D delta of mu (sum along y) slab by slab of the atlas, each slab's piece placed with
    that slab's magnification and shift (cone-beam geometry at the cost of a few local sums).
    `step`: voxel stride of `dmu` along (i, j, k), for diffuse findings made on a coarser grid."""
    si, sj, sk = step
    dy = atlas.spacing[1] * sj
    c = (NATIVE - 1) / 2
    kz = atlas.spacing[2] / PIX
    K = atlas.shape_full[2]
    nk = dmu.shape[2]
    j_half = origin[1] + sj * np.arange(dmu.shape[1])
    slab = (j_half * 2 * N_SLABS) // atlas.shape_full[1]        # same slabs as the base radiograph
    parts = []
    for b in np.unique(slab):
        sel = np.flatnonzero(slab == b)
        chunk = dmu[:, sel[0]:sel[-1] + 1]
        if not chunk.any():
            continue
        # the slab's own magnification and shift, exactly as in the base: the lesion's delta is relative to
        # the CT voxels it replaces, so it must land where the base shows them
        m, s = float(geom.mag[b]), geom.shift[b]
        # native view (row, col) -> native central: row_c = c + (row - s0 - c) / m, col_c = c + (col - s1 - c) / m
        # -> half-res voxel: i = (col_c - 0.5) / 2, k = K - 1 - (row_c - TOP_PAD) / kz
        # -> local grid, rows running down (r = nk - 1 - (k - k0) / sk), columns c = (i - i0) / si
        t_k = (K - 1 - (c - (s[0] + c) / m - TOP_PAD) / kz - origin[2]) / sk
        t_i = ((c - (s[1] + c) / m - 0.5) / 2 - origin[0]) / si
        a = np.array([1 / (m * kz * sk), 1 / (2 * m * si)])
        t = np.array([nk - 1 - t_k, t_i]) + 1                     # +1: the zero border added below
        dp = (chunk.sum(1) * dy).T[::-1]                          # [i, k] -> [rows down, cols]
        # a zero border, so that interpolation fades the crop's edge to zero instead of dropping it
        parts.append(Part(dp=np.pad(dp.astype(np.float32), 1), a=a, t=t))
    return Lesion(finding=finding, parts=parts)


def lesion_from_native(finding: str, dp: np.ndarray, box_from: np.ndarray | None = None) -> Lesion:
    """A lesion given in the native view frame, cropped to where it (or its footprint map) is non-zero."""
    support = (dp != 0) if box_from is None else (dp != 0) | (box_from > 0)
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    r0, r1 = max(rows[0] - 2, 0), rows[-1] + 3
    c0, c1 = max(cols[0] - 2, 0), cols[-1] + 3
    crop = (slice(r0, r1), slice(c0, c1))
    part = Part(dp=dp[crop].astype(np.float32), a=np.ones(2), t=-np.array([r0, c0], float),
                box_from=None if box_from is None else box_from[crop].astype(np.float32))
    return Lesion(finding=finding, parts=[part])


def project_lesion(base: Base, lesion: Lesion):
    """Resample a lesion into the output frame -> (row slice, col slice, dP window, footprint window)."""
    if not lesion.parts:
        return None
    lo, canvas, fcanvas = lesion.canvas()
    hi = lo + np.array(canvas.shape)
    step, size = 8, base.size
    coarse = base.coords[:, ::step, ::step]
    inside = ((coarse[0] > lo[0] - 2) & (coarse[0] < hi[0] + 1) & (coarse[1] > lo[1] - 2) & (coarse[1] < hi[1] + 1))
    if not inside.any():
        return None
    r, c = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    rs = slice(max(r[0] * step - step, 0), min(r[-1] * step + 2 * step, size))
    cs = slice(max(c[0] * step - step, 0), min(c[-1] * step + 2 * step, size))
    loc = base.coords[:, rs, cs] - lo[:, None, None].astype(np.float32)
    dP = ndimage.map_coordinates(canvas, loc, order=1, mode="constant", cval=0.0)
    fp = dP if fcanvas is None else ndimage.map_coordinates(fcanvas, loc, order=1, mode="constant", cval=0.0)
    return rs, cs, dP, fp


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
    noise = rng.standard_normal((h, h), dtype=np.float32)
    noise *= base.sigma
    # half-resolution noise on 2x2 pixels (detector correlation), added in one broadcast pass
    L = (L.reshape(h, 2, h, 2) + noise[:, None, :, None]).reshape(base.size, base.size)
    lo, hi = base.window
    span = hi - lo
    lo = lo + span * float(rng.uniform(-0.03, 0.03))
    hi = hi + span * float(rng.uniform(-0.03, 0.03))
    gamma = float(rng.uniform(0.85, 1.15))
    lut = (255 * np.linspace(0, 1, 4096) ** gamma).round().astype(np.uint8)
    L -= lo
    L *= 4095 / (hi - lo)
    np.clip(L, 0, 4095, out=L)
    return np.take(lut, L.astype(np.int16))


def project_volume_reference(atlas: Atlas, base: Base, dmu: np.ndarray, origin) -> np.ndarray:
    """Slow, obviously correct twin of `lesion_from_volume` + `project_lesion`: put the lesion into a whole
    half-res volume, cut it into the atlas's slabs, and send it down the same path as the base radiograph
    (per-slab magnification and shift, then the variant warp). Returns dP over the whole output frame."""
    from pipeline.phantom.anatomy import _to_native
    vol = np.zeros(atlas.hu.shape, np.float32)
    sl = tuple(slice(o, o + n) for o, n in zip(origin, dmu.shape))
    vol[sl] = dmu
    nj = vol.shape[1]
    edges = np.linspace(0, nj, N_SLABS + 1).round().astype(int)
    slabs = np.stack([vol[:, a:b].sum(1) * atlas.spacing[1] for a, b in zip(edges[:-1], edges[1:])])
    full_x = np.repeat(slabs, 2, axis=1)                         # half-res i -> full-res columns
    native = compose(_to_native(full_x, atlas.spacing[2]), base.geom)
    return ndimage.map_coordinates(native, base.coords, order=1, mode="constant", cval=0.0)
