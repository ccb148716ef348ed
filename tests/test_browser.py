"""The HTML report renders in a real browser, offline: headless Chromium screenshots of the
report index (static Pareto PNGs), the executed Pareto notebook page (interactive plotly
figure, plotly.js embedded) and a standalone plotly figure (plotly.js beside it).

The Pareto notebook runs through :func:`prunelib.demo.execute` (what ``make demo`` runs) on a
store filled with a few synthetic speedup / quality-loss rows; skipped without Chromium
(``make setup-browser`` installs it).
"""
import shutil
import subprocess

import numpy as np
import pytest

from prunelib.core.store import ResultsStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make setup-browser)")]

# one colour per taxonomy cell (prunelib.results.plots): static depth and static width, in plotly and matplotlib
PLOTLY_COLOURS = [(0x2C, 0xA0, 0x2C), (0xE3, 0x77, 0xC2)]
MPL_COLOURS = PLOTLY_COLOURS  # tab10's C2 and C6 are the same two colours


def fill_store():
    rows = []
    points = [("shortgpt", "static_depth", 0.1, 1.10, 3.0), ("shortgpt", "static_depth", 0.25, 1.30, 12.0),
              ("width_flap", "static_width", 0.1, 1.05, 1.5), ("width_flap", "static_width", 0.25, 1.20, 6.0)]
    for i, (method, cell, s, speed, loss) in enumerate(points):
        base = dict(model="smollm2-135m", cell=cell, method=method, sparsity=s, device="cpu", dtype="float32")
        for phase in ("prefill", "decode"):
            rows.append(dict(base, phase=phase, batch=1, length=512, metric="speedup", value=speed,
                             ci_low=speed - 0.03, ci_high=speed + 0.03, bound=speed + 0.1, n=10,
                             config_hash=f"speed{i}{phase}"))
        rows.append(dict(base, phase="quality", metric="quality_loss_pct", value=loss, ci_low=loss - 1,
                         ci_high=loss + 1, config_hash=f"loss{i}", extra={"stderr": 0.5}))
    ResultsStore().append(rows)


def screenshot(page, png, height=900):
    """Headless Chromium with the network off (every host name fails to resolve: a CDN script cannot load); the
    virtual-time budget lets the page's scripts finish before the shot."""
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
                    "--virtual-time-budget=15000", f"--screenshot={png}", f"--window-size=1200,{height}",
                    page.as_uri()], check=True, capture_output=True, timeout=180)
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def pixels_near(img, rgb, tol=30) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


def assert_plot_drawn(img, colours, what):
    assert img.reshape(-1, 3).std(axis=0).max() > 10, f"{what}: the screenshot is one flat colour"
    for rgb in colours:
        assert pixels_near(img, rgb) >= 30, f"{what}: no plot drawn in colour {rgb}"


