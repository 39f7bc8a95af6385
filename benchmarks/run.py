"""Run every benchmark and write docs/benchmarks.md.

    python -m benchmarks.run [--size quick|full] [--only enqueue,storage,pipeline,serving]

Enqueue and storage run in this process without Ray; then Ray is started here
(``ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")``) for the
pipeline and serving benchmarks and shut down at the end. A benchmark that breaks is reported in
the document; nothing here fails because a machine is slow.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from pathlib import Path
from typing import Any

from benchmarks import bench_enqueue, bench_pipeline, bench_serving, bench_storage, report
from benchmarks._common import SIZES, fraud_registry, ray_session
from benchmarks.machine import machine_info, versions

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
ALL = ("enqueue", "storage", "pipeline", "serving")


def _guarded(name: str, fn, results: dict[str, Any], **kwargs: Any) -> None:
    print(f"[benchmarks] {name} ...", flush=True)
    try:
        results[name] = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the document, never fatal
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


def run_all(size: str = "quick", only: tuple[str, ...] = ALL, out: Path | None = DOCS,
            workdir: str | None = None) -> dict[str, Any]:
    """Run the selected benchmarks; write the report to ``out`` unless ``None``."""
    results: dict[str, Any] = {"size": size, "machine": machine_info(), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="sj-bench-", dir=workdir) as tmp:
        tracking_uri = fraud_registry(Path(tmp) / "mlflow")
        common = {"size": size, "workdir": tmp, "tracking_uri": tracking_uri}
        if "enqueue" in only:
            _guarded("enqueue", bench_enqueue.run, results, **common)
        if "storage" in only:
            _guarded("storage", bench_storage.run, results, **common)
        if {"pipeline", "serving"} & set(only):
            with ray_session(num_cpus=2):
                if "pipeline" in only:
                    _guarded("pipeline", bench_pipeline.run, results, **common)
                if "serving" in only:
                    _guarded("serving", bench_serving.run, results, **common)
    if out is not None:
        report.write(results, out)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {ALL}")
    parser.add_argument("--out", default=str(DOCS), help="Markdown report to write ('-' for none)")
    parser.add_argument("--json", help="also write the raw results as JSON here")
    parser.add_argument("--merge", help="results JSON of an earlier run: keep its benchmarks that this "
                        "run does not re-measure (the report says which were re-measured, and when)")
    args = parser.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        parser.error(f"--only got unknown benchmark(s) {unknown}; known: {list(ALL)}")
    out = None if args.out == "-" else Path(args.out)
    results = run_all(args.size, only, None if args.merge else out)
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text(encoding="utf-8"))
        fresh = results
        results = {**earlier, **{k: v for k, v in fresh.items() if k in only}}
        m = fresh["machine"]
        results.setdefault("notes", []).append(
            f"{', '.join(only)} re-measured at {m['date']} (load avg at start "
            f"{' / '.join(str(x) for x in m.get('load_avg_at_start') or [])}); the rest is from the run above.")
        if out is not None:
            report.write(results, out)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    if out is not None:
        print(f"[benchmarks] wrote {out}")


if __name__ == "__main__":
    main()
