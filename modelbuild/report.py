"""The build's report: a rich table, the JSON form, and a chart of quality against size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(report: dict[str, Any]) -> Table:
    """One row per variant (the source first): figures, then each tier's verdict."""
    tiers = list(report["tiers"])
    out = Table(title=f"{report['name']} {report['version']}: variants measured on this machine")
    contexts = sorted({int(c) for row in [report["source"], *report["variants"]]
                       for c in row["measurement"]["ram_bytes"]})
    ram_title = "model RAM MiB at " + " / ".join(str(c) for c in contexts)
    for column in ("variant", "tensor types", "MiB", "perplexity", "eval", "tok/s", "TTFT ms",
                   ram_title, "built"):
        out.add_column(column, justify="left" if column in ("variant", "tensor types") else "right")
    for tier in tiers:
        out.add_column(tier)
    for row in [report["source"], *report["variants"]]:
        m = row["measurement"]
        by_context = sorted(m["ram_bytes"].items(), key=lambda kv: int(kv[0]))
        ram = " / ".join(_mib(v) for _, v in by_context)
        types = " ".join(f"{k}x{v}" for k, v in m["tensor_types"].items() if k != "F32") \
            or "(ONNX folder)"
        verdicts = []
        for tier in tiers:
            info = report["tiers"][tier]
            if row["name"] == "source" or row["name"] not in info["verdicts"]:
                verdicts.append("")
            elif info["chosen"] == row["name"]:
                verdicts.append("[bold green]chosen[/]")
            elif info["verdicts"].get(row["name"]) is None:
                verdicts.append("fits")
            else:
                verdicts.append("[red]refused[/]")
        built = "" if row["name"] == "source" else ("reused" if row["reused"] else "built")
        out.add_row(row["name"], types, _mib(m["size_bytes"]), f"{m['perplexity']:.2f}",
                    f"{m['eval_score']:.3f}", f"{m['tokens_per_s']:.1f}", f"{m['ttft_ms']:.0f}",
                    ram, built, *verdicts)
    return out


def print_report(report: dict[str, Any], console: Console) -> None:
    """The table, then each refusal, then where the outputs are."""
    console.print(table(report))
    for tier, info in report["tiers"].items():
        for reason in info["verdicts"].values():
            if reason is not None:
                console.print(f"  {tier}: {reason}")
    if report.get("chart"):
        console.print(f"chart: {report['chart']}")
    if report.get("release_spec"):
        console.print(f"release spec: {report['release_spec']}")


def write_chart(report: dict[str, Any], path: Path) -> None:
    """PNG: perplexity and eval score against file size, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [report["source"], *report["variants"]]
    chosen = {info["chosen"] for info in report["tiers"].values()}
    fig, (ppl_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((ppl_ax, "perplexity", "perplexity (lower is better)"),
                           (eval_ax, "eval_score", "eval score (higher is better)")):
        for row in rows:
            m = row["measurement"]
            size = m["size_bytes"] / 2**20
            colour = "black" if row["name"] == "source" else (
                "tab:green" if row["name"] in chosen else "tab:blue")
            ax.scatter(size, m[key], color=colour, s=40)
            ax.annotate(row["name"], (size, m[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['name']} {report['version']}: quality against size "
                 "(black: source, green: chosen for a tier)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
