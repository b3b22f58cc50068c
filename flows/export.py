"""Flow 5: pseudo-label export of one mining run (`harvest export`), over :func:`pipeline.export.write.export`.

Prefect is imported on first use (`flows._verbs`), so that `harvest export --run RUN` checks the run id, the
findings and the images in well under two seconds, before any server starts; and none starts unless the home's
own already runs (`flows._runtime.flow_api`): the export then takes about a second (bench/export_speed.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from flows._runtime import flow_api
from flows._verbs import check_findings, create_markdown_artifact, flow, recorded_run, require_run, task
from pipeline.base.home import Home
from pipeline.config.harvest import EXPORT_FORMATS, TRUST_FLOOR
from pipeline.export.common import IMAGE_MODES
from pipeline.export.labelstudio import URL_PREFIX
from pipeline.export.write import MANIFEST, export, preflight
from pipeline.runs.record import writer


@task(name="export")
def export_task(home: str, run_id: str, fmt: str, out_dir: str, min_score: float | None,
                ranks: list[int] | None, findings: list[str] | None, images: str = "link",
                image_roots: list[str] | None = None, url_prefix: str = URL_PREFIX,
                trust_floor: float | None | str = "default") -> str:
    return str(export(home, run_id, fmt, out_dir, min_score=min_score, ranks=ranks, findings=findings,
                      images=images, image_roots=image_roots or (), url_prefix=url_prefix, trust_floor=trust_floor))


@flow(name="export", log_prints=True)
def export_flow(home: str, run_id: str, fmt: str, out_dir: str | None = None, min_score: float | None = None,
                ranks: list[int] | None = (1,), findings: list[str] | None = None, images: str = "link",
                image_roots: list[str] | None = None, url_prefix: str = URL_PREFIX,
                trust_floor: float | None | str = "default") -> dict:
    """Export run `run_id` as `fmt` (coco | yolo | nih-csv | labelstudio | cvat) to `out_dir` (default
    `<home>/exports/<run>/<fmt>`), images linked, copied or not written (`images`: link | copy | none), the
    findings and boxes the run's measured trust passes (`trust_floor`, pipeline.export.write.export)."""
    out_dir = str(out_dir or Home.resolve(home).exports / run_id / fmt)
    ranks = None if ranks is None else list(ranks)
    params = {"run_id": run_id, "format": fmt, "out_dir": out_dir, "min_score": min_score, "ranks": ranks,
              "findings": findings, "images": images, "image_roots": image_roots, "trust_floor": trust_floor,
              **({"url_prefix": url_prefix} if fmt == "labelstudio" else {})}
    with recorded_run(home, "export", params) as export_run:
        path = Path(export_task(home, run_id, fmt, out_dir, min_score, ranks, findings, images, image_roots,
                                url_prefix, trust_floor))
    manifest = json.loads((path / MANIFEST).read_text())
    counts = manifest["counts"]
    per_finding = "".join(f"| {name} | {n} |\n" for name, n in counts["per_finding"].items())
    create_markdown_artifact(
        key="export-summary", description=f"{fmt} export of run {run_id}",
        markdown=f"# Export of run `{run_id}` ({fmt})\n\n"
                 f"- folder: `{path}`\n- model: `{manifest['model_id']}`\n- images: {counts['images']}\n"
                 f"- boxes: {counts['boxes']}\n- negatives: {counts['negatives']}\n"
                 f"- image files: {manifest['images']['mode']}\n- filters: `{json.dumps(manifest['filters'])}`\n"
                 f"- manifest: `{path / MANIFEST}`\n\n| finding | boxes |\n|---|---|\n{per_finding}")
    trust = manifest.get("trust", {})
    kept = [f for f, e in trust.get("findings", {}).items() if e["kept"]]
    print(f"export {fmt}: {counts['boxes']} boxes on {counts['images']} images ({counts['negatives']} without a box) "
          f"in {', '.join(counts['splits'])} -> {path}\n"
          + (f"  trusted findings kept ({len(kept)} of {len(trust['findings'])}, estimated Acc@{trust['t_iou']:g} >= "
             f"{trust['floor']:g} on {trust['source']}): {', '.join(kept) or 'none'}; `--all` keeps every one"
             if trust.get("applied") else f"  every finding kept: {trust.get('reason', 'no trust measured')}"))
    return {"path": str(path), "export_run_id": export_run, **counts}


