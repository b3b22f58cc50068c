"""The 14 findings, each inserted in 3-D at an anatomically valid place of the atlas (half-resolution CT).

Every model returns a local change of attenuation `dmu` (1/mm) on a crop of the volume; `drr` projects it
with the view geometry of the image (or, for Cardiomegaly, a change of the projected heart). Densities are
set by replacing the CT's own voxels with a target HU, so a lesion hides the vessels it covers (nodules,
consolidation) or removes them (pneumothorax, emphysema), as on real films.

`difficulty` in [0, 1]: 0 = clearly visible (default), 1 = subtle. It scales the density change by
(1.4 - 0.9 d): at 0 lesions are 1.4x denser than their physical model, which makes them learnable by a small
CNN at 256 px; at 1 they are half as dense, near the edge of what a reader sees. It scales the size of focal
findings by (1 - 0.35 d).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.phantom.anatomy import LOBES, MU_WATER, Atlas
from pipeline.phantom.drr import (MU_HEART_MINUS_LUNG, Base, Lesion, cardiothoracic_ratio, heart_delta,
                                  lesion_from_native, lesion_from_volume)


def mu(hu):
    return MU_WATER * (1 + np.asarray(hu, np.float32) / 1000)


@dataclass
class Lungs:
    """Per-process geometry of the lungs at half resolution (cached)."""
    lung: np.ndarray          # bool, union of the lobes
    dist: np.ndarray          # mm to the nearest non-lung voxel (0 outside)
    lobe_ids: dict            # short lobe name -> label id
    side: dict                # "L"/"R" -> bool mask
    bbox: dict                # "L"/"R"/"both" -> (lo, hi) voxel corners
    hilum: dict               # "L"/"R" -> voxel (i, j, k)
    voxels: dict              # lobe -> flat indices of its voxels (for sampling)
    proj: np.ndarray          # [I, K] lung path length (mm) along y: > ~60 mm means "over the lung field"


@functools.lru_cache(maxsize=1)
def lungs(atlas: Atlas) -> Lungs:
    lobe_ids = {short: atlas.ids[name] for name, short in LOBES.items()}
    lut = np.zeros(256, bool)
    lut[list(lobe_ids.values())] = True
    lung = lut[atlas.labels]
    lo, hi = _bbox(lung)
    lo, hi = np.maximum(lo - 2, 0), np.minimum(hi + 2, lung.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = np.zeros(lung.shape, np.float32)
    dist[sl] = ndimage.distance_transform_edt(lung[sl], sampling=atlas.spacing)
    side = {"L": np.isin(atlas.labels, [lobe_ids["LUL"], lobe_ids["LLL"]]),
            "R": np.isin(atlas.labels, [lobe_ids["RUL"], lobe_ids["RML"], lobe_ids["RLL"]])}
    bbox = {"both": (lo, hi)}
    hilum = {}
    for s, m in side.items():
        a, b = _bbox(m)
        bbox[s] = (a, b)
        medial = b[0] - 1 if s == "R" else a[0]        # i grows toward the patient's left
        sgn = -1 if s == "R" else 1
        hilum[s] = np.array([medial + sgn * 12, (a[1] + b[1]) / 2, a[2] + 0.55 * (b[2] - a[2])])
    voxels = {k: np.flatnonzero(atlas.labels.ravel() == v) for k, v in lobe_ids.items()}
    # "over the lung field": much lung and little other tissue on the ray (not behind the dome or the heart)
    tissue = (atlas.hu > -500).sum(1, dtype=np.float32) * atlas.spacing[1]
    proj = np.where(tissue < 115, lung.sum(1, dtype=np.float32) * atlas.spacing[1], 0)
    return Lungs(lung=lung, dist=dist, lobe_ids=lobe_ids, side=side, bbox=bbox, hilum=hilum, voxels=voxels,
                 proj=proj)


def _bbox(mask):
    idx = np.argwhere(mask)
    return idx.min(0), idx.max(0) + 1


def _crop(atlas: Atlas, center, radius_mm):
    """Crop around a voxel centre: slices, origin, and mm offsets (broadcastable ogrid) from the centre."""
    r = np.ceil(np.asarray(radius_mm, float) / np.asarray(atlas.spacing)).astype(int) + 1
    c = np.asarray(center, float)
    lo = np.maximum(np.floor(c - r).astype(int), 0)
    hi = np.minimum(np.ceil(c + r).astype(int) + 1, atlas.hu.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[sl]
    off = [((g - ci) * sp).astype(np.float32) for g, ci, sp in zip(grids, c, atlas.spacing)]
    return sl, lo, off


def _smooth_noise(rng, shape, sigma_vox):
    """Unit-variance band-limited noise, made at a lower resolution when the correlation length is long."""
    f = max(1, int(min(sigma_vox) // 2))
    small = [max(2, -(-n // f)) for n in shape]
    x = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), [s / f for s in sigma_vox])
    if f > 1:
        x = ndimage.zoom(x, [n / m for n, m in zip(shape, small)], order=1)[tuple(slice(0, n) for n in shape)]
    return (x - x.mean()) / (x.std() + 1e-6)


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.clip(x, -30, 30)))


def _replace(atlas, sl, w, target_hu, contrast):
    """dmu that moves the crop's voxels toward `target_hu` with weight w in [0, 1]."""
    cur = mu(atlas.hu[sl])
    return (contrast * w * (mu(target_hu) - cur)).astype(np.float32)


