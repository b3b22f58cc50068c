"""`harvest import-review FILE`: boxes people corrected in Label Studio or CVAT come back as `gt_boxes` rows with
source `review` (pipeline.export.review). A short warehouse write: no Prefect, no torch."""
from __future__ import annotations

from flows._verbs import require_run
from pipeline.base.home import Home
from pipeline.export.review import FORMATS, import_review

REJECTS_SQL = "SELECT path, reason, detail FROM rejects WHERE stage = 'review' AND source = '{}'"


def _run(args) -> int:
    home = Home.resolve(args.home)
    if args.run_id:
        require_run(home, args.run_id, "import-review")   # one line for a mistyped run id
    out = import_review(home, args.file, fmt=args.fmt, run_id=args.run_id)
    print(f"import-review ({out['format']}): {out['images']} image(s) reviewed, {out['boxes']} box(es), "
          f"{out['negatives']} reviewed negative(s), from {out['file']}"
          + (f" (mining run {out['run_id']})" if out["run_id"] else ""))
    if out["rejects"]:
        sql = REJECTS_SQL.format(out["file"].replace("'", "''"))
        print(f"{out['rejects']} reject(s), {out['rejected_images']} image(s) not imported: "
              f"harvest sql \"{sql}\"")
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-review", help="import boxes corrected in Label Studio or CVAT as reviewed ground truth",
                       description="Read a Label Studio JSON export (each task's latest annotation that was not "
                                   "cancelled), a CVAT for images 1.1 XML file or CVAT's zip of it, or a COCO file or "
                                   "zip (CVAT's COCO 1.0 export); in CVAT's files every listed image counts as "
                                   "reviewed. Its boxes are stored as gt_boxes with source 'review', in pixels of "
                                   "each image's frame. An image's latest import replaces its earlier review; a "
                                   "reviewed image without a box is a reviewed negative (table reviews). Bad boxes, "
                                   "unknown images and unknown findings become rejects rows (stage 'review'); the "
                                   "rest is imported. `harvest evaluate` then adds @review protocols.")
    p.add_argument("file", help="the exported file: Label Studio JSON, CVAT XML or zip, COCO JSON or zip")
    p.add_argument("--format", dest="fmt", default="auto", choices=FORMATS,
                   help="file format (default auto: a list of tasks is Label Studio, XML is CVAT, images + "
                        "annotations is COCO)")
    p.add_argument("--run", dest="run_id", default=None,
                   help="the mining run whose boxes were reviewed (default: the one a Label Studio export names in "
                        "its predictions' model_version, else the home's only mining run)")
    p.set_defaults(func=_run)
