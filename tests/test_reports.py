"""Report writers: strict JSON, tables with mean ± std, escaped self-contained HTML, figures as PNG."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from n2g_ct.evaluation.reports import (
    ExampleSlice,
    example_figure_png,
    nps_figure_png,
    psnr_figure_png,
    render_html,
    render_markdown,
    render_text,
    write_csv,
    write_json,
)

PNG = b"\x89PNG"


def stats(mean: float, std: float | None) -> dict:
    return {"mean": mean, "std": std, "n": 3}


def summary(skipped: tuple[str, ...] = ()) -> dict:
    """The smallest summary in the layout :mod:`n2g_ct.evaluation.evaluate` writes."""
    return {
        "n2g_ct_version": "0.0.test",
        "created_utc": "2026-01-01T00:00:00Z",
        "data": {"split": "unit", "pairs": 1, "slices": 3, "slices_available": 3, "slice_selection": "all"},
        "protocol": {
            "windows": [{"name": "display", "low_hu": -160.0, "high_hu": 240.0, "data_range_hu": 400.0}],
            "psnr": "p", "ssim": {"window_size": 11, "sigma": 1.5, "covariance": "population", "region": "whole slice",
                                  "implementation": "monai"},
            "rois": {"rule": "r"}, "noise_std": "n", "hu_bias": "b", "nps": "s",
            "inference": {"precision": "fp32", "device": "cpu"},
        },
        "methods": [{"name": "noisy", "description": "input"},
                    {"name": "n2g", "description": "denoiser", "checkpoint": "/runs/x/model.pt", "sha256": "ab" * 32}],
        "skipped": list(skipped),
        "results": {"noisy": {"psnr_display": stats(21.5, 0.25), "roi_hu_bias_hu": stats(float("nan"), None)},
                    "n2g": {"psnr_display": stats(26.75, 1.0)}},
        "reference": {"roi_noise_std_hu": stats(12.0, 2.0)},
        "nps": {},
    }


def test_json_is_strict_with_non_finite_numbers_as_null(tmp_path):
    write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=pytest.fail) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_csv_rows_round_floats_and_keep_column_order(tmp_path):
    write_csv(tmp_path / "t.csv", [{"method": "noisy", "psnr": 21.123456789, "slice": 3}], ("method", "slice", "psnr"))
    assert (tmp_path / "t.csv").read_text() == "method,slice,psnr\nnoisy,3,21.1235\n"


def test_tables_show_mean_and_std_with_a_dash_for_missing_values():
    text = render_text(summary())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["method", "PSNR", "display", "[dB]"]
    assert "21.50 ± 0.25" in lines[1] and "26.75 ± 1.00" in lines[2]
    assert lines[3].startswith("reference") and "12.0 ± 2.0" in lines[3]
    assert "–" in lines[1], "NaN bias and missing metrics show as a dash"


def test_html_is_self_contained_and_escaped_and_markdown_links_figures():
    note = "BM3D: <b>not installed</b>"
    html = render_html(summary((note,)), [("psnr.png", "PSNR per slice", PNG + b"data")])
    assert '<img alt="PSNR per slice" src="data:image/png;base64,iVBOR2RhdGE=">' in html
    assert "&lt;b&gt;not installed&lt;/b&gt;" in html and "<b>" not in html
    assert "model.pt" in html and "/runs/x" not in html, "checkpoint named by file, hash shown"
    markdown = render_markdown(summary(), [("psnr.png", "PSNR per slice")])
    assert "![PSNR per slice](figures/psnr.png)" in markdown and "| n2g | 26.75 ± 1.00 |" in markdown


def test_figures_render_as_png():
    rng = np.random.default_rng(0)
    reference = np.full((48, 48), 40.0)
    example = ExampleSlice("pair 0, slice 5", {"noisy": reference + rng.normal(0, 30, reference.shape),
                                               "n2g": reference + 2.0}, reference, np.array([[8, 8], [24, 8]]), 8)
    assert example_figure_png(example).startswith(PNG)
    rows = [{"method": m, "pair": 0, "slice": 7 + i, "psnr_display": 20.0 + i, "psnr_full": 40.0 + i}
            for i in range(3) for m in ("noisy", "n2g")]
    assert psnr_figure_png(rows, ["noisy", "n2g"]).startswith(PNG)
    curve = {"frequency_per_mm": [0.1, 0.2], "nps_hu2_mm2": [30.0, 10.0]}
    assert nps_figure_png({"noisy": curve, "reference": curve}).startswith(PNG)


def _summary_with(results: dict) -> dict:
    return {"methods": [{"name": name} for name in results], "results": results}


def test_findings_say_when_a_denoiser_trades_ssim_for_psnr_or_shifts_hu():
    def stats(psnr, ssim, bias=0.0):
        return {"psnr_display": {"mean": psnr}, "ssim_display": {"mean": ssim}, "roi_hu_bias_hu": {"mean": bias}}

    from n2g_ct.evaluation.reports import findings

    lines = findings(_summary_with({"noisy": stats(20.0, 0.80), "smooth": stats(23.0, 0.78),
                                    "shifted": stats(22.0, 0.85, bias=-7.5), "good": stats(24.0, 0.9, bias=1.0)}))
    text = "\n".join(lines)
    assert "smooth raises PSNR (display window) by 3.00 dB" in text and "lowers SSIM by 0.0200" in text
    assert "shifted shifts soft-tissue CT numbers by -7.5 HU against its input" in text
    assert "good" not in text
    assert findings(_summary_with({"noisy": stats(20.0, 0.8), "good": stats(24.0, 0.9)}))[0].startswith("No denoiser")


def test_example_slices_are_drawn_at_full_resolution():
    from matplotlib.image import imread

    reference = np.full((200, 160), 40.0)
    example = ExampleSlice("pair 0, slice 5", {"noisy": reference + 30.0, "n2g": reference}, reference,
                           np.array([[8, 8]]), 16)
    image = imread(io.BytesIO(example_figure_png(example)))
    assert image.shape[1] >= 3 * 160 and image.shape[0] >= 4 * 200, "one image pixel per PNG pixel, 4 rows"