def _pick(rng, lg: Lungs, lobes, min_dist_mm: float, atlas: Atlas, min_proj_mm: float = 70.0):
    """A voxel inside one of `lobes` (chosen by volume) at least `min_dist_mm` inside the lung and projecting
    over the lung field (not behind the diaphragm dome or the heart), relaxing both if need be."""
    sizes = np.array([lg.voxels[l].size for l in lobes], float)
    lobe = lobes[rng.choice(len(lobes), p=sizes / sizes.sum())]
    vox = lg.voxels[lobe]
    i, _, k = np.unravel_index(vox, atlas.hu.shape)
    over = lg.proj[i, k]
    for need, proj in ((min_dist_mm, min_proj_mm), (min_dist_mm / 2, min_proj_mm / 2), (0.0, 0.0)):
        cand = vox[(lg.dist.ravel()[vox] >= need) & (over >= proj)]
        if cand.size:
            break
    return lobe, np.array(np.unravel_index(cand[rng.integers(cand.size)], atlas.hu.shape), float)


def _blob(rng, atlas, lg, center, diameter, lobulation, hu, contrast, edge_mm=1.5):
    """A lobulated soft-tissue sphere inside the lung (nodule, mass)."""
    R = diameter / 2
    sl, lo, (x, y, z) = _crop(atlas, center, [R * 1.4 + 3] * 3)
    r = np.sqrt(x * x + y * y + z * z)
    shape = r.shape
    bumps = _smooth_noise(rng, shape, [max(1.0, R / 3 / s) for s in atlas.spacing])
    w = _sigmoid((R * (1 + lobulation * bumps) - r) / edge_mm)
    w *= np.clip(lg.dist[sl] / 2 + 0.3, 0, 1)       # stays in the lung (pleura-based lesions flatten)
    return _replace(atlas, sl, w, hu, contrast), lo


def nodule(rng, atlas, lg, base, k):
    d = max(5.0, rng.uniform(10, 22) * k.size)
    _, c = _pick(rng, lg, list(lg.voxels), d / 2, atlas)
    hu = 350 if rng.random() < 0.1 else 40            # a tenth are calcified granulomas
    return _blob(rng, atlas, lg, c, d, 0.06, hu, k.contrast)


def mass(rng, atlas, lg, base, k):
    d = max(30.5, rng.uniform(31, 42) * k.size)
    _, c = _pick(rng, lg, list(lg.voxels), d / 3, atlas)
    return _blob(rng, atlas, lg, c, d, 0.1, 45, k.contrast, edge_mm=2.0)


def _side(rng):
    return "R" if rng.random() < 0.5 else "L"


def effusion(rng, atlas, lg, base, k):
    """Dependent pleural fluid: fills the hemithorax from its lowest point up to a surface that climbs the
    lateral and posterior chest wall (the meniscus), so the costophrenic angle is blunted first."""
    s = _side(rng)
    (a, b) = lg.bbox[s]
    height = (b[2] - a[2]) * atlas.spacing[2]
    h = rng.uniform(0.32, 0.55) * height * (0.5 + 0.5 * k.size)   # small ones hide behind the dome
    sl = tuple(slice(int(p), int(q)) for p, q in zip(a, b))
    i, j, kk = np.ogrid[sl]
    sp = atlas.spacing
    lateral = ((i - a[0]) / max(b[0] - a[0] - 1, 1)) if s == "L" else ((b[0] - 1 - i) / max(b[0] - a[0] - 1, 1))
    posterior = (b[1] - 1 - j) / max(b[1] - a[1] - 1, 1)
    rho = np.clip(0.9 * lateral ** 2 + 0.25 * posterior ** 2, 0, 1.2)
    zmm = (kk - a[2]) * sp[2]
    level = h * (0.1 + rho)
    w = _sigmoid((level - zmm) / 3.0) * lg.side[s][sl] * _sigmoid((lateral - 0.6) * 12)
    return _replace(atlas, sl, w, 15, k.contrast), np.array(a)


