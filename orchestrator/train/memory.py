"""Peak resident memory of this process, logged per stage so a job's MLflow run says what it needed."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Largest resident set this process has had so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
