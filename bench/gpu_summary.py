"""The figures bench/gpu_check.sh wrote to OUT_DIR, in one table against issue 22's targets.

Reads what the sections left (imports.json, gpu_tests.txt, calls.jsonl, pipe_*.txt,
demo.json, batch.jsonl, compare_*.txt); a section that did not run or did not finish shows
as "-". Prints the table and writes it to OUT_DIR/summary.txt.

    python bench/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def last_json(path: Path) -> dict | None:
    """The last line of ``path`` that is a JSON object, or None."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT MET")


def rows(out: Path) -> list[tuple[str, str, str, str]]:
    """(what, figure, target, verdict) rows."""
    table: list[tuple[str, str, str, str]] = []
    imports = json.loads((out / "imports.json").read_text()) if (out / "imports.json").exists() else {}
    table.append(("CUDA available", str(imports.get("cuda", "-")), "True", verdict(imports.get("cuda"))))
    missing = imports.get("missing")
    table.append(("missing modules", "; ".join(m.split(":")[0] for m in missing) or "none" if missing is not None
                  else "-", "none", verdict(None if missing is None else not missing)))
    tests = (out / "gpu_tests.txt").read_text().strip().splitlines() if (out / "gpu_tests.txt").exists() else []
    summary = next((line for line in reversed(tests) if " passed" in line or " failed" in line or "error" in line), "-")
    table.append(("gpu-marked tests", summary, "all pass", verdict(None if summary == "-" else
                                                                   "failed" not in summary and "error" not in summary)))

    calls = {(c["network"], c["call"]): c for c in json_lines(out / "calls.jsonl")}
    for net in ("IdGen", "ExpGen"):
        eager, graph, bf16 = (calls.get((net, k)) for k in ("eager", "CUDA graph", "bf16 CUDA graph"))
        read_back = calls.get((net, "eager, step read back"))
        if eager:
            table.append((f"{net} call ms at batch 100: eager / step read back / graph / bf16 graph",
                          " / ".join(f"{c['ms']:.3f}" if c else "-" for c in (eager, read_back, graph, bf16)), "", ""))
        if graph:
            table.append((f"{net} CUDA graph vs eager (capture {graph['capture_s']:.2f} s)", f"{graph['speedup']:.1f}x",
                          ">= 10x", verdict(graph["speedup"] >= 10)))
        for c in (eager, graph):
            if c:
                table.append((f"{net} {c['call']} max abs diff vs CPU float32", f"{c['max_abs_diff']:.1e}", "<= 1e-4",
                              verdict(c["max_abs_diff"] <= 1e-4)))
        if bf16:
            table.append((f"{net} bf16 graph max abs diff vs CPU float32", f"{bf16['max_abs_diff']:.1e}", "reported", ""))

    original, fast = "original: ddim_legacy + ddpm", "dpmpp_2m 10"
    for variant in ("eager", "graph", "bf16"):
        pipe = last_json(out / f"pipe_{variant}.txt")
        if pipe:
            settings = pipe["settings"]
            table.append((f"pipeline batch 1, {variant}: s/image original / dpmpp_2m 10 (images/s)",
                          " / ".join(f"{settings[k]:.3f} ({1 / settings[k]:.1f})" if k in settings else "-"
                                     for k in (original, fast)),
                          "graph: <= 0.3 original" if variant == "graph" else "",
                          verdict(settings[original] <= 0.3) if variant == "graph" and original in settings else ""))
            table.append((f"pipeline {variant}: peak GPU memory MB, calls ms IdGen / ExpGen",
                          f"{pipe['peak_mb']}, {pipe['id_call_ms']:.3f} / {pipe['exp_call_ms']:.3f}", "", ""))

    for entry in json_lines(out / "batch.jsonl"):
        per_image = {int(b): s for b, s in entry["s_per_image"].items()}
        best = min(per_image, key=per_image.get)
        label = "original" if entry.get("original") else "dpmpp_2m 10"
        target = 0.3 if label == "original" else 0.05
        table.append((f"FLAME size {label}, graphs: s/image by batch (auto = {entry['auto']})",
                      ", ".join(f"{b}: {s:.4f}" for b, s in sorted(per_image.items())), "", ""))
        figure = f"{per_image[best]:.4f} s/image ({1 / per_image[best]:.1f} images/s)"
        table.append((f"FLAME size {label}: best batch {best}", figure, f"<= {target}",
                      verdict(per_image[best] <= target)))

    demo = json.loads((out / "demo.json").read_text()) if (out / "demo.json").exists() else {}
    for label, entry in demo.items():
        mean = entry["mean"]
        table.append((f"demo test.py {label}: MEAN row mm", ", ".join(f"{k} {v:.3f}" for k, v in mean.items()), "", ""))
        if "max_abs_diff" in entry:
            worst = max(abs(v) for v in entry["mean_diff_mm"].values())
            bf16 = "bf16" in label
            table.append((f"demo {label} vs {next(iter(demo))}: largest MEAN column diff, same pick",
                          f"{worst:.3f} mm, {entry['same_pick']}", "<= 0.01 mm" if bf16 else "",
                          verdict(worst <= 0.01) if bf16 else ""))
            table.append((f"demo {label} vs {next(iter(demo))}: max abs diff of the samples",
                          ", ".join(f"{k} {v:.1e}" for k, v in entry["max_abs_diff"].items()), "", ""))

    for variant in ("eager", "graph"):
        comparison = last_json(out / f"compare_{variant}.txt")
        if comparison:
            old, today = comparison["old"]["s_per_image"], comparison["today"]["s_per_image"]
            figure = f"{comparison['old_over_today']:.2f}x ({old:.2f} vs {today:.3f} s/image)"
            table.append((f"vs 5bf4554 at the original samplers ({variant} today, old eager)", figure, "", ""))
    return table


def main() -> None:
    out = Path(sys.argv[1])
    table = rows(out)
    text = "| what | figure | target | verdict |\n|---|---|---|---|\n"
    text += "\n".join(f"| {what} | {figure} | {target} | {ok} |" for what, figure, target, ok in table) + "\n"
    (out / "summary.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