def pneumothorax(rng, atlas, lg, base, k):
    """Apical/lateral rim of air without lung markings, bounded by the visceral pleural line."""
    s = _side(rng)
    (a, b) = lg.bbox[s]
    top = b[2]
    extent = rng.uniform(45, 80) * k.size / atlas.spacing[2]
    rim = rng.uniform(9, 20) * k.size
    k0 = int(max(a[2], top - extent))
    sl = (slice(int(a[0]), int(b[0])), slice(int(a[1]), int(b[1])), slice(k0, int(top)))
    i = np.ogrid[sl][0]
    lateral = ((i - a[0]) / (b[0] - a[0])) if s == "L" else ((b[0] - 1 - i) / (b[0] - a[0]))
    kk = np.ogrid[sl][2]
    apical = (kk - k0) / max(top - k0, 1)                 # 0 at the lower end, 1 at the apex
    # widest laterally and near the apex, tapering to nothing at the lower end (no cut edge)
    reach = rim * np.clip(-0.8 + 2.0 * lateral + 0.4 * apical, 0, 1.6) * np.clip(apical * 3, 0, 1)
    d = lg.dist[sl]
    inside = lg.side[s][sl]
    air = inside & (d <= reach)
    line = inside & (d > reach) & (d <= reach + 2.0) & (reach > 2.0)   # the collapsed lung's edge
    dmu = np.where(air, -mu(atlas.hu[sl]), 0).astype(np.float32) * k.contrast
    dmu += line * (mu(40) - mu(atlas.hu[sl])) * 0.8 * k.contrast
    return dmu.astype(np.float32), np.array([sl[0].start, sl[1].start, k0])


def atelectasis(rng, atlas, lg, base, k):
    """Segmental/plate-like collapse near a base (airless band plus an elevated hemidiaphragm), or lobar
    collapse: the lobe shrunk toward its hilum and airless, the rest of the lobe hyperexpanded."""
    if rng.random() < 0.2:
        lobe = ["RUL", "LUL", "RML", "LLL", "RLL"][rng.integers(5)]
        m = atlas.labels == lg.lobe_ids[lobe]
        a, b = _bbox(m)
        sl = tuple(slice(int(p), int(q)) for p, q in zip(a, b))
        hil = lg.hilum["L" if lobe[0] == "L" else "R"]
        f = rng.uniform(0.4, 0.55) * k.size ** 0.5
        grid = np.meshgrid(*[np.arange(s_.start, s_.stop) for s_ in sl], indexing="ij")
        src = [hil[d] + (grid[d] - hil[d]) / f for d in range(3)]
        inside = ndimage.map_coordinates(m.astype(np.float32), src, order=1, cval=0) > 0.5
        w = ndimage.gaussian_filter(inside.astype(np.float32), 1.0) * m[sl]
        return _replace(atlas, sl, w, 20, k.contrast), np.array(a)
    s = _side(rng)
    lobe = "LLL" if s == "L" else ["RLL", "RML"][int(rng.random() < 0.25)]
    _, c = _pick(rng, lg, [lobe], 12, atlas)
    (a, b) = lg.bbox[s]
    c[2] = min(c[2], a[2] + (b[2] - a[2]) * 0.35)                  # lower zone
    ax = [rng.uniform(18, 32) * k.size, rng.uniform(20, 35) * k.size, rng.uniform(3, 6) * k.size]
    tilt = np.radians(rng.normal(0, 8))
    sl, lo, (x, y, z) = _crop(atlas, c, [max(ax) + 4] * 3)
    xr = x * np.cos(tilt) + z * np.sin(tilt)
    zr = -x * np.sin(tilt) + z * np.cos(tilt)
    q = (xr / ax[0]) ** 2 + (y / ax[1]) ** 2 + (zr / ax[2]) ** 2
    w = _sigmoid((1 - q) * 4) * lg.side[s][sl]
    # volume loss: the diaphragm rises under the collapsed segment (its lowest lung voxels become tissue)
    rise = rng.uniform(3, 7) / atlas.spacing[2]
    base_k = np.argmax(lg.side[s][sl], axis=2)[..., None]
    kk = np.arange(w.shape[2])[None, None, :]
    near = (base_k - (c[2] - lo[2])) * atlas.spacing[2] > -30            # the base lies just below the band
    under = (((kk - base_k) < rise) & near & lg.side[s][sl]
             & ((x / (ax[0] * 1.2)) ** 2 + (y / (ax[1] * 0.5)) ** 2 < 1))
    w = np.maximum(w, under)
    return _replace(atlas, sl, w, 20, k.contrast), lo


