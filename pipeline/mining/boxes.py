"""Boxes from fused heatmaps (Cai et al. 2018, sec. 3.2), batched torch on the model's device.

Our reading of "3 bboxs generated from each H_f by adjusting the intensity threshold":
- H_f is bilinearly upsampled to the image frame (``align_corners=False``: cell i of the CAM grid covers
  [i, i+1), as in ``pipeline.base.coords``);
- at each threshold τ, the box is the bounding box of the 8-connected component of ``H_f >= τ`` that holds
  H_f's maximum (a bilinear surface peaks at a grid node: the first maximal one). That maximum is 1 (eq. 8),
  so τ is absolute and relative at once;
- a box equal to one from an earlier threshold (config order) is a duplicate and collapses, so fewer than 3
  boxes can come out (Fig. 2a);
- boxes are ranked by the mean of H_f inside the box, which is also their ``score``.

The fast path never builds the full-size map. It works on the CAM grid itself, because the upsampled map is the
bilinear surface through the grid's nodes sampled at the frame's pixel centres:
- components: two nodes >= τ that are 4-neighbours are joined by the straight edge between them; a bilinear
  patch has no interior maximum, so every piece of ``{H_f >= τ}`` holds a node, and this node graph has the
  surface's components. Two diagonal nodes >= τ whose cell's other corners are < τ meet only near the cell's
  saddle point; on the pixel grid (8-connectivity) they are joined iff the two pixels straddling the saddle
  on their diagonal are >= τ, which is what we test (``surface_component``). Connected-component labelling
  (``models.erasure.connected_component`` with these conditional diagonals) finds the maximum's component;
- edges: for a fixed column, a bilinear patch is linear along y, so over the pixel rows between two node rows
  a piece's leftmost point lies on the first or the last of them (likewise for the other edges); along such a
  row the surface is linear between node columns, so the edge is the interpolated crossing of τ just outside
  the component, and the edge pixel is the first frame pixel whose centre lies past it;
- the score, the mean of H_f over the box's frame pixels, is exact, from separable sums of bilinear weights.
So the fast boxes are those of the full-size map, save where the component hangs on a neck thinner than a
pixel elsewhere than at a saddle (nodes within ~1e-2 of τ: the pixel grid and the surface then disagree on
connectivity; a threshold change that small flips the reference too) and float32 rounding at a pixel centre.
Measured: 0-0.5% of boxes on random and phantom-like maps, each inside the reference's τ ± 0.01 bracket.
``pipeline.mining.reference.boxes_reference`` does it the obvious way on the full-size map; tests hold the two
within 1 pixel of each other on random and phantom-like maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.erasure import argmax_seed, connected_component


@dataclass
class Boxes:
    """Per map n and rank k (best first): `xywh` `[N,K,4]` frame pixels, `score`, `threshold` `[N,K]`,
    `valid` `[N,K]` (False past the last box of a map)."""
    xywh: torch.Tensor
    score: torch.Tensor
    threshold: torch.Tensor
    valid: torch.Tensor


def _pixel_lines(component: torch.Tensor, nodes: torch.Tensor, tau: torch.Tensor, length: torch.Tensor):
    """The frame pixel rows on which a box's left and right edges can lie, and which of their nodes are in it.

    Between node rows r and r+1 the surface is linear along y at every x, so over the pixel rows sampled there
    the x-extremes sit on the first and the last of them; above node row 0 and below the last one the surface is
    flat in y (edge clamping), equal to those node rows. A point on such a row at node column j is in the
    component iff it is >= τ and node (r, j) or (r+1, j) is in it (the vertical segment between them joins it).
    Returns values and membership, `[..., 2h, w]`; `length` `[N]` is the frame's height in pixels.
    """
    h = nodes.shape[-2]
    scale = (length / h)[:, None, None, None]                               # pixels per grid cell, [N,1,1,1]
    r = torch.arange(h - 1, device=nodes.device, dtype=torch.float32)[:, None]
    first = torch.ceil((r + 0.5) * scale - 0.5)                             # first pixel centre >= node row r
    last = torch.ceil((r + 1.5) * scale - 0.5) - 1                          # last pixel centre < node row r+1
    lam = torch.cat([(first + 0.5) / scale - 0.5 - r, (last + 0.5) / scale - 0.5 - r], -2)  # [N,1,2h-2,1]
    top, bottom = nodes[..., :-1, :].repeat(1, 1, 2, 1), nodes[..., 1:, :].repeat(1, 1, 2, 1)
    values = (1 - lam) * top + lam * bottom
    member = (values >= tau) & (component[..., :-1, :] | component[..., 1:, :]).repeat(1, 1, 2, 1)
    ends = [0, h - 1]
    return torch.cat([values, nodes[..., ends, :]], -2), torch.cat([member, component[..., ends, :]], -2)


def _edges(component: torch.Tensor, nodes: torch.Tensor, tau: torch.Tensor, across: torch.Tensor):
    """Sub-cell first and last crossing of τ along the last axis, in node units, over the pixel lines that
    can hold them (`_pixel_lines`, `across` = the frame's length along the other axis).

    Along a line the surface is linear between nodes, so the crossing just outside the component's first
    (last) node is interpolated. -inf / +inf where the component touches the border (the frame edge is the edge).
    """
    values, member = _pixel_lines(component, nodes, tau, across)
    n = member.shape[-1]
    rows = member.any(-1)
    first = member.to(torch.uint8).argmax(-1, keepdim=True)                # first True along the line
    last = n - 1 - member.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)

    def crossing(idx, step):
        inside = values.gather(-1, idx)
        outside = values.gather(-1, (idx + step).clamp(0, n - 1))
        # inside >= τ > outside (an outside neighbour >= τ would be joined to the component), so frac is in [0, 1).
        frac = (inside - tau) / (inside - outside).clamp_min(1e-12)
        at_border = (idx + step < 0) | (idx + step > n - 1)
        return torch.where(at_border, float("inf") * step, idx + step * frac).squeeze(-1)

    lo = crossing(first, -1).masked_fill(~rows, float("inf")).amin(-1)
    hi = crossing(last, 1).masked_fill(~rows, float("-inf")).amax(-1)
    return lo, hi


def _pixel_range(lo, hi, cells: int, length: torch.Tensor):
    """Crossings in node units (node i is the centre of grid cell i, at i + 0.5 in `pipeline.base.coords`'s cells)
    -> first and last frame pixel (inclusive) whose centre lies inside."""
    scale = length / cells
    first = torch.ceil((lo + 0.5) * scale - 0.5).clamp(min=0)
    last = torch.floor((hi + 0.5) * scale - 0.5)
    last = torch.minimum(last, length - 1)
    return first, torch.maximum(last, first)


def _axis_weights(first, last, nodes: int, length: torch.Tensor):
    """Σ over frame pixels first..last of their bilinear weights on the `nodes` grid nodes: `[N,K,nodes]`.

    From a cumulative table per distinct frame length (a batch usually has one), so the cost does not grow
    with the frame's size times the number of boxes.
    """
    sizes, which = torch.unique(length, return_inverse=True)                # [U], [N]
    pixels = torch.arange(int(sizes.max()), device=length.device, dtype=torch.float64)
    src = (pixels + 0.5) * nodes / sizes[:, None].double() - 0.5            # [U, L], pixel centres on the grid
    src = src.clamp(min=0).clamp(max=nodes - 1)                             # edge pixels repeat the border node
    grid = torch.arange(nodes, device=length.device, dtype=torch.float64)
    weights = (1 - (src[..., None] - grid).abs()).clamp(min=0)              # [U, L, nodes]
    weights = weights * (pixels < sizes[:, None])[..., None]                # past a shorter frame's end: none
    table = torch.cat([weights.new_zeros(len(sizes), 1, nodes), weights.cumsum(1)], 1)   # [U, L+1, nodes]
    u = which[:, None]
    return (table[u, last.long() + 1] - table[u, first.long()]).float()


def _surface_at_pixels(nodes: torch.Tensor, px: torch.Tensor, py: torch.Tensor, frames: torch.Tensor):
    """The bilinear surface through `nodes` `[N,h,w]` at frame pixel centres (px, py) `[N,...]` (integers)."""
    N, h, w = nodes.shape
    shape = px.shape
    W, H = (frames[:, i].reshape(N, *([1] * (px.dim() - 1))) for i in (0, 1))
    sx = ((px + 0.5) * w / W - 0.5).clamp(0, w - 1)
    sy = ((py + 0.5) * h / H - 0.5).clamp(0, h - 1)
    x0, y0 = sx.floor().clamp(max=max(w - 2, 0)), sy.floor().clamp(max=max(h - 2, 0))
    fx, fy = sx - x0, sy - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = nodes.reshape(N, -1)
    at = lambda yy, xx: flat.gather(1, (yy * w + xx).reshape(N, -1)).reshape(shape)  # noqa: E731
    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1)))


def _saddle_pixels(nodes: torch.Tensor, frames: torch.Tensor):
    """Per grid cell, the surface at the frame pixels diagonally around the cell's saddle point: the pixel
    below-left and above-right of it (the a-d diagonal) and the other two (the b-c diagonal), `4 x [N,h-1,w-1]`."""
    N, h, w = nodes.shape
    a, b, c, d = nodes[:, :-1, :-1], nodes[:, :-1, 1:], nodes[:, 1:, :-1], nodes[:, 1:, 1:]
    den = a + d - b - c
    safe = torch.where(den == 0, torch.ones_like(den), den)
    u = torch.where(den == 0, 0.5, (a - c) / safe).clamp(0, 1)          # saddle, in the cell (x along columns)
    v = torch.where(den == 0, 0.5, (a - b) / safe).clamp(0, 1)
    j = torch.arange(w - 1, device=nodes.device, dtype=nodes.dtype)
    i = torch.arange(h - 1, device=nodes.device, dtype=nodes.dtype)[:, None]
    W, H = frames[:, 0, None, None], frames[:, 1, None, None]
    left = torch.floor((j + u + 0.5) * W / w - 0.5)                     # last pixel centre left of the saddle
    top = torch.floor((i + v + 0.5) * H / h - 0.5)
    value = lambda dx, dy: _surface_at_pixels(nodes, left + dx, top + dy, frames)  # noqa: E731
    return value(0, 0), value(1, 1), value(1, 0), value(0, 1)


def surface_component(nodes: torch.Tensor, tau: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Bool `[N,K,h,w]`: nodes of the component of `{bilinear surface >= tau}` (sampled at the frame's pixel
    centres) holding the first maximum node; `nodes` `[N,h,w]`, `tau` `[K,1,1]` or `[N,K,1,1]`, frames `[N,2]`.

    Two diagonal nodes >= τ whose cell's other corners are < τ are joined where the two frame pixels
    straddling the cell's saddle point on their diagonal are >= τ: away from the saddle the two pieces are
    apart by more than a pixel, and those two pixels are 8-neighbours (if the saddle value is >= τ they always
    are >= τ: the continuous surface is joined there too).
    """
    fg = nodes[:, None] >= tau                                               # [N,K,h,w]
    ad_lo, ad_hi, bc_lo, bc_hi = (p[:, None] >= tau for p in _saddle_pixels(nodes, frames))
    down_right = fg[..., :-1, :-1] & fg[..., 1:, 1:] & ad_lo & ad_hi
    down_left = fg[..., :-1, 1:] & fg[..., 1:, :-1] & bc_lo & bc_hi
    seed = argmax_seed(nodes)[:, None].expand_as(fg)
    return connected_component(fg, seed, diagonals=(down_right, down_left))


@torch.no_grad()
def boxes_from_heatmaps(fused: torch.Tensor, frames: torch.Tensor, thresholds=(0.5, 0.35, 0.2)) -> Boxes:
    """Sec. 3.2 boxes for `[N, h, w]` fused heatmaps on frames `[N, 2]` = (width, height) in pixels; the
    thresholds `[K]` serve every map, or `[N, K]` gives each map its own."""
    fused = fused.float()
    N, h, w = fused.shape
    device = fused.device
    frames = torch.as_tensor(frames, dtype=torch.float32, device=device).reshape(N, 2).round()
    tau = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    K = tau.shape[-1]
    tau = tau.expand(N, K)
    if N == 0:
        z = fused.new_zeros((0, K))
        return Boxes(fused.new_zeros((0, K, 4)), z, z, z.bool())

    t = tau[..., None, None]                                                  # [N, K, 1, 1]
    component = surface_component(fused, t, frames)
    nodes = fused[:, None].expand(N, K, h, w)                                 # one map per threshold
    x_lo, x_hi = _edges(component, nodes, t, frames[:, 1])
    y_lo, y_hi = _edges(component.transpose(-1, -2), nodes.transpose(-1, -2), t, frames[:, 0])
    x0, x1 = _pixel_range(x_lo, x_hi, w, frames[:, :1])
    y0, y1 = _pixel_range(y_lo, y_hi, h, frames[:, 1:])
    valid = component.flatten(-2).any(-1)                                     # False: τ above the max
    xywh = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], -1)                # [N, K, 4]
    xywh = xywh.masked_fill(~valid[..., None], 0.0)

    x0, y0, bw, bh = xywh.unbind(-1)                                          # invalid boxes: empty sums
    ax = _axis_weights(x0, x0 + bw - 1, w, frames[:, 0])
    ay = _axis_weights(y0, y0 + bh - 1, h, frames[:, 1])
    score = torch.einsum("nki,nij,nkj->nk", ay, fused, ax) / (xywh[..., 2] * xywh[..., 3]).clamp(min=1)

    same = (xywh[:, :, None] == xywh[:, None, :]).all(-1) & valid[:, None, :]  # [N, k, k'] box k == box k'
    valid &= ~torch.tril(same, diagonal=-1).any(-1)                           # a copy of an earlier threshold
    order = score.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    take = lambda v: v.gather(1, order if v.dim() == 2 else order[..., None].expand_as(v))  # noqa: E731
    return Boxes(take(xywh), take(score), take(tau), take(valid))
