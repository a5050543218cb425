"""The end of a ``rwkvkit run -m`` sweep: one table of every run's overrides, status and metrics,
printed and written as ``summary.csv`` / ``summary.json`` in the sweep directory. A sweep in
which any job failed ends with one error line naming them, and exit code 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rwkvkit.argv import shown
from rwkvkit.errors import SweepError, fail
from rwkvkit.rundir import read_json

METRICS = ("generated_tokens", "time_to_first_token_s", "prefill_tok_per_s", "decode_tok_per_s", "peak_memory_mb")
COLUMNS = ("status", *METRICS, "error")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (numbered subdirectories), showing the overrides that vary."""
    rows, per_job = [], []
    for job_dir in sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        per_job.append([shown(o) for o in overrides])
        run = read_json(job_dir / "run.json")
        row: dict[str, Any] = {"job": int(job_dir.name), "status": run.get("status", "failed")}
        row.update({k: v for k, v in read_json(job_dir / "metrics.json").items() if k in METRICS})
        row["error"] = run.get("error", "" if run else "no readable run.json")
        rows.append(row)
    shared = set.intersection(*(set(o) for o in per_job)) if per_job else set()
    for row, overrides in zip(rows, per_job):
        row["overrides"] = " ".join(o for o in overrides if o not in shared)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["job", "overrides", *COLUMNS]
    cells = [[f"{r.get(h, ''):.4g}" if isinstance(r.get(h), float) else str(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        with (sweep_dir / "summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["job", "overrides", *COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nsweep summary ({sweep_dir}):\n{format_table(rows)}")
        failed = [str(r["job"]) for r in rows if r["status"] != "completed"]
        if failed:

            fail(SweepError(f"{len(failed)} of {len(rows)} jobs did not complete (job {', '.join(failed)}); see {sweep_dir / 'summary.csv'}"))