def _consolidation(rng, atlas, lg, k, semi, bronchograms: int, texture: float, hu=25):
    lobes = ["RLL", "LLL", "RML", "RUL", "LUL"]
    p = np.array([0.3, 0.25, 0.15, 0.15, 0.15])
    lobe = lobes[rng.choice(5, p=p)]
    _, c = _pick(rng, lg, [lobe], 10, atlas)
    ax = np.array(semi, float) * k.size
    sl, lo, (x, y, z) = _crop(atlas, c, ax + 6)
    q = np.sqrt((x / ax[0]) ** 2 + (y / ax[1]) ** 2 + (z / ax[2]) ** 2)
    shape = q.shape
    n = _smooth_noise(rng, shape, [4 / s for s in atlas.spacing])
    # lobar: the fissures (lobe boundary) cut it sharply; elsewhere the margin is irregular
    w = _sigmoid((1 + 0.15 * n - q) * 6) * (atlas.labels[sl] == lg.lobe_ids[lobe])
    w *= 1 - texture * _sigmoid(n * 2)
    dmu = _replace(atlas, sl, w, hu, k.contrast)
    if bronchograms:
        tubes = np.zeros(shape, bool)
        hil = lg.hilum["L" if lobe[0] == "L" else "R"] - lo
        cen = np.array(c) - lo
        for _ in range(bronchograms):
            p0 = cen + (hil - cen) * 0.4 + rng.normal(0, 3, 3)
            d = (cen - hil) / (np.linalg.norm(cen - hil) + 1e-6) + rng.normal(0, 0.5, 3)
            for step in range(60):
                d = d / (np.linalg.norm(d) + 1e-6) + rng.normal(0, 0.15, 3)
                p0 = p0 + d / np.linalg.norm(d) * 1.0
                idx = np.round(p0).astype(int)
                if np.any(idx < 1) or np.any(idx >= np.array(shape) - 1):
                    break
                tubes[idx[0] - 1: idx[0] + 1, idx[1] - 1: idx[1] + 1, idx[2]] = True
        air = tubes & (w > 0.5)
        dmu[air] = (k.contrast * (0.0 - mu(atlas.hu[sl]))[air]).astype(np.float32)
    return dmu, lo


def pneumonia(rng, atlas, lg, base, k):
    """Lobar consolidation (bounded by the fissures) with air bronchograms."""
    return _consolidation(rng, atlas, lg, k, [rng.uniform(32, 45), rng.uniform(35, 55), rng.uniform(38, 52)],
                          bronchograms=int(rng.integers(5, 9)), texture=0.1)


def consolidation(rng, atlas, lg, base, k):
    """Segmental airspace consolidation, homogeneous, few bronchograms."""
    return _consolidation(rng, atlas, lg, k, [rng.uniform(22, 36), rng.uniform(25, 40), rng.uniform(25, 40)],
                          bronchograms=int(rng.integers(0, 3)), texture=0.05, hu=30)


def infiltration(rng, atlas, lg, base, k):
    """Patchy, ill-defined ground-glass and reticulonodular texture over a region of one lung."""
    _, c = _pick(rng, lg, list(lg.voxels), 15, atlas)
    ax = np.array([rng.uniform(27, 38), rng.uniform(30, 45), rng.uniform(28, 40)]) * k.size
    sl, lo, (x, y, z) = _crop(atlas, c, ax * 1.3)
    q = (x / ax[0]) ** 2 + (y / ax[1]) ** 2 + (z / ax[2]) ** 2
    n = _smooth_noise(rng, q.shape, [3 / s for s in atlas.spacing])
    w = np.exp(-1.5 * q) * _sigmoid(2.5 * n + 0.5) * (lg.dist[sl] > 0)
    return _replace(atlas, sl, w * 0.8, -150, k.contrast), lo


