"""Flow 1: dataset ingestion (NIH layout or DICOM folder) into the warehouse and the image cache."""
from __future__ import annotations

from pathlib import Path

from flows._runtime import prefect_api
from flows._verbs import create_table_artifact, flow, recorded_run, task
from pipeline.base.home import Home


@task(name="ingest-nih")
def ingest_nih_task(home: str, root: str, sizes: list[int], metadata_only: bool) -> dict:
    from pipeline.ingest.nih import ingest_nih
    return ingest_nih(home, root, sizes=tuple(sizes), metadata_only=metadata_only)


@task(name="ingest-dicom")
def ingest_dicom_task(home: str, root: str, sizes: list[int]) -> dict:
    from pipeline.ingest.dicom import ingest_dicom
    return ingest_dicom(home, root, sizes=tuple(sizes))


@flow(name="ingest", log_prints=True)
def ingest_flow(home: str, kind: str, root: str, sizes: list[int] = (256,), metadata_only: bool = False) -> dict:
    params = {"kind": kind, "root": root, "sizes": list(sizes), "metadata_only": metadata_only}
    source, home_dir = Path(root).resolve(), Path(home).resolve()
    if source.is_relative_to(home_dir):   # a source inside the home (the demo's phantom) moves with it
        params["root_in_home"] = source.relative_to(home_dir).as_posix()
    with recorded_run(home, "ingest", params) as run_id:
        if kind == "nih":
            counts = ingest_nih_task(home, root, list(sizes), metadata_only)
        else:
            counts = ingest_dicom_task(home, root, list(sizes))
    create_table_artifact(key="ingest-summary", table=[{"run_id": run_id, **counts}],
                          description=f"Ingestion of {kind} data from {root}")
    print(f"ingest {kind}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return {"run_id": run_id, **counts}


def require_cache_space(home: Home, root: Path, sizes: list[int]) -> None:
    """One line before any work when the cache cannot hold the source's images: each takes size x size bytes
    per cache size, less what the cache already holds (a re-ingest reuses it)."""
    from pipeline.base.files import require_free
    n = sum(1 for p in root.rglob("*") if p.suffix.lower() in (".png", ".dcm", ".dicom", "") and p.is_file())
    from pipeline.ingest.archives import archive_files
    if archive_files(root):   # NIH's archives: as many images as Data_Entry lists, at most
        from pipeline.ingest.nih import DATA_ENTRY_NAMES
        n = max([n, *(sum(1 for _ in open(root / name)) - 1 for name in DATA_ENTRY_NAMES if (root / name).is_file())])
    held = {s: sum(f.stat().st_size for f in (home.cache / f"size={s}").glob("*.u8")) for s in sizes}
    need = sum(max(0, n * s * s - held[s]) for s in sizes)
    require_free(home.cache, need, f"the image cache of {n:,} images at {', '.join(map(str, sizes))} px")


def parse_sizes(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def _run(args) -> int:
    """Wait here, before the flow, for another ingest of the home (a one-line error after the timeout); run
    against $PREFECT_API_URL or a loopback server that dies with this process (`prefect_api`)."""
    if not Path(args.root).is_dir():   # before any server starts or the home is made
        raise FileNotFoundError(f"--root {args.root}: no such folder")
    from pipeline.ingest.common import ingest_lock
    home = Home.resolve(args.home).make()
    if not getattr(args, "metadata_only", False):
        require_cache_space(home, Path(args.root), parse_sizes(args.sizes))
    with ingest_lock(home), prefect_api(home.root):
        ingest_flow(str(home.root), args.kind, args.root, parse_sizes(args.sizes), getattr(args, "metadata_only", False))
    return 0


def register(sub) -> None:
    p = sub.add_parser("ingest", help="ingest an NIH ChestX-ray14 folder or a folder of DICOM files",
                       description="Ingest images and labels into the warehouse; decode each image once into "
                                   "the cache. Re-running touches only new or changed files.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    nih = kinds.add_parser("nih", help="NIH layout: Data_Entry_2017*.csv, BBox_List_2017.csv, images/",
                           description="Ingest an NIH ChestX-ray14 layout folder (or a phantom made by "
                                       "`harvest phantom`).")
    nih.add_argument("--root", required=True, help="dataset folder: the CSVs beside images/ folders or NIH's "
                                                    "images_0xx.tar.gz archives (read as a stream, not extracted)")
    nih.add_argument("--metadata-only", action="store_true", help="ingest the CSVs without images")
    nih.add_argument("--sizes", default="256", help="cache sizes, comma-separated (default 256)")
    nih.set_defaults(func=_run)
    dcm = kinds.add_parser("dicom", help="a folder of DICOM files (searched recursively)",
                           description="Ingest DICOM files; identifiers become pseudonyms, no PHI is kept.")
    dcm.add_argument("--root", required=True, help="folder of DICOM files")
    dcm.add_argument("--sizes", default="256", help="cache sizes, comma-separated (default 256)")
    dcm.set_defaults(func=_run)
