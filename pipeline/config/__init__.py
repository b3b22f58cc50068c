"""Every config a user writes, checked before anything runs and without torch: `check` (the shared checks and typed
loader), `train`, `mining`, `detector` and `harvest` (a whole harvest file)."""
