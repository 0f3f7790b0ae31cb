"""`catneuron report RUN`: the page and its metrics.json agree, and missing parts are named."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from catneuron import report
from pretrain.export import write_export
from pretrain.models import build_model

FIGURE = re.compile(r'<span class="fig" data-key="([^"]*)">([^<]*)</span>')


def page_figures(page: str) -> list[tuple[list, str]]:
    """Every tagged number of a report page: (key path in metrics.json, text shown)."""
    return [(json.loads(html.unescape(key)), text) for key, text in FIGURE.findall(page)]


def assert_figures_match(run: Path) -> int:
    """Each number on RUN/report.html equals the value at its key path in RUN/metrics.json."""
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    figures = page_figures(page)
    for path, text in figures:
        value = metrics
        for key in path:
            value = value[key]
        if isinstance(value, float):
            assert float(text) == pytest.approx(value, rel=1e-3, abs=1e-9), (path, text, value)
        else:
            assert text == str(value), (path, text, value)
    return len(figures)


def make_run(root: Path, steps: int = 40) -> Path:
    """A run directory as the trainer leaves it: TensorBoard events (two greedy stages,
    losses, images) and one export, with no evals."""
    run = root / "runs" / "toy"
    writer = SummaryWriter(str(run / "tb"))
    for step in range(5, steps + 1, 5):
        stage = 0 if step <= steps // 2 else 1
        writer.add_scalar("stage", stage, step)
        writer.add_scalar("train/loss", 1.0 / step + stage, step)
        writer.add_scalar("train/recon", 0.5 / step, step)
        writer.add_scalar("perf/images_per_s", 100.0 + step, step)
    writer.add_images("images/input_recon", torch.rand(4, 3, 8, 8), steps)
    writer.add_images("images/filters", torch.rand(4, 1, 4, 4), steps)
    writer.close()
    model = build_model("stacked_ae", input_shape=[1, 4, 4], hidden=[3])
    write_export(
        model.state_dict(),
        model.spec,
        run / "exports" / f"step_{steps}",
        stage=1,
        step=steps,
        config_hash="0" * 16,
    )
    (run / "config.json").write_text(json.dumps({"model": {"name": "stacked_ae"}}))
    return run


def test_report_without_evals_writes_the_training_part_and_names_what_is_missing(tmp_path, capsys):
    run = make_run(tmp_path)
    assert report.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "missing probe evals" in out and "missing neurons evals" in out
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["training"]["stages"]] == [0, 1]
    assert metrics["training"]["stages"][1]["start_step"] == 25
    assert metrics["training"]["steps"] == 40
    assert metrics["training"]["final"]["train/loss"] == pytest.approx(1.0 / 40 + 1)
    assert metrics["export"]["step"] == 40
    # reconstructions, the export's filters as a square grid, TensorBoard's filters (raw)
    assert "<svg" in page and page.count("data:image/png;base64,") == 3
    assert metrics["filters"] == {
        "tensor": "layers.0.encoder.weight",
        "shown": 3,
        "units": 3,
        "kernel": [1, 4, 4],
    }
    assert "catneuron probe" in page and "catneuron neurons" in page
    assert assert_figures_match(run) >= 8


def test_report_embeds_and_links_the_latest_evals(tmp_path):
    run = make_run(tmp_path)
    for step, acc in ((20, 0.6), (40, 0.875)):
        probe = run / "evals" / f"probe-{step}"
        probe.mkdir(parents=True)
        (probe / "metrics.json").write_text(
            json.dumps({"layers": {"layer1": {"top1": acc, "random_init": {"top1": 0.55}}}})
        )
    neurons = run / "evals" / "neurons-40"
    neurons.mkdir(parents=True)
    (neurons / "metrics.json").write_text(json.dumps({"best": {"heldout": 0.8125, "auroc": 0.9}}))
    (neurons / "report.html").write_text("<html></html>")
    report.write_report(run)
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["probe"]["dir"] == "evals/probe-40"
    assert metrics["probe"]["metrics"]["layers"]["layer1"]["top1"] == 0.875
    assert "0.875" in page and "0.8125" in page
    assert 'href="evals/neurons-40/report.html"' in page
    assert not any("evals" in what for what, _ in metrics["missing"])
    assert assert_figures_match(run) >= 10


def test_report_on_something_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catneuron report: ") and "no such run directory" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.html").exists()


def test_curves_are_svg_on_a_log_axis_when_values_are_positive():
    svg = report.svg_curves({"loss": [(0, 100.0), (10, 1.0)]}, [5])
    assert svg.startswith("<svg") and "stroke-dasharray" in svg and ">100<" in svg
    assert "no values" in report.svg_curves({"loss": []})


def test_demo_headlines_are_tagged_figures_of_metrics_json(tmp_path):
    run = make_run(tmp_path)
    head = {"unit": "layer2 #7", "heldout": 0.6875, "auroc": 0.75, "le": 0.7, "images": 300}
    head |= {"random_heldout": 0.5625, "random_auroc": 0.6, "random_le": 0.65, "chance": 0.5}
    probe = {"cat vs no cat": {"layer": "layer2", "top1": 0.8125, "random_init": 0.7,
                               "raw_pixels": 0.65, "chance": 0.5}}  # fmt: skip
    grouped = {"layer": "layer2", "unit": 7, "members": [7, 3, 11], "heldout": 0.7188}
    grouped |= {"auroc": 0.8, "random_heldout": 0.53125, "random_auroc": 0.55}
    extra = {"headline": head, "probe_headline": probe, "grouped_unit": grouped}
    report.write_report(run, extra=extra)
    page = (run / "report.html").read_text()
    assert "The cat unit" in page and "layer2 #7" in page and "0.6875" in page
    assert "Linear probes" in page and "0.8125" in page
    assert "channels #7, #3, #11" in page and "0.7188" in page
    keys = [tuple(path) for path, _ in page_figures(page)]
    assert ("headline", "random_heldout") in keys and ("grouped_unit", "random_auroc") in keys
    assert ("probe_headline", "cat vs no cat", "raw_pixels") in keys
    assert assert_figures_match(run) >= 15


def test_probe_table_intervals_and_the_ablation_table_are_tagged_figures(tmp_path):
    run = make_run(tmp_path)
    probe = run / "evals" / "probe-40"
    probe.mkdir(parents=True)
    top1 = lambda v: {"probe": {"top1": v}}  # noqa: E731
    (probe / "metrics.json").write_text(
        json.dumps(
            {
                "data": {"n_test": 200},
                "chance": {"top1": 0.5},
                "sources": {
                    "export": {"layers": {"layer1": top1(0.75)}},
                    "random_init": {"layers": {"layer1": top1(0.6)}},
                    "pixels": {"layers": {"pixels": top1(0.65)}},
                },
            }
        )
    )
    rows = [
        {
            "name": "sparse",
            "trained": {"best_layer": "layer1", "le": 0.7, "heldout": 0.68, "auroc": 0.72},
            "random": {"best_layer": "layer1", "le": 0.6, "heldout": 0.58, "auroc": 0.61},
            "chance": 0.5,
        }
    ]
    (run / "ablation.json").write_text(json.dumps(rows))
    report.write_report(run)
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    cell = metrics["probe_table"]["cat vs no cat"]["layers"]["layer1"]["trained"]
    assert cell["key"] == "probe/metrics/sources/export/layers/layer1/probe/top1"
    assert cell["lo"] == pytest.approx(0.6855, abs=1e-3) and cell["hi"] == pytest.approx(
        0.8049, abs=1e-3
    )
    assert metrics["ablation"]["rows"] == rows and "Ablation" in page
    keys = [tuple(path) for path, _ in page_figures(page)]
    assert ("ablation", "rows", 0, "trained", "auroc") in keys
    assert ("probe_table", "cat vs no cat", "layers", "layer1", "raw_pixels", "hi") in keys
    assert assert_figures_match(run) >= 20
