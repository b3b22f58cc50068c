"""Runs: the `runs` table and the writable warehouse connection (`record`), and runs of parts on disk (`parts`)."""
