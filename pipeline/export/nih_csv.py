"""NIH ChestX-ray14's own CSV layout, which `harvest ingest nih` re-ingests: the writer and its write-time check."""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.base.vocab import INDEX, NO_FINDING, normalize_finding, parse_labels
from pipeline.export.common import ImageFiles, counts, short

NAME = "nih-csv"
# BBox_List_2017.csv as NIH ships it: the unquoted header splits into `Bbox [x`, `y`, `w`, `h]` plus three
# empty columns, and Infiltration is spelled `Infiltrate` (docs/design.md#data-contracts).
NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_SPELLING = {"Infiltration": "Infiltrate"}
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                     "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path) -> dict:
    """NIH ChestX-ray14's own layout, so `harvest ingest nih --root <export>` re-ingests it: `BBox_List_2017.csv`
    (score and rank in `BBox_scores.csv`, row for row), `Data_Entry_2017.csv` (labels: the image's and its
    boxes' findings; patient: a keyed pseudonym; age, sex, follow-up blank), `train_val_list.txt`,
    `test_list.txt` and `images/` (with --images none, re-ingest with --metadata-only)."""
    names = {im["image_id"]: files.place(im, out, "images") for im in images}
    names = {iid: Path(n).name for iid, n in names.items()}
    box_findings: dict[str, set] = {}
    for b in boxes:
        box_findings.setdefault(b["image_id"], set()).add(b["finding"])
    with open(out / "BBox_List_2017.csv", "w", newline="") as f, open(out / "BBox_scores.csv", "w", newline="") as g:
        f.write(NIH_HEADER + "\n")  # verbatim: the csv module would quote `Bbox [x,y,w,h]`
        rows, scores = csv.writer(f, lineterminator="\n"), csv.writer(g, lineterminator="\n")
        scores.writerow(["Image Index", "Finding Label", "x", "y", "w", "h", "rank", "score"])
        for b in boxes:
            cells = [names[b["image_id"]], NIH_SPELLING.get(b["finding"], b["finding"]),
                     *(repr(short(b[c])) for c in "xywh")]
            rows.writerow(cells)
            scores.writerow([*cells, int(b["rank"]), repr(short(b["score"]))])
    with open(out / "Data_Entry_2017.csv", "w", newline="") as f:
        f.write(DATA_ENTRY_HEADER + "\n")  # the two bracketed headers split into two columns each, as NIH's
        rows = csv.writer(f, lineterminator="\n")
        for im in images:
            labels = sorted(set(im["labels"]) | box_findings.get(im["image_id"], set()), key=INDEX.__getitem__)
            rows.writerow([names[im["image_id"]], "|".join(labels) or NO_FINDING, "", im["patient"], "", "",
                           im["view"] or "", im["width"], im["height"],
                           "" if im["spacing_x"] is None else repr(im["spacing_x"]),
                           "" if im["spacing_y"] is None else repr(im["spacing_y"])])
    for name, keep in (("train_val_list.txt", lambda s: s != "test"), ("test_list.txt", lambda s: s == "test")):
        (out / name).write_text("".join(names[im["image_id"]] + "\n" for im in images if keep(im["split"])))
    return counts(images, boxes)


def verify(out: Path, files: ImageFiles) -> None:
    """What `harvest ingest nih` accepts: every box on a listed image, of a finding in its labels, inside its frame."""
    from pipeline.ingest.nih import read_bbox_csv, read_data_entry
    entry = read_data_entry(out / "Data_Entry_2017.csv").set_index("image_id")
    for rec in read_bbox_csv(out / "BBox_List_2017.csv").itertuples(index=False):
        row = entry.loc[rec.image_id]
        finding = normalize_finding(rec.finding_raw)
        if finding not in parse_labels(row.labels_raw) or not (
                0 <= rec.x and 0 <= rec.y and rec.x + rec.w <= row.orig_w and rec.y + rec.h <= row.orig_h):
            raise ValueError(f"BBox_List_2017.csv: the {finding} box of {rec.image_id} would be rejected")
    if files.mode != "none":
        missing = [n for n in entry.index if not (out / "images" / n).is_file()]
        if missing:
            raise ValueError(f"images/{missing[0]} is listed in Data_Entry_2017.csv but not written")
