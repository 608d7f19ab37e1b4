"""The progress bar on stderr: records, records/s, and for files the percentage and ETA."""

from __future__ import annotations

import time


class Progress:
    """A rich progress display. `total_bytes` (regular files only) enables percentage and ETA."""

    def __init__(self, total_bytes: int | None, label: str = "records"):
        from rich.progress import (
            BarColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        from onnxpipe.console import stderr

        columns = [
            TextColumn("{task.fields[records]:,} {task.fields[label]}"),
            TextColumn("{task.fields[rate]:,.0f}/s"),
            BarColumn(),
        ]
        if total_bytes:
            columns += [TaskProgressColumn(), TimeRemainingColumn()]
        self._progress = RichProgress(
            *columns, console=stderr(), transient=True, auto_refresh=True, refresh_per_second=5
        )
        self._task = self._progress.add_task("", total=total_bytes or None, records=0, rate=0.0, label=label)
        self._start = time.perf_counter()
        self._records = 0
        self._progress.start()

    def advance(self, records: int, nbytes: int) -> None:
        self._records += records
        elapsed = time.perf_counter() - self._start
        rate = self._records / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, advance=nbytes, records=self._records, rate=rate)

    def stop(self) -> None:
        self._progress.stop()
