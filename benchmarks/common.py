"""What every benchmark shares: argument conventions, the output folder, JSON written
atomically (so a run cut short keeps what finished), plain-text tables and line plots."""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from device.bench import torch_threads  # noqa: F401 - one implementation, re-exported
from edge_m2kd.errors import UserError
from edge_m2kd.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs") / "benchmarks" / name,
                        help=f"folder for the JSON and PNG files (default runs/benchmarks/{name}/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); on a shared machine 1 can be far faster")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`, as the CLI's: auto (CUDA where there is one, else the CPU), cpu, cuda or cuda:N."""
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA where present, else the CPU), cpu, cuda or cuda:N")


def device_facts(device: str) -> dict[str, Any]:
    """Where a benchmark ran: the device asked for, the one used, and its name (GPU or CPU model)."""
    from edge_m2kd.learner import resolve_device

    used = resolve_device(device)
    if used.type == "cuda":
        import torch

        return {"asked": device, "used": str(used), "name": torch.cuda.get_device_name(used)}
    return {"asked": device, "used": "cpu", "name": cpu_name()}


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (else what `platform` knows). Training here is
    deterministic for one tree, order and thread count on one CPU model, but float rounding
    differs between models (their kernels differ), so a rerun elsewhere can end points away:
    results record where they ran."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def output_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table or the JSON object."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Bad input (a missing data set, a foreign results.json) is one line on stderr and exit code 2."""
    try:
        yield
    except UserError as e:
        log(f"error: {e}")
        sys.exit(2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN and infinities are not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean(obj), indent=indent, default=_jsonable)


def write_json(path: Path, obj: Any) -> Path:
    """Write through a temporary file and a rename: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (to_json(obj) + "\n").encode())
    return path


def emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    """The end of every benchmark: the table, or (with --json) one JSON object, on stdout."""
    print(to_json(result) if as_json else table, flush=True)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "",
                 footer: Sequence[str] = ()) -> str:
    """A plain-text table; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    numeric = [bool(rows) and all(_looks_numeric(row[i]) for row in cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [title] if title else []
    out += [line(list(header)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out += list(footer)
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    """Right-align numbers, percentages and byte counts ('-' and '' are blanks)."""
    return text in ("-", "") or bool(re.match(r"^[-+]?\d", text))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_int_list(text: str) -> list[int]:
    """'1,5,10' or '1-20' or '1-4,10' -> sorted unique ints."""
    values: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            values.update(range(int(lo), int(hi) + 1))
        else:
            values.add(int(part))
    if not values:
        raise argparse.ArgumentTypeError(f"no numbers in {text!r}")
    return sorted(values)


def parse_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def plot_lines(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float | None]]], *,
               xlabel: str, ylabel: str, title: str, logy: bool = False,
               hlines: dict[str, float] | None = None, styles: dict[str, dict[str, Any]] | None = None,
               bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per series (label -> (x, y)); None values in y are gaps. `hlines`: labelled
    horizontal reference lines; `styles`: matplotlib line options per label; `bands`: a shaded
    (low, high) range around a series, e.g. ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (x, y) in series.items():
        style = {"marker": "o", "markersize": 3, **(styles or {}).get(label, {})}
        (line,) = ax.plot(list(x), [math.nan if v is None else v for v in y], label=label, **style)
        if label in (bands or {}):
            low, high = (bands or {})[label]
            ax.fill_between(list(x), list(low), list(high), color=line.get_color(), alpha=0.15, linewidth=0)
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle=":", linewidth=1, color="grey")
        ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, color="grey", va="bottom")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 90), fontsize=10)  # a long title wraps instead of running off the figure
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
