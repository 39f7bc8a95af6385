"""Machine and version facts for the benchmark report."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import platform
import sys
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - report what is missing, do not fail
        return "not installed"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module.replace("_", "-"))
        except Exception:  # noqa: BLE001
            version = "unknown"
    return str(version)


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, load average and the UTC date of the run."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_at_start": None if load is None else [round(x, 2) for x in load],
    }


def versions() -> dict[str, str]:
    """Versions of Python and of the packages the figures depend on."""
    out = {"python": sys.version.split()[0]}
    for module in ("serve_journal", "ray", "pyarrow", "duckdb", "mlflow", "aiokafka", "sklearn"):
        out[module] = _version(module)
    return out
