"""`harvest check [--repair]`: the warehouse against its files, one line per problem (`pipeline.integrity`).

Checking only reads, so it runs without Prefect, like `status`. `--repair` writes: it is a Prefect flow
(`check-repair`, recorded in `runs` as flow `check`) that rebuilds what can be rebuilt, quarantines the rest
under `<home>/quarantine/` and checks again. The exit status is 1 while any problem is left.
"""
from __future__ import annotations

from flows._runtime import prefect_api
from flows._verbs import create_table_artifact, flow, recorded_run
from pipeline.base.home import Home


@flow(name="check-repair")
def repair_flow(home: str) -> dict:
    from pipeline.integrity.check import check_home, wal_problems
    from pipeline.integrity.repair import Repair

    done: list[str] = []
    wal = wal_problems(home)   # repaired before the run is recorded: recording it opens the warehouse
    Repair(home, say=done.append).run(wal)
    with recorded_run(home, "check", {"repair": True}):
        found = wal + check_home(home)
        Repair(home, say=done.append).run(found[len(wal):])
        left = check_home(home)
    create_table_artifact(key="check-repair", table=[{"found": len(found), "actions": len(done), "left": len(left)}],
                          description="harvest check --repair")
    return {"found": [p.line() for p in found], "done": done, "left": [p.line() for p in left]}


def _run(args) -> int:
    from pipeline.integrity.check import check_home

    home = Home.resolve(args.home)
    if not home.warehouse.exists():
        raise FileNotFoundError(f"no warehouse at {home.warehouse}; nothing to check")
    if not args.repair:
        problems = [p.line() for p in check_home(home)]
        print("\n".join(problems) if problems else f"{home.root}: no problem found")
        return 1 if problems else 0
    with prefect_api(str(home.root)):
        out = repair_flow(str(home.root))
    print("\n".join(out["found"] + out["done"] + [f"left: {line}" for line in out["left"]]))
    if not out["left"]:
        print(f"{home.root}: no problem left" if out["found"] else f"{home.root}: no problem found")
    return 1 if out["left"] else 0


def register(sub) -> None:
    p = sub.add_parser("check", help="verify the warehouse against its files; --repair rebuilds what it can",
                       description="Verify mined Parquet parts (sha256), cached images (crc32), checkpoints "
                                   "(sha256), runs and exports (their manifests) against the warehouse; one line "
                                   "per problem, exit status 1 if there is any. Files written before checksums "
                                   "were recorded are checked as far as possible (unknown is not a problem).")
    p.add_argument("--repair", action="store_true",
                   help="rebuild cache rows from their sources, parts by mining their shards again, checkpoints "
                        "by training their stage again; move what cannot be rebuilt to <home>/quarantine/")
    p.set_defaults(func=_run)