COARSE = (2, 2, 1)   # diffuse bilateral findings are made on a 2.8 x 2.8 x 2.5 mm grid: 4x fewer voxels


def _coarse(lo, hi):
    return tuple(slice(int(p), int(q), st) for p, q, st in zip(lo, hi, COARSE))


def edema(rng, atlas, lg, base, k):
    """Bilateral perihilar ("bat wing") airspace and interstitial haze, fading to the periphery."""
    a, b = lg.bbox["both"]
    sl = _coarse(a, b)
    grid = np.ogrid[sl]
    w = np.zeros(lg.lung[sl].shape, np.float32)
    sig = rng.uniform(35, 55) * k.size
    for s in "LR":
        h = lg.hilum[s]
        d2 = sum(((g - hc) * sp) ** 2 for g, hc, sp in zip(grid, h, atlas.spacing))
        w = np.maximum(w, np.exp(-d2 / (2 * sig ** 2)))
    n = _smooth_noise(rng, w.shape, [5 / (s * c) for s, c in zip(atlas.spacing, COARSE)])
    w *= (0.75 + 0.25 * np.tanh(n)) * lg.lung[sl]
    return _replace(atlas, sl, w * 0.9, -120, k.contrast), np.array(a), COARSE


def emphysema(rng, atlas, lg, base, k):
    """Hyperlucent, hyperinflated lungs: sparse markings, upper-zone bullae, lowered flat diaphragm."""
    a, b = lg.bbox["both"]
    lo = a.copy()
    hi = b.copy()
    lo[2] = max(a[2] - 6, 0)
    sl = _coarse(lo, hi)
    lung = lg.lung[sl]
    cur = mu(atlas.hu[sl])
    frac = rng.uniform(0.35, 0.6) * k.contrast
    kk = np.ogrid[sl][2]
    upper = np.clip((kk - a[2]) / (b[2] - a[2]), 0, 1)
    dmu = -(frac * (0.6 + 0.6 * upper)).clip(0, 0.95) * cur * lung
    # flattened, lowered diaphragm: the dome's top few centimetres become lung
    down = int(rng.uniform(8, 16) / atlas.spacing[2])
    below = np.zeros_like(lung)
    for s_ in range(1, down + 1):
        below[:, :, :-s_] |= lung[:, :, s_:]
    dome = below & ~lung & (atlas.labels[sl] != atlas.ids["heart"]) & (atlas.hu[sl] > -300)
    dmu = np.where(dome, mu(-880) - cur, dmu)
    for _ in range(int(rng.integers(1, 4))):                     # bullae: thin-walled air spaces
        _, c = _pick(rng, lg, ["RUL", "LUL"], 12, atlas)
        R = rng.uniform(10, 22)
        i, j, kz = [g - cc for g, cc in zip(np.ogrid[sl], c)]
        r = np.sqrt((i * atlas.spacing[0]) ** 2 + (j * atlas.spacing[1]) ** 2 + (kz * atlas.spacing[2]) ** 2)
        dmu = np.where((r < R) & lung, -cur * k.contrast, dmu)
    return dmu.astype(np.float32), lo, COARSE


def fibrosis(rng, atlas, lg, base, k):
    """Peripheral, basal-predominant reticulation: a network of thin dense septa (noise zero-crossings)."""
    a, b = lg.bbox["both"]
    sl = _coarse(a, b)
    kk = np.ogrid[sl][2]
    lower = np.clip(1.2 - (kk - a[2]) / (b[2] - a[2]) * 1.4, 0, 1)
    periph = np.exp(-lg.dist[sl] / (rng.uniform(14, 24) * k.size)) * lg.lung[sl]
    n = _smooth_noise(rng, periph.shape, [3.0 / (s * c) for s, c in zip(atlas.spacing, COARSE)])
    net = np.exp(-(n / 0.35) ** 2)
    w = periph * lower * (0.2 + 0.8 * net)
    return _replace(atlas, sl, w, 20, k.contrast), np.array(a), COARSE


