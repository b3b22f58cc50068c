"""`harvest check [--repair]`: the warehouse against the files it indexes (issue #21, item 4).

- `check.py`: find the problems, one line each: mined Parquet parts (their recorded sha256, or a full read for
  parts written before records existed), cache rows (their crc32, shard files present and long enough),
  checkpoints (the sha256 in `models`, or beside the file), runs left `running` by a dead process, exports
  (their manifest's sha256 of every file).
- `repair.py`: rebuild what can be rebuilt (cache rows from their sources, parts by mining their shards again,
  checkpoints by training their stage again, a registered checkpoint's damaged record from the file), quarantine
  what cannot (`<home>/quarantine/`), lose no good row.
A home written before checksums were recorded is checked as far as it can be: a missing record is unknown,
not a problem.
"""
