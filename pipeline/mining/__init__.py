"""Mining (eq. 7-8, sec. 3.2)."""
