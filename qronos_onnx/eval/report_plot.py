"""``qronos-onnx report OUT.report.json --plot out.png``: the per-layer relative output error as a picture.

One point per target in the report's order (the solve order: waves in graph order), two series on a log axis: RTN on
the same grid (``rtn_rel_error``) and the run's algorithm (``rel_error``), so the distance between them is what the
algorithm bought per layer. Targets whose entry says ``"plan_source": "target-bits"`` (promoted by a mixed-precision
plan) get a shaded band, a legend entry "promoted" and their ``weight_format`` written above them; reports written
before those fields existed simply have no promoted targets.

matplotlib (Agg backend, no display) is needed only here; the PNG is written atomically (tmp file + rename).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

PROMOTED_SOURCE = "target-bits"


@dataclass(frozen=True)
class PlotLayer:
    """What the picture needs of one report entry."""

    name: str
    rel_error: float
    rtn_rel_error: float
    promoted: bool
    weight_format: str | None


def check_plot_path(report: str | os.PathLike, plot: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, a plot path that is the report itself, a folder, not a .png, in a missing or
    read-only folder, or an existing file without ``overwrite``."""
    out = Path(plot)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--plot {str(out)!r}: expected a .png file name")
    if out.is_dir():
        raise ConfigError(f"--plot {str(out)!r} is a directory; give a .png file name")
    if out.exists() and Path(report).exists() and os.path.samefile(out, report):
        raise ConfigError(f"--plot {str(out)!r} is the report itself; give another .png file name")
    if out.exists() and not overwrite:
        raise ConfigError(f"--plot {str(out)!r} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"--plot {str(out)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--plot {str(out)!r}: folder {str(parent)!r} is not writable")
    return out


def plot_layers(data: dict) -> list[PlotLayer]:
    """The entries of a report's ``layers`` list (already checked by ``cli.load_report``), in report order."""
    out = []
    for i, e in enumerate(data.get("layers") or []):
        fmt = e.get("weight_format")
        out.append(PlotLayer(name=str(e.get("weight") or f"#{i}"), rel_error=float(e["rel_error"]),
                             rtn_rel_error=float(e["rtn_rel_error"]),
                             promoted=e.get("plan_source") == PROMOTED_SOURCE,
                             weight_format=str(fmt) if fmt not in (None, "") else None))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("report --plot needs matplotlib: pip install matplotlib") from None
    return plt


def _floor(layers: list[PlotLayer]) -> float:
    """Where a zero error (an exact layer) is drawn, a log axis having no 0: a third of the smallest positive one."""
    pos = [v for x in layers for v in (x.rel_error, x.rtn_rel_error) if math.isfinite(v) and v > 0]
    return min(pos) / 3 if pos else 1e-6


def write_plot(report: str | os.PathLike, plot: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Draw the report's per-layer errors into ``plot`` (PNG, atomic); returns the path written."""
    out = check_plot_path(report, plot, overwrite)
    plt = _pyplot()
    data = json.loads(Path(report).read_text(encoding="utf-8"))
    if any(e.get("rel_error") is None for e in data.get("layers") or []):
        raise ConfigError(f"report {str(report)!r} has no measured output errors (a data-free run, without --calib); "
                          "nothing to plot: quantize with --calib to measure them")
    layers = plot_layers(data)
    if not layers:
        raise ConfigError(f"report {str(report)!r} lists no layers; nothing to plot")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    algo = str((config.get("rounding") or {}).get("algorithm") or data["layers"][0].get("algorithm") or "algorithm")
    n = len(layers)
    xs = list(range(n))
    floor = _floor(layers)

    def _shown(v: float) -> float:
        return v if math.isfinite(v) and v > floor else floor

    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.18 * n + 4)), 4.8))
    promoted = [i for i, layer in enumerate(layers) if layer.promoted]
    formats = sorted({layers[i].weight_format for i in promoted if layers[i].weight_format})
    label = "promoted (target-bits)" + (f": {formats[0]}" if len(formats) == 1 else "")
    for k, i in enumerate(promoted):
        ax.axvspan(i - 0.5, i + 0.5, color="C1", alpha=0.18, lw=0, label=label if k == 0 else None)
    ax.plot(xs, [_shown(layer.rtn_rel_error) for layer in layers], color="0.55", marker="o", ms=3, lw=1,
            label="RTN (same grid)")
    ax.plot(xs, [_shown(layer.rel_error) for layer in layers], color="C0", marker="o", ms=3, lw=1.2, label=algo)
    if promoted:
        ax.plot(promoted, [_shown(layers[i].rel_error) for i in promoted], ls="none", marker="*", ms=11, color="C1",
                markeredgecolor="k", markeredgewidth=0.5, zorder=5)
    ax.set_yscale("log")
    top = max(_shown(v) for layer in layers for v in (layer.rel_error, layer.rtn_rel_error))
    ax.set_ylim(top=top * 4)  # room for the format labels of promoted targets
    for i in promoted:  # the format's first word ("int8 sym per-channel" -> "int8"); the legend has it in full
        fmt = layers[i].weight_format
        if fmt:
            ax.annotate(fmt.split()[0], (i, top * 1.3), ha="center", va="bottom", rotation=90, fontsize=7,
                        color="C1", annotation_clip=True)
    ax.set_xlim(-0.8, n - 0.2)
    if n <= 60:
        ax.set_xticks(xs)
        ax.set_xticklabels([layer.name[-28:] for layer in layers], rotation=90, fontsize=6)
    ax.set_xlabel(f"target in solve (graph) order, {n} weights")
    ax.set_ylabel("relative output error ||XW - X~Q|| / ||XW||")
    title = Path(str(data.get("output") or report)).name
    fmt_w = config.get("weights") or {}
    ax.set_title(f"{title}: {algo}" + (" vs RTN" if algo != "rtn" else "")
                 + (f", weights {fmt_w.get('format', 'int')} {fmt_w.get('bits', '')}-bit" if fmt_w else "")
                 + (f", {len(promoted)} promoted" if promoted else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a plot is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out
