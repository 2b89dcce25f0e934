"""summary.json of a test.py run: what this run did, and what made the files that are there.

Each image's done marker (`<name>/done.json`) records the settings and the run that made
it, so the summary can say, for every listed image with outputs, which settings made them,
even when a re-run with other settings skipped them. Each rank writes a report of its own
(`.test-parts/rank<r>.json`: failures with reasons, device, time, interrupted or not), and
the summary is merged from those reports and the done markers under a file lock; every
rank that ends early merges too, so summary.json is written whichever rank ends last or
fails, and a rank that never reported is named in it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ofer.inference.layout import read_marker
from ofer.io import atomic_write

PARTS = ".test-parts"


@dataclass
class RunPlan:
    """What a run set out to do, decided once by rank 0 and shared with every rank."""

    run_id: str
    listed: list[str]  # every image name of the list, in order
    finished: list[str]  # already done and skipped
    todo: list[tuple[str, Path]]  # (name, image path) to reconstruct, split over the ranks
    lock_owner: dict = field(default_factory=dict)


@dataclass
class RankReport:
    """One rank's account of its shard."""

    rank: int
    device: str
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason (file, what is wrong)
    interrupted: bool = False
    seconds: float = 0.0  # from the start of loading the models to the end of the shard
    load_seconds: float = 0.0  # loading the models (and importing what the samplers use first)

    def save(self, out: Path) -> None:
        with atomic_write(out / PARTS / f"rank{self.rank}.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self)))


def _settings_groups(markers: dict[str, dict | None]) -> list[dict]:
    """Images with outputs grouped by the settings that made them (None: made before settings were recorded)."""
    groups: dict[str, dict] = {}
    for name, marker in markers.items():
        if marker is None:
            continue
        settings = marker.get("settings")
        key = json.dumps(settings, sort_keys=True)
        groups.setdefault(key, {"settings": settings, "images": []})["images"].append(name)
    return list(groups.values())


def write_summary(out: Path, plan: RunPlan, settings: dict, world: int) -> dict:
    """Merge the rank reports present and the done markers into `out/summary.json`; return it."""
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    with open(parts / "merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one merger at a time, each seeing every report written before it
        reports = {}
        for rank in range(world):
            try:
                reports[rank] = RankReport(**json.loads((parts / f"rank{rank}.json").read_text()))
            except (OSError, ValueError, TypeError):
                continue
        markers = {name: read_marker(out, name) for name in plan.listed}
        reconstructed = [n for n, _ in plan.todo if (markers[n] or {}).get("run") == plan.run_id]
        failed = {n: r for report in reports.values() for n, r in report.failed.items()}
        not_processed = {}
        for i, (name, _) in enumerate(plan.todo):
            if name in failed or name in reconstructed:
                continue
            report = reports.get(i % world)
            not_processed[name] = ("interrupted" if report and report.interrupted else
                                   f"rank {i % world} ended without a report" if report is None else "not reached")
        notes = []
        other = [n for n in plan.finished if (markers[n] or {}).get("settings") != settings]
        if other:
            notes.append(f"{len(other)} skipped images have outputs made with other (or unrecorded) settings, kept as "
                         "they are (see output_settings); "
                         "--overwrite redoes them with this run's settings")
        if plan.listed and not plan.todo:
            notes.append("nothing to do: every listed image already has outputs; --overwrite redoes them")
        seconds = max((r.seconds for r in reports.values()), default=0.0)
        load = max((r.load_seconds for r in reports.values()), default=0.0)
        # Per image: the slowest rank's reconstruction time (without its one-time loading) per image reconstructed.
        per_image = max((r.seconds - r.load_seconds for r in reports.values()), default=0.0) / max(len(reconstructed), 1)
        summary = {
            "listed": plan.listed,
            "reconstructed": reconstructed,
            "skipped_already_done": plan.finished,
            "failed": failed,
            "not_processed": not_processed,
            "interrupted": any(r.interrupted for r in reports.values()) or len(reports) < world,
            "seconds": round(seconds, 2),
            "load_seconds": round(load, 2),
            "seconds_per_image": round(per_image, 3),
            "device": ", ".join(sorted({r.device for r in reports.values()})),
            "world_size": world,
            "settings": settings,
            "output_settings": _settings_groups(markers),
            "notes": notes,
        }
        with atomic_write(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary


def remove_reports(out: Path) -> None:
    """Remove the rank reports: an earlier run's before a run starts, this run's once the summary is final."""
    shutil.rmtree(out / PARTS, ignore_errors=True)
