"""Evaluation outputs: per-slice CSV, summary JSON, Markdown and HTML reports with matplotlib figures.

Input is what :mod:`n2g_ct.evaluation.evaluate` produces: per-slice rows (one per slice and method), the
summary dict (protocol, methods, mean ± std, NPS curves) and a few :class:`ExampleSlice` s. The
report names slices by pair index and slice index only: never a patient name or ID, never a path.
``report.md`` links the PNGs in ``figures/`` next to it; ``report.html`` embeds them (base64), so it
is one self-contained file. matplotlib is imported inside the figure functions and draws on the
Agg canvas without pyplot, so no global backend or figure state changes.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from n2g_ct.atomic import write_text_atomic
from n2g_ct.quality.metrics import DISPLAY_WINDOW, WINDOWS, Window
from n2g_ct.training.run_folder import RunFolder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REFERENCE = "reference"
NOISY = "noisy"
"""The noisy input's row: the baseline every denoiser is compared with."""
DIFFERENCE_RANGE_HU = 100.0
"""Difference maps (output − reference) are shown on [-100, 100] HU."""
BONE_WINDOW = Window("bone", -450.0, 1050.0)
"""The bone window of the example crops (level 300, width 1500 HU)."""
FIGURES_DIR = "figures"

QUALITY_COLUMNS: tuple[tuple[str, str, int], ...] = (
    *(column for w in WINDOWS for column in ((f"psnr_{w.name}", f"PSNR {w.name} [dB]", 2),
                                             (f"ssim_{w.name}", f"SSIM {w.name}", 4))),
    ("roi_noise_std_hu", "ROI noise std [HU]", 1),
)
"""(metric key, column header, decimals) of the image-quality table."""
HARM_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("roi_hu_bias_hu", "ROI HU bias [HU]", 2),
    ("bone_rmse_hu", "bone RMSE [HU]", 1),
    ("bone_bias_hu", "bone bias [HU]", 2),
    ("edge_rmse_hu", "edge RMSE [HU]", 1),
    ("edge_bias_hu", "edge bias [HU]", 2),
)
"""(metric key, column header, decimals) of the do-no-harm table: errors against the reference where
a denoiser that shifts CT numbers or blurs anatomy does harm (soft tissue, bone, edges)."""