def isolated(mp, tmp):
    """Results and figures under ``tmp``; no PLOTLY_RENDERER (the notebook's first cell chooses the renderers)."""
    mp.setenv("PRUNELIB_RESULTS", str(tmp / "results"))
    mp.setenv("PRUNELIB_FIGURES", str(tmp / "fig"))
    mp.delenv("PLOTLY_RENDERER", raising=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from prunelib import demo
    from prunelib import report as rep

    tmp = tmp_path_factory.mktemp("browser")
    mp = pytest.MonkeyPatch()
    try:
        isolated(mp, tmp)
        fill_store()
        (tmp / "exec").mkdir()
        demo.execute("pareto", tmp / "exec", {}, progress_bar=False)
        yield rep.build(tmp / "exec", tmp / "fig", tmp / "report").parent
    finally:
        mp.undo()


def test_index_shows_the_static_pareto_figures(report, tmp_path):
    text = (report / "index.html").read_text()
    assert 'href="pareto.html"' in text and "<img" in text
    assert_plot_drawn(screenshot(report / "index.html", tmp_path / "index.png"), MPL_COLOURS, "report index")


def test_pareto_page_renders_its_plotly_figure_offline(report, tmp_path):
    page = (report / "pareto.html").read_text()
    assert "plotly.js v" in page, "plotly.js is not embedded in the executed Pareto notebook"
    assert not any(f'src="{u}' in page for u in ("https://cdn.plot.ly", "http://cdn.plot.ly"))
    # the first figure starts ~750 px down the page: a taller window shows all of it
    img = screenshot(report / "pareto.html", tmp_path / "pareto.png", height=1400)
    assert_plot_drawn(img[700:], PLOTLY_COLOURS, "Pareto page")


def test_standalone_plotly_figure_renders_offline(report, tmp_path):
    figs = sorted((report / "figures").glob("pareto_prefill_*.html"))
    assert figs and (report / "figures" / "plotly.min.js").exists()
    assert_plot_drawn(screenshot(figs[0], tmp_path / "fig.png"), PLOTLY_COLOURS, figs[0].name)


def nbconvert_html(executed, out):
    """A plain ``jupyter nbconvert --to html`` of an executed notebook (not make report)."""
    subprocess.run(["jupyter", "nbconvert", "--to", "html", str(executed), "--output-dir", str(out.parent),
                    "--output", out.stem], check=True, capture_output=True, timeout=300)
    return out


def plotly_outputs(executed):
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "application/vnd.plotly.v1+json" in o.get("data", {})]


def plain_papermill(name, out, params=None):
    """``notebooks/<name>.ipynb`` executed by plain papermill (no make demo, no PLOTLY_RENDERER) into ``out``."""
    import os

    import papermill as pm

    from prunelib.core.config import REPO_ROOT

    pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params or {},
                        cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                        env=dict(os.environ))
    return out


@pytest.fixture(scope="module")
def plain_pareto(tmp_path_factory):
    """The Pareto notebook executed by plain papermill on a small store."""
    tmp = tmp_path_factory.mktemp("plain")
    mp = pytest.MonkeyPatch()
    try:
        isolated(mp, tmp)
        fill_store()
        yield plain_papermill("pareto", tmp / "pareto.ipynb")
    finally:
        mp.undo()


def test_plain_papermill_and_nbconvert_show_the_pareto_figure_offline(plain_pareto, tmp_path):
    outs = plotly_outputs(plain_pareto)
    assert outs, "the executed Pareto notebook shows no plotly figure"
    for o in outs:  # JupyterLab's interactive figure, HTML for nbconvert, a static fallback
        assert {"text/html", "image/png"} <= set(o["data"]), sorted(o["data"])
    page = nbconvert_html(plain_pareto, tmp_path / "pareto.html")
    text = page.read_text()
    assert "plotly.js v" in text and text.count("plotly.js v") == 1  # plotly.js embedded once per page
    img = screenshot(page, tmp_path / "p.png", height=1600)
    assert_plot_drawn(img[600:], PLOTLY_COLOURS, "nbconvert Pareto page")



def test_an_axis_notebook_shows_its_curves_offline(tmp_path):
    """static_depth executed by plain papermill (a tiny run: one method and its random baseline, fidelity as the
    quality axis), exported by nbconvert: its plotly curve figure draws with the network off."""
    mp = pytest.MonkeyPatch()
    try:
        isolated(mp, tmp_path)
        out = plain_papermill("static_depth", tmp_path / "static_depth.ipynb",
                              dict(methods=["last_n", "depth_random"], sparsities=[0.1], lengths=[32], reps=2,
                                   quality_preset=None, calib_n=4, calib_len=32))
    finally:
        mp.undo()
    outs = plotly_outputs(out)
    assert outs and all({"text/html", "image/png"} <= set(o["data"]) for o in outs)
    page = nbconvert_html(out, tmp_path / "static_depth.html")
    img = screenshot(page, tmp_path / "s.png", height=4000)
    assert_plot_drawn(img, PLOTLY_COLOURS[:1], "static_depth page")
