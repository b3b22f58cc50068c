"""`pipeline.runs.parts`: the recorded run of parts (mine and detector predict) and the per-process model."""
from __future__ import annotations

import pytest

from pipeline.base.home import Home
from pipeline.runs.parts import process_model, recorded_parts_run, run_dir
from warehouse import db


def status(home, run_id):
    con = db.connect(home, read_only=True)
    try:
        return con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
    finally:
        con.close()


def test_a_parts_run_is_recorded_and_sweeps_killed_writers_temp_files_on_success_only(tmp_path):
    home = Home(tmp_path / "home").make()
    db.connect(home).close()
    with recorded_parts_run(home, "detect", {"split": "test"}, "det-1", "detect-test-abc") as run_id:
        assert status(home, run_id) == "running"
        run_dir(home, run_id).mkdir(parents=True)
        left = run_dir(home, run_id) / ".part-00003.parquet.x1y2.tmp"   # a writer killed mid-write
        left.write_bytes(b"half")
    assert status(home, run_id) == "completed" and not left.exists()

    with pytest.raises(RuntimeError):
        with recorded_parts_run(home, "detect", {}, "det-1", "detect-test-def") as failed:
            run_dir(home, failed).mkdir(parents=True)
            (run_dir(home, failed) / ".part-00000.parquet.z.tmp").write_bytes(b"half")
            raise RuntimeError("a shard failed")
    assert status(home, failed) == "failed"
    assert (run_dir(home, failed) / ".part-00000.parquet.z.tmp").exists()   # the rerun's success sweeps it


def test_one_model_per_process_loaded_once_per_key():
    loads = []
    load = lambda name: lambda: loads.append(name) or f"model {name}"   # noqa: E731
    assert process_model(("home", "a"), load("a")) == ("model a", True)
    assert process_model(("home", "a"), load("a")) == ("model a", False)
    assert process_model(("home", "b"), load("b")) == ("model b", True)
    assert process_model(("home", "a"), load("a")) == ("model a", True)   # b replaced a: one kept at a time
    assert loads == ["a", "b", "a"]


def test_a_part_has_its_sha256_beside_it_in_sha256sum_format(tmp_path):
    import subprocess

    import pyarrow as pa

    from pipeline.base.files import matches_record, recorded_sha256, sha256_file
    from pipeline.runs.parts import finished_parts, write_part

    home = Home(tmp_path / "home").make()
    table = pa.table({"image_id": ["a.png", "b.png"], "score": [0.5, 0.25]})
    path = write_part(home, "mine-train-abc", 3, table, ["a.png", "b.png", "c.png"])
    assert recorded_sha256(path) == sha256_file(path) and matches_record(path) is True
    assert finished_parts(run_dir(home, "mine-train-abc")) == {3: ["a.png", "b.png", "c.png"]}   # not a part
    check = subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=path.parent, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == f"{path.name}: OK\n"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert matches_record(path) is False
    (path.parent / (path.name + ".sha256")).unlink()
    assert matches_record(path) is None                             # a part from before the records: unknown