def parse_ranks(tokens: list[str]) -> list[int] | None:
    """`--ranks 1 2` -> [1, 2]; `--ranks all` -> None (every rank)."""
    return None if [t.lower() for t in tokens] == ["all"] else [int(t) for t in tokens]


def _run(args) -> int:
    findings = check_findings(args.findings)   # one line, before the warehouse is opened
    home = Home.resolve(args.home).make()   # resolved once, handed down
    con = writer(home)   # one connection for the checks: one line each, before any run or flow
    try:
        require_run(home, args.run_id, "export", con)
        preflight(home, args.run_id, args.fmt, args.images, args.image_roots, con=con)   # missing images
    finally:
        con.close()
    with flow_api(home):   # no server unless $PREFECT_API_URL is set or the home's own already runs
        export_flow(str(home.root), args.run_id, args.fmt, args.out, args.min_score, parse_ranks(args.ranks),
                    findings, args.images, args.image_roots, args.url_prefix,
                    None if args.all else args.floor or "default")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a mining run's boxes as COCO, YOLO or NIH CSV pseudo-labels",
                       description="Write the boxes of one mining run as pseudo-labels (labelstudio, cvat: for "
                                   "review, see `harvest import-review`), with manifest.json "
                                   "tracing them to the run, model, filters and code. Only image ids, findings, "
                                   "boxes and scores are written (no patient data). An earlier export in the "
                                   "same folder is replaced atomically.")
    p.add_argument("--run", dest="run_id", required=True, help="run_id of a mining run (see `harvest status`)")
    p.add_argument("--format", dest="fmt", required=True, choices=EXPORT_FORMATS, help="export format")
    p.add_argument("--min-score", type=float, default=None, help="keep boxes with score >= this")
    p.add_argument("--ranks", nargs="+", default=["1"], metavar="RANK",
                   help="box ranks to keep (default 1: the top box per image and finding); 'all' keeps every rank")
    p.add_argument("--findings", nargs="+", default=None, metavar="FINDING",
                   help="findings to keep, e.g. Mass Nodule (default: all 14)")
    p.add_argument("--all", action="store_true",
                   help="keep every finding and box, trusted or not (the default for labelstudio and cvat, which "
                        "people review; coco, yolo and nih-csv keep only the findings whose estimated Acc@0.3 "
                        "on the run's tuning set reaches --floor, and their boxes above the tuned minimum score)")
    p.add_argument("--floor", type=float, default=None, metavar="ACC",
                   help=f"the estimated Acc@0.3 a finding needs to be exported (default {TRUST_FLOOR}); see `harvest tune --run`")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="export folder (default <home>/exports/<run>/<format>)")
    p.add_argument("--images", default="link", choices=IMAGE_MODES,
                   help="link (default): hard-link the source images beside the labels, copying across "
                        "filesystems; copy: always copy; none: write no image, paths relative to the recorded "
                        "image root (not for YOLO). DICOM images are written decoded as PNG, never linked")
    p.add_argument("--image-root", dest="image_roots", action="append", default=None, metavar="DIR",
                   help="folder to search for the source images before the recorded ingest roots (repeatable)")
    p.add_argument("--url-prefix", default=URL_PREFIX, metavar="PREFIX",
                   help="labelstudio: data.image is PREFIX + the image's path (default %(default)s, Label Studio's "
                        "local files: serve the export folder, or the image root with --images none, as "
                        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    p.set_defaults(func=_run)