def pleural_thickening(rng, atlas, lg, base, k):
    """Smooth soft-tissue band along the chest wall: an apical cap or a lateral segment."""
    s = _side(rng)
    a, b = lg.bbox[s]
    t = rng.uniform(3, 8) * max(k.size, 0.6)
    if rng.random() < 0.5:
        k0, k1 = int(b[2] - rng.uniform(30, 50) / atlas.spacing[2]), int(b[2])
    else:
        zc = a[2] + rng.uniform(0.3, 0.7) * (b[2] - a[2])
        half = rng.uniform(25, 45) / atlas.spacing[2]
        k0, k1 = int(zc - half), int(zc + half)
    sl = (slice(int(a[0]), int(b[0])), slice(int(a[1]), int(b[1])), slice(max(k0, 0), k1))
    i = np.ogrid[sl][0]
    lateral = ((i - a[0]) / (b[0] - a[0])) if s == "L" else ((b[0] - 1 - i) / (b[0] - a[0]))
    d = lg.dist[sl]
    w = (lg.side[s][sl] & (d <= t)) * _sigmoid((lateral - 0.55) * 30)
    return _replace(atlas, sl, w, 35, k.contrast), np.array([sl[0].start, sl[1].start, sl[2].start])


def hernia(rng, atlas, lg, base, k):
    """Hiatal hernia: a retrocardiac round mass above the diaphragm with an air-fluid level."""
    eso = np.argwhere(atlas.labels == atlas.ids["esophagus"])
    low = eso[eso[:, 2] <= np.percentile(eso[:, 2], 8)].mean(0)
    c = low + np.array([6 / atlas.spacing[0], 0, rng.uniform(18, 30) / atlas.spacing[2]])
    ax = np.array([rng.uniform(25, 38), rng.uniform(22, 32), rng.uniform(22, 30)]) * k.size
    sl, lo, (x, y, z) = _crop(atlas, c, ax + 4)
    q = (x / ax[0]) ** 2 + (y / ax[1]) ** 2 + (z / ax[2]) ** 2
    w = _sigmoid((1 - q) * 8)
    level = rng.uniform(-0.2, 0.4) * ax[2]
    target = np.where(z > level, -1000.0, 20.0)                  # air above the horizontal fluid level
    shell = w * (1 - _sigmoid((0.8 - q) * 12))                   # the hernia's wall
    dmu = k.contrast * (w * (mu(target) - mu(atlas.hu[sl])) + shell * (mu(40) - mu(target)))
    return dmu.astype(np.float32), lo


def cardiomegaly(rng, atlas, lg, base: Base, k):
    """Enlarged heart: scaled in 3-D until the cardiothoracic ratio is over 0.5 (0.53-0.68)."""
    target = 0.5 + rng.uniform(0.03, 0.18) * min(1.0, k.contrast)
    s = 1.0
    for _ in range(4):   # CTR grows ~ linearly with the scale; a few fixed-point steps reach the target
        t = np.maximum(base.t_heart + heart_delta(base.t_heart, s, base.t_lung) / MU_HEART_MINUS_LUNG, 0)
        s *= target / max(cardiothoracic_ratio(t, base.t_lung), 1e-3)
    dp = heart_delta(base.t_heart, s, base.t_lung)
    enlarged = np.maximum(base.t_heart + dp / MU_HEART_MINUS_LUNG, 0)
    return lesion_from_native("Cardiomegaly", dp, box_from=enlarged)


MODELS = {
    "Atelectasis": atelectasis, "Cardiomegaly": cardiomegaly, "Effusion": effusion,
    "Infiltration": infiltration, "Mass": mass, "Nodule": nodule, "Pneumonia": pneumonia,
    "Pneumothorax": pneumothorax, "Consolidation": consolidation, "Edema": edema, "Emphysema": emphysema,
    "Fibrosis": fibrosis, "Pleural_Thickening": pleural_thickening, "Hernia": hernia,
}


@dataclass(frozen=True)
class Knob:
    contrast: float
    size: float


def knob(difficulty: float) -> Knob:
    d = float(np.clip(difficulty, 0, 1))
    return Knob(contrast=1.4 - 0.9 * d, size=1 - 0.35 * d)


def make_lesion(finding: str, rng: np.random.Generator, atlas: Atlas, base: Base, difficulty: float) -> Lesion:
    """One instance of `finding` for the image whose base is `base`."""
    k = knob(difficulty)
    out = MODELS[finding](rng, atlas, lungs(atlas), base, k)
    if isinstance(out, Lesion):
        return out
    return lesion_from_volume(atlas, base.geom, finding, *out)
