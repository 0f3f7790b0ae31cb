"""The run report and the neuron report in a real headless Chromium.

For a conv model (channels) and a dense one (units): no console errors; the verdict
section fits one 1400x900 screen; every image loads (including the sprite sheets the
unit panels cut their thumbnails from); clicking a unit in the index shows its panel;
the pages use no external URL, stay under 5 MB and still work from a copied folder.
The checks run inside the page (a script appended to a copy of it writes its findings
into the DOM, which `--dump-dom` prints after `--virtual-time-budget`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_neuron_report_browser import CHROMIUM, chromium, console_errors

from catneuron import report
from evals.neurons import cli as neurons
from pretrain import build_model
from pretrain.export import write_export

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
PRE = {"resize": 32, "crop": 32, "grayscale": False, "mean": [0.5], "std": [0.25]}
MAX_BYTES = 5 * 2**20

CHECK = """
<script>
function finish(extra){
  const imgs=[...document.images];
  const out={images:imgs.length, broken:imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.alt||i.src.slice(0,40)),
             width:document.documentElement.scrollWidth, ...extra};
  const v=document.getElementById('verdict'); if(v) out.verdict_bottom=v.getBoundingClientRect().bottom;
  const pre=document.createElement('pre'); pre.id='check-result'; pre.textContent=JSON.stringify(out);
  document.body.appendChild(pre);
}
window.addEventListener('load',()=>{
  for(const d of document.querySelectorAll('details')) d.open=true;
  const row=document.querySelector('#index tbody tr');
  if(!row){setTimeout(()=>finish({}),500);return;}
  row.click();
  const p=document.getElementById('unit-panel');
  setTimeout(()=>finish({clicked:row.dataset.id, panel_hidden:p.hidden, panel_unit:p.dataset.shown,
    thumbs:p.querySelectorAll('.thumb img').length, panel_svg:p.querySelectorAll('svg rect').length,
    rows:document.querySelectorAll('#index tbody tr').length}),1500);
});
</script>
"""


def check_page(page: Path) -> dict:
    """Console errors of the page itself, then the in-page findings of a checked copy."""
    done = chromium(page, "--dump-dom", "--window-size=1400,900", "--virtual-time-budget=5000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert console_errors(done.stderr) == [], console_errors(done.stderr)
    probe = page.with_name("checked-" + page.name)
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    done = chromium(probe, "--dump-dom", "--window-size=1400,900", "--virtual-time-budget=8000")
    assert console_errors(done.stderr) == [], console_errors(done.stderr)
    found = re.search(r'<pre id="check-result">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    probe.unlink()
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def assert_self_contained(page: Path) -> None:
    text = page.read_text()
    assert page.stat().st_size < MAX_BYTES, page.stat().st_size
    urls = re.findall(r"""(?:src|href)=["']?(https?:|//)""", text)
    assert urls == [], urls
    assert "url(http" not in text and "@import" not in text


def make_run(root: Path, model_name: str, **kwargs) -> Path:
    torch.manual_seed(0)
    model = build_model(model_name, **kwargs)
    run = root / "run"
    write_export(
        model.state_dict(),
        model.spec,
        run / "exports" / "step_3",
        stage=0,
        step=3,
        config_hash="t",
        preprocess=PRE,
    )
    argv = [str(run), "--data", "synth:cat?n=24", "--concept", "synth:cat?n=32"]
    argv += ["--top", "4", "--show", "6", "--stimulus-units", "2", "--stimulus-steps", "5"]
    assert neurons.main([*argv, "--quiet", "--no-tensorboard"]) == 0
    probe = run / "evals" / "probe-3"
    probe.mkdir(parents=True)
    layers = {"block1": 0.75, "block2": 0.8} if model_name == "conv_ae" else {"layer1": 0.7}
    top1 = lambda v: {"probe": {"top1": v}}  # noqa: E731
    curve = {"0.1": {"mean": 0.6, "std": 0.02}, "1": {"mean": 0.7, "std": 0.01}}
    (probe / "metrics.json").write_text(
        json.dumps(
            {
                "data": {"n_test": 300},
                "chance": {"top1": 0.5},
                "sources": {
                    "export": {"layers": {k: top1(v) for k, v in layers.items()}},
                    "random_init": {"layers": {k: top1(0.6) for k in layers}},
                    "pixels": {"layers": {"pixels": top1(0.62)}},
                },
                "label_fraction": {"layer": list(layers)[0], "curves": {"export": curve}},
            }
        )
    )
    return run


MODELS = {
    "conv channels": ("conv_ae", {"channels": [4, 8], "greedy": False}),
    "dense units": ("stacked_ae", {"input_shape": [3, 32, 32], "hidden": [48, 16]}),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_reports_in_chromium(tmp_path, family):
    name, kwargs = MODELS[family]
    run = make_run(tmp_path, name, **kwargs)
    assert report.main([str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "probe_table" in metrics and "filters" in metrics

    page = run / "report.html"
    assert_self_contained(page)
    found = check_page(page)
    assert found["broken"] == [] and found["images"] >= 6, found
    assert found["verdict_bottom"] <= 900, found  # the verdict is the first screen
    assert found["width"] <= 1400, found

    units = run / "evals" / "neurons-3" / "report.html"
    assert_self_contained(units)
    found = check_page(units)
    assert found["broken"] == [] and found["images"] >= 4, found
    assert found["panel_hidden"] is False and found["panel_unit"] == found["clicked"], found
    assert found["thumbs"] >= 4 and found["panel_svg"] > 0, found
    n_units = sum(
        len(layer["per_unit"]["mean"]) for layer in metrics["neurons"]["metrics"]["layers"].values()
    )
    assert found["rows"] == 2 * n_units  # trained and random weights, side by side

    copy = tmp_path / "copied"
    shutil.copytree(units.parent, copy)
    found = check_page(copy / "report.html")
    assert found["broken"] == [] and found["thumbs"] >= 4, found
