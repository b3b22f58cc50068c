"""A damaged Parquet part stays local (issue #21, item 3): the connection opens, every other table and run
answers, and a query reaching the part fails in one line that names it and `harvest check --repair`."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flows.cli import main
from pipeline.base.home import Home
from pipeline.runs.parts import part_path, write_part
from warehouse import db

RUNS = ("mine-train-aaaa", "mine-train-bbbb")
ROWS = 4000


def boxes(run_id: str, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    schema = db.PARQUET_TABLES["mined_boxes"]
    cols = {"run_id": [run_id] * ROWS, "model_id": ["m"] * ROWS, "image_id": [f"i{k % 500}.png" for k in range(ROWS)],
            "finding": ["Mass"] * ROWS, "rank": rng.integers(1, 4, ROWS), "method": ["am"] * ROWS}
    return pa.table({f.name: pa.array(cols.get(f.name, rng.random(ROWS) * 1000)).cast(f.type) for f in schema})


@pytest.fixture
def home(tmp_path):
    home = Home(tmp_path / "home").make()
    con = db.connect(home)
    con.execute("INSERT INTO images VALUES ('i0.png', 'p0', 0, 50, 'F', 'PA', 64, 64, 1, 1, 'train', 'nih', "
                "'abc', now())")
    con.close()
    for seed, run in enumerate(RUNS):
        for shard in range(2):
            write_part(home, run, shard, boxes(run, 10 * seed + shard), [])
    return home


def harvest(home, capsys, *args) -> tuple[int, str, str]:
    code = main(["--home", str(home.root), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    n = len(data)
    if how == "truncated":
        data = data[: n // 2]
    elif how == "zeroed footer":
        data[n - 200:] = bytes(200)
    else:   # zeroed data pages: the footer still reads
        data[n // 10: n // 3] = bytes(n // 3 - n // 10)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "zeroed footer", "zeroed pages"])
def test_only_queries_reaching_the_damaged_part_fail_in_one_line_naming_it(home, capsys, how):
    bad = part_path(home, RUNS[0], 1)
    damage(bad, how)
    code, out, _ = harvest(home, capsys, "sql", "SELECT count(*) AS n FROM images")
    assert code == 0 and out.split() == ["n", "-", "1"]
    code, out, _ = harvest(home, capsys, "sql", f"SELECT count(*) AS n, sum(x) > 0 AS ok FROM mined_boxes "
                                                f"WHERE run_id = '{RUNS[1]}'")
    assert code == 0 and out.split()[-2:] == [str(2 * ROWS), "True"]   # the other run answers
    code, _, err = harvest(home, capsys, "sql", "SELECT sum(x + y + w + h + score) FROM mined_boxes")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and "harvest check --repair" in err and err.startswith("harvest sql: error: ")
    code, out, err = harvest(home, capsys, "status")
    assert code == 0 and err == "" and "images" in out
    db.connect(home).close()                                        # a writer (ingest, train) still opens it
    con = db.connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM mined_boxes WHERE run_id = ?", [RUNS[1]]).fetchone()[0] == 2 * ROWS
    con.close()


def test_a_footer_damage_is_named_by_status_and_a_mining_rerun_of_its_run(home, capsys):
    from pipeline.runs.parts import finished_parts, run_dir

    bad = part_path(home, RUNS[0], 0)
    damage(bad, "truncated")
    code, out, _ = harvest(home, capsys, "status")
    line = next(x for x in out.splitlines() if x.startswith("mined_boxes"))
    assert code == 0 and "unreadable" in line and str(bad) in line and "harvest check --repair" in line
    with pytest.raises(ValueError, match="harvest check --repair") as err:
        finished_parts(run_dir(home, RUNS[0]))
    assert str(bad) in str(err.value)
    assert len(finished_parts(run_dir(home, RUNS[1]))) == 2