@dataclass(frozen=True)
class ExampleSlice:
    """One slice shown side by side in the report.

    Attributes:
        label: what the figure calls it, e.g. ``pair 0, slice 12`` (no patient data).
        outputs: method name → (y, x) HU, in report order (the noisy input first).
        reference: (y, x) HU.
        roi_corners: (n, 2) top-left (row, column) corners of the uniform ROIs.
        roi_size_px: ROI side in pixels.
    """

    label: str
    outputs: Mapping[str, np.ndarray]
    reference: np.ndarray
    roi_corners: np.ndarray
    roi_size_px: int


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented strict JSON (NaN/inf as null), atomically."""
    write_text_atomic(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Write ``rows`` with columns ``fields`` (floats with 6 significant digits), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def _mean_std(stats: Mapping[str, Any] | None, decimals: int) -> str:
    if not stats or stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "–"
    std = stats.get("std")
    spread = f" ± {std:.{decimals}f}" if std is not None and math.isfinite(std) else ""
    return f"{stats['mean']:.{decimals}f}{spread}"


def _method_results(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(m["name"], summary["results"].get(m["name"], {})) for m in summary["methods"]]


HU_SHIFT_TOLERANCE_HU = 5.0
"""A mean soft-tissue HU bias beyond this is flagged (the self-check's limit on the HU shift)."""
SSIM_DROP_TOLERANCE = 0.001
"""A mean SSIM drop below this is not flagged (about the standard error of a few slices' mean)."""


def findings(summary: Mapping[str, Any]) -> list[str]:
    """Plain-language flags per denoiser against the noisy input: a PSNR gain bought with lower SSIM
    (smoothing), a PSNR loss, a soft-tissue HU shift against its input beyond
    :data:`HU_SHIFT_TOLERANCE_HU`; and a noisy input already biased against the reference."""
    results = dict(_method_results(summary))
    noisy = results.get(NOISY, {})

    def mean(name: str, key: str) -> float | None:
        value = (results.get(name) or {}).get(key) or {}
        return value.get("mean") if isinstance(value, Mapping) else None

    lines = []
    for name in results:
        if name == NOISY:
            continue
        for window in ("display", "full"):
            gain, change = mean(name, f"psnr_{window}"), mean(name, f"ssim_{window}")
            base_psnr, base_ssim = (noisy.get(k, {}).get("mean") for k in (f"psnr_{window}", f"ssim_{window}"))
            if None in (gain, change, base_psnr, base_ssim):
                continue
            if gain - base_psnr > 0 and base_ssim - change > SSIM_DROP_TOLERANCE:
                lines.append(f"{name} raises PSNR ({window} window) by {gain - base_psnr:.2f} dB over the noisy input "
                             f"but lowers SSIM by {base_ssim - change:.4f}: it trades structure for noise removal "
                             "(smoothing); look at the zoomed crops of the examples.")
            elif gain - base_psnr < 0:
                lines.append(f"{name} lowers PSNR ({window} window) by {base_psnr - gain:.2f} dB against the noisy "
                             "input: on these slices it makes images worse.")
        bias, input_bias = mean(name, "roi_hu_bias_hu"), mean(NOISY, "roi_hu_bias_hu") or 0.0
        if bias is not None and abs(bias - input_bias) > HU_SHIFT_TOLERANCE_HU:
            lines.append(f"{name} shifts soft-tissue CT numbers by {bias - input_bias:+.1f} HU against its input "
                         f"(tolerance ±{HU_SHIFT_TOLERANCE_HU:g} HU; {bias:+.1f} HU against the reference).")
    input_bias = mean(NOISY, "roi_hu_bias_hu")
    if input_bias is not None and abs(input_bias) > HU_SHIFT_TOLERANCE_HU:
        lines.append(f"The noisy input itself differs from the reference by {input_bias:+.1f} HU in soft tissue: "
                     "a property of the data (scan or simulation), not of a denoiser.")
    return lines or ["No denoiser trades SSIM for PSNR, lowers PSNR, or shifts soft-tissue HU beyond "
                     f"±{HU_SHIFT_TOLERANCE_HU:g} HU against the noisy input."]


def summary_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the image-quality table: mean ± std per method, and the mean frequency of
    the NPS of each image (the reference's too) in the uniform ROIs."""
    header = ["method", *(title for _, title, _ in QUALITY_COLUMNS), "NPS mean freq of the image [1/mm]"]
    rows = []
    for name, results in [*_method_results(summary), (REFERENCE, summary["reference"])]:
        frequency = summary["nps"].get(name, {}).get("mean_frequency_per_mm")
        rows.append([name, *(_mean_std(results.get(key), d) for key, _, d in QUALITY_COLUMNS),
                     _mean_std({"mean": frequency}, 3)])
    return header, rows


def harm_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the do-no-harm table: mean ± std over slices per method (:data:`HARM_COLUMNS`)."""
    header = ["method", *(title for _, title, _ in HARM_COLUMNS)]
    rows = [[name, *(_mean_std(results.get(key), d) for key, _, d in HARM_COLUMNS)]
            for name, results in _method_results(summary)]
    return header, rows


def self_check_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the reference-free self-checks per method (:mod:`n2g_ct.quality.self_check`)."""
    header = ["method", "HU shift [HU]", "removed/noise power (worst band)", "edge ratio",
              "removed / noise std [HU]", "verdict"]
    rows = []
    for name, check in summary.get("self_checks", {}).items():
        verdict = "pass" if check["passed"] else "FAIL: " + "; ".join(check["failures"])
        rows.append([name, _number(check["hu_shift_hu"], 1, signed=True), _number(check["removed_noise_ratio"], 2),
                     _number(check["edge_ratio"], 2),
                     f"{_number(check['removed_std_hu'], 1)} / {_number(check['noise_std_hu'], 1)}", verdict])
    return header, rows


def _number(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [list(header), *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def render_text(summary: Mapping[str, Any]) -> str:
    """The image-quality, do-no-harm and self-check tables as fixed-width text (for the terminal)."""
    tables = [summary_table(summary), harm_table(summary)]
    if summary.get("self_checks"):
        tables.append(self_check_table(summary))
    return "\n\n".join(_text_table(*table) for table in tables)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def figure(width_in: float, height_in: float) -> Figure:
    """A matplotlib figure on the Agg canvas, outside pyplot (no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (100 dpi, tight bounding box)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _zoom_box(reference: np.ndarray) -> tuple[int, int, int]:
    """(row, column, side) of a square a quarter of the slice wide, centred on the tissue."""
    side = max(8, min(reference.shape) // 4)
    tissue = np.argwhere(reference > -500.0)
    centre = tissue.mean(axis=0) if len(tissue) else np.asarray(reference.shape) / 2
    row, col = (int(np.clip(c - side / 2, 0, n - side)) for c, n in zip(centre, reference.shape))
    return row, col, side


def example_figure_png(example: ExampleSlice, window: Window = DISPLAY_WINDOW,
                       difference_range_hu: float = DIFFERENCE_RANGE_HU) -> bytes:
    """PNG at full resolution (one image pixel per PNG pixel): per column an output or the reference;
    rows: the slice in ``window``, a zoomed crop (yellow box) in ``window`` and in the bone window,
    and the difference map (output − reference) on ±``difference_range_hu`` (the reference's
    column: its uniform ROIs)."""
    from matplotlib.patches import Rectangle

    names = [*example.outputs, REFERENCE]
    images = [*example.outputs.values(), example.reference]
    row, col, side = _zoom_box(example.reference)
    rows_px, cols_px = example.reference.shape
    width_in, height_in = cols_px / 100.0, rows_px / 100.0  # 100 dpi: one image pixel per PNG pixel
    left_in, top_in, gap_in = 0.3, 0.6, 0.05  # room for row labels, titles, and between rows
    fig_w, fig_h = left_in + width_in * len(names), top_in + 4 * height_in + 3 * gap_in
    fig = figure(fig_w, fig_h)
    axes = fig.subplots(4, len(names), squeeze=False)
    fig.subplots_adjust(left=left_in / fig_w, right=1.0, bottom=0.0, top=1.0 - top_in / fig_h, wspace=0.0,
                        hspace=gap_in / height_in)  # panels exactly the image's size
    for i, (name, image) in enumerate(zip(names, images)):
        crop = image[row : row + side, col : col + side]
        for ax, picture, shown in ((axes[0, i], image, window), (axes[1, i], crop, window),
                                   (axes[2, i], crop, BONE_WINDOW)):
            ax.imshow(picture, cmap="gray", vmin=shown.low, vmax=shown.high, interpolation="nearest")
        axes[0, i].add_patch(Rectangle((col - 0.5, row - 0.5), side, side, fill=False, edgecolor="yellow", linewidth=1))
        axes[0, i].set_title(name)
        bottom = axes[3, i]
        if name == REFERENCE:
            bottom.imshow(image, cmap="gray", vmin=window.low, vmax=window.high, interpolation="nearest")
            for r, c in example.roi_corners:
                bottom.add_patch(Rectangle((c - 0.5, r - 0.5), example.roi_size_px, example.roi_size_px,
                                           fill=False, edgecolor="lime", linewidth=0.8))
        else:
            bottom.imshow(np.asarray(image, np.float64) - example.reference, cmap="RdBu_r",
                          vmin=-difference_range_hu, vmax=difference_range_hu, interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for r, label in enumerate((f"{window.name} [{window.low:g}, {window.high:g}]", f"zoom, {window.name}",
                               f"zoom, {BONE_WINDOW.name} [{BONE_WINDOW.low:g}, {BONE_WINDOW.high:g}]",
                               f"− reference: blue −{difference_range_hu:g}, red +{difference_range_hu:g}")):
        axes[r, 0].set_ylabel(f"{label} HU", fontsize=8)
    fig.suptitle(f"{example.label}; reference column, bottom: its uniform ROIs", y=1.0 - 0.1 / fig_h, va="top")
    return png(fig)


def psnr_figure_png(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> bytes:
    """PNG: PSNR per slice against the slice's index in its low-dose series, a line per method and
    pair, one panel per window of :mod:`n2g_ct.quality.metrics`."""
    fig = figure(6.0 * len(WINDOWS), 3.6)
    axes = fig.subplots(1, len(WINDOWS), squeeze=False)
    pairs = sorted({int(r["pair"]) for r in rows})
    for ax, window in zip(axes[0], WINDOWS):
        for colour, method in enumerate(methods):
            for number, pair in enumerate(pairs):
                mine = [r for r in rows if r["method"] == method and int(r["pair"]) == pair]
                ax.plot([int(r["slice"]) for r in mine], [float(r[f"psnr_{window.name}"]) for r in mine],
                        marker=".", linewidth=1, color=f"C{colour}", label=method if number == 0 else None)
        ax.set_xlabel("slice index in the low-dose series" + (f" ({len(pairs)} pairs, a line each)" if len(pairs) > 1 else ""))
        ax.set_ylabel("PSNR [dB]")
        ax.set_title(f"{window.name} window [{window.low:g}, {window.high:g}] HU, range {window.data_range:g}")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return png(fig)


def self_check_figure_png(self_checks: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG: per method, the power it removes per ring of radial frequency against the input's own noise
    power (dashed), and their ratio (log scale, the failure limit dotted)."""
    from n2g_ct.quality.self_check import SelfCheckLimits

    fig = figure(11.0, 4.0)
    spectra, ratios = fig.subplots(1, 2)
    noise_drawn = False
    for name, check in self_checks.items():
        frequency, noise, removed = (np.asarray(check[k], float) for k in ("frequency_per_px", "noise_nps", "removed_nps"))
        if not noise_drawn:
            spectra.plot(frequency, noise, "k--", marker=".", label="input's own noise (uniform ROIs)")
            noise_drawn = True
        spectra.plot(frequency, removed, marker=".", label=f"{name}: removed (input − output)")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.plot(frequency, removed / noise, marker=".", label=name)
    ratios.axhline(SelfCheckLimits().max_removed_noise_ratio, color="red", linestyle=":", label="failure limit")
    ratios.axhline(1.0, color="black", linewidth=0.8)
    ratios.set_yscale("log")
    spectra.set_ylabel("power [HU²·pixel²]")
    ratios.set_ylabel("removed / noise power")
    for ax, title in ((spectra, "what each method removes, against the noise"), (ratios, "ratio per band")):
        ax.set_xlabel("radial frequency [cycles/pixel]")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png(fig)


def nps_figure_png(nps: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG: radially averaged NPS of each image (every output and the reference alike) in the
    uniform ROIs, with a band of ± 2 standard errors over slices; the ROI and slice counts in the legend."""
    fig = figure(6.4, 4.0)
    ax = fig.subplots()
    for name, curve in nps.items():
        frequency, value = np.asarray(curve["frequency_per_mm"]), np.asarray(curve["nps_hu2_mm2"])
        error = 2 * np.asarray(curve.get("stderr_hu2_mm2", np.zeros_like(value)))
        line, = ax.plot(frequency, value, "--" if name == REFERENCE else "-", marker=".",
                        label=f"{name} ({curve.get('rois', '?')} ROIs, {curve.get('slices', '?')} slices)")
        ax.fill_between(frequency, np.maximum(value - error, 0), value + error, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("spatial frequency [cycles/mm]")
    ax.set_ylabel("NPS [HU²·mm²]")
    ax.set_title("noise power spectrum of each image in the uniform ROIs (± 2 s.e.)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


# --------------------------------------------------------------------------------------------------
# Markdown and HTML
# --------------------------------------------------------------------------------------------------


def _protocol_lines(summary: Mapping[str, Any]) -> list[str]:
    protocol, data = summary["protocol"], summary["data"]
    windows = "; ".join(f"{w['name']} [{w['low_hu']:g}, {w['high_hu']:g}] HU, data range {w['data_range_hu']:g}"
                        for w in protocol["windows"])
    ssim = protocol["ssim"]
    rois = protocol["rois"]
    lines = [
        (f"Data: split {data['split'] or '(pairs given on the command line)'}, {data['pairs']} pair(s), "
         f"{data['slices']} slice(s) evaluated ({data['slice_selection']})."),
        f"Windows (images clipped to each): {windows}. Statistics over the field of view only.",
        f"PSNR: {protocol['psnr']}.",
        (f"SSIM: Gaussian window {ssim['window_size']}, σ {ssim['sigma']}, {ssim['covariance']} covariance, "
         f"{ssim['region']}; {ssim['implementation']}."),
        f"Uniform ROIs: {rois['rule']}",
        f"Noise std: {protocol['noise_std']}. HU bias: {protocol['hu_bias']}.",
        *(f"{name.capitalize()}: {protocol[name]}." for name in ("bone", "edges") if name in protocol),
        *([f"Self-checks: {protocol['self_checks']}."] if "self_checks" in protocol else []),
        f"NPS: {protocol['nps']}.",
        f"Denoisers run in {protocol['inference']['precision']} on {protocol['inference']['device']}.",
    ]
    if "bm3d" in protocol:
        lines.append(f"BM3D: {protocol['bm3d']}")
    lines.extend(f"Skipped: {note}" for note in summary["skipped"])
    return lines


def _method_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = []
    for method in summary["methods"]:
        text = f"{method['name']}: {method['description']}"
        if "sha256" in method:
            precision = f", precision {method['precision']}" if "precision" in method else ""
            text += f" (checkpoint {Path(method['checkpoint']).name}, SHA-256 {method['sha256']}{precision})"
        lines.append(text)
    return lines


def _figure_list(summary: Mapping[str, Any], examples: Sequence[ExampleSlice]) -> list[tuple[str, str]]:
    """(file name, caption) of each figure, in report order."""
    figures = [(f"example_{i}.png", f"Example: {example.label}") for i, example in enumerate(examples)]
    figures.append(("psnr_per_slice.png", "PSNR per slice"))
    if summary["nps"]:
        figures.append(("nps.png", "Noise power spectrum"))
    if summary.get("self_checks"):
        figures.append(("self_checks.png", "Reference-free self-checks: removed power against the input's noise"))
    return figures


@dataclass(frozen=True)
class Section:
    """One titled section of a report: a table (``header`` + ``rows``) and/or bullet ``lines``."""

    title: str
    header: Sequence[str] = ()
    rows: Sequence[Sequence[str]] = ()
    lines: Sequence[str] = ()


def markdown_document(title: str, intro: str, sections: Sequence[Section], figures: Sequence[tuple[str, str]]) -> str:
    """A Markdown report; ``figures`` are (file name in ``figures/``, caption), linked at the end."""
    lines = [f"# {title}", "", intro, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.header:
            lines += ["| " + " | ".join(section.header) + " |", "|" + "|".join("---" for _ in section.header) + "|",
                      *("| " + " | ".join(r) + " |" for r in section.rows), ""]
        if section.lines:
            lines += [*(f"- {line}" for line in section.lines), ""]
    lines += ["## Figures", ""]
    for name, caption in figures:
        lines.extend([f"![{caption}]({FIGURES_DIR}/{name})", ""])
    return "\n".join(lines)


def html_document(title: str, intro: str, sections: Sequence[Section], figures: Sequence[tuple[str, str, bytes]]) -> str:
    """The same report as one HTML file: ``figures`` are (file name, caption, PNG bytes), embedded as base64."""
    e = html.escape
    body = []
    for section in sections:
        body.append(f"<h2>{e(section.title)}</h2>")
        if section.header:
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in section.header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in section.rows)
                        + "</table>")
        if section.lines:
            body.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in section.lines) + "</ul>")
    images = "".join(
        f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for _, caption, png in figures
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>{e(title)}</h1><p>{e(intro)}</p>{''.join(body)}<h2>Figures</h2>{images}</body></html>\n"
    )


def _evaluation_sections(summary: Mapping[str, Any]) -> tuple[str, list[Section]]:
    return (f"n2g-ct {summary['n2g_ct_version']}, {summary['created_utc']}.",
            [Section("Findings", lines=findings(summary)),
             Section("Image quality (mean ± std over slices)", *summary_table(summary)),
             Section("Do no harm: errors in soft tissue, bone and at edges (mean ± std over slices)",
                     *harm_table(summary)),
             *([Section("Reference-free self-checks on the low-dose slices (what n2g-ct denoise checks)",
                        *self_check_table(summary))] if summary.get("self_checks") else []),
             Section("Methods", lines=_method_lines(summary)),
             Section("Protocol", lines=_protocol_lines(summary))])


def render_markdown(summary: Mapping[str, Any], figures: Sequence[tuple[str, str]]) -> str:
    """The evaluation's Markdown report; ``figures`` are (file name in ``figures/``, caption)."""
    return markdown_document(EVALUATION_TITLE, *_evaluation_sections(summary), figures)


def render_html(summary: Mapping[str, Any], figures: Sequence[tuple[str, str, bytes]]) -> str:
    """The evaluation's HTML report, one file: ``figures`` are (file name, caption, PNG bytes)."""
    return html_document(EVALUATION_TITLE, *_evaluation_sections(summary), figures)


EVALUATION_TITLE = "n2g-ct evaluation report"


def write_report(out_dir: Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                 examples: Sequence[ExampleSlice]) -> None:
    """Write ``figures/*.png``, ``report.md`` and ``report.html`` into ``out_dir``."""
    figures = _figure_list(summary, examples)
    methods = [m["name"] for m in summary["methods"]]
    pngs = [example_figure_png(example) for example in examples]
    pngs.append(psnr_figure_png(rows, methods))
    if summary["nps"]:
        pngs.append(nps_figure_png(summary["nps"]))
    if summary.get("self_checks"):
        pngs.append(self_check_figure_png(summary["self_checks"]))
    (out_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    for (name, _), png in zip(figures, pngs):
        (out_dir / FIGURES_DIR / name).write_bytes(png)
    write_text_atomic(out_dir / "report.md", render_markdown(summary, figures))
    write_text_atomic(out_dir / "report.html", render_html(summary, [(n, c, p) for (n, c), p in zip(figures, pngs)]))


def learning_curves_png(runs: Mapping[str, Path], score: str = "psnr_display",
                        label: str = "validation PSNR (dB), window [-160, 240] HU") -> bytes | None:
    """Validation ``score`` (a column of ``validation.csv``) against training minutes and steps, a line per run.

    Args:
        runs: run name → training run folder (``train_log.csv``, ``validation.csv``).
        score: the column to plot; ``label``: its axis label.

    Returns:
        PNG bytes, or None when no run has validation rows yet.
    """
    curves = {}
    for name, run_dir in runs.items():
        log_path, train_log = RunFolder(run_dir).validation_log, RunFolder(run_dir).train_log
        if not log_path.exists() or not train_log.exists():
            continue
        with open(train_log, newline="") as f:
            minutes = {0: 0.0} | {int(r["step"]): float(r["time_s"]) / 60 for r in csv.DictReader(f)}
        with open(log_path, newline="") as f:
            rows = [(int(r["step"]), float(r[score])) for r in csv.DictReader(f)]
        curves[name] = [(step, minutes.get(step), value) for step, value in rows]
    if not curves:
        return None
    fig = figure(11, 4)
    by_minutes, by_steps = fig.subplots(1, 2)
    for name, points in curves.items():
        by_steps.plot([p[0] for p in points], [p[2] for p in points], marker=".", label=name)
        timed = [p for p in points if p[1] is not None]
        by_minutes.plot([p[1] for p in timed], [p[2] for p in timed], marker=".", label=name)
    for axis, x_label in ((by_minutes, "training time (min)"), (by_steps, "optimiser steps")):
        axis.set_xlabel(x_label)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    return png(fig)
