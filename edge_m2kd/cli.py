"""The `edge-m2kd` command line: parse, call the library, print. Exit codes: 0 success,
2 bad input or a refused step, 1 an internal error."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from edge_m2kd.errors import UserError


class Group(click.Group):
    """Turn a UserError into one line on stderr and exit code 2; warnings print as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        warnings.showwarning = lambda message, *a, **k: click.echo(f"warning: {message}", err=True)
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="edge-m2kd")
def main() -> None:
    """On-device class-incremental learning with M2KD."""


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


@main.command()
@click.option("--method", default="m2kd", show_default=True,
              type=click.Choice(["m2kd", "m2kd-multi-model", "m2kd-multi-level", "icarl", "lwf", "finetune", "joint"]))
@click.option("--snapshots", "policy", default=None, type=click.Choice(["full", "packed", "sparse"]),
              help="snapshot policy (default: the method's own)")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="where the run's results are written")
@click.option("--epochs", type=int, default=None, help="epochs per step (default: the demo's schedule)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def demo(method: str, policy: str | None, workdir: Path, epochs: int | None, as_json: bool) -> None:
    """Learn scikit-learn's bundled digits in 5 steps of 2 classes (no download)."""
    from edge_m2kd.demo import demo_config, run_demo

    cfg = demo_config(method, policy, epochs)

    def print_row(step: dict[str, Any]) -> None:
        if not as_json:
            nme = "   -  " if step["nme_accuracy"] is None else f"{100 * step['nme_accuracy']:5.1f}%"
            groups = " ".join(f"{100 * a:5.1f}" for a in step["accuracy_per_group"])
            click.echo(f"step {step['step']}  classes {','.join(step['classes']):<5} "
                       f"acc {100 * step['accuracy']:5.1f}%  nme {nme}  per group [{groups}]  "
                       f"{step['seconds']:5.1f}s")

    result = run_demo(cfg, workdir, print_row)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{method}: final accuracy {100 * result['final_accuracy']:.1f}%, average incremental "
                   f"{100 * result['average_incremental_accuracy']:.1f}%, forgetting "
                   f"{100 * result['forgetting']:.1f} points, {result['seconds']:.0f}s; results in {workdir}")
