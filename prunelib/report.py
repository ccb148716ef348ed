"""``make report``: executed notebooks to HTML, figures beside them, one index page. Zip and send.

:func:`route_logs`, called in every notebook's first cell, keeps what is sent readable:
library logs and progress bars written to stderr (lm-eval's per-request bars, its
"Overwriting default num_fewshot" warnings, transformers' and torch's warnings) go to a log
file beside the executed notebook instead of into its outputs; and it sets plotly's renderers
(:func:`notebook_figures`) so that figures survive HTML export offline, with a PNG fallback.
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import shutil
import sys
from pathlib import Path

from prunelib.core.config import REPO_ROOT

LOG_ENV = "PRUNELIB_LOG"  # set by prunelib.demo to <executed notebook>.log before the kernel starts


def route_logs(path: str | os.PathLike | None = None) -> None:
    """Send this process's stderr, Python logging and warnings to ``path`` from now on, and say where.

    ``path`` defaults to ``$PRUNELIB_LOG`` (``make demo`` sets it beside each executed
    notebook), else ``build/notebooks/interactive.log``. Exceptions still show in the
    notebook (they are not written to stderr), and so do ``tqdm.auto`` progress bars,
    which a notebook draws as widgets (libraries' own bars are switched off). The file is
    appended to, line-buffered.
    """
    path = Path(path or os.environ.get(LOG_ENV) or REPO_ROOT / "build" / "notebooks" / "interactive.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the kernel)
    old = {id(sys.stderr), id(sys.__stderr__)}
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for handler in (h for lg in loggers for h in lg.handlers):
        if type(handler) is logging.StreamHandler and id(handler.stream) in old:
            handler.setStream(log)
    sys.stderr = log  # warnings, tqdm's default file and logging's last-resort handler write here
    _quiet_library_bars()
    try:  # C-level writes (torch, tokenizers) too, where the process has a real stderr descriptor
        os.dup2(log.fileno(), 2)
    except OSError:
        pass
    print(f"library logs: {path}")
    notebook_figures()


def static_export() -> bool:
    """Whether plotly figures can be exported as PNG here: kaleido and a Chromium it can drive."""
    try:
        import kaleido  # noqa: F401  (only whether it is installed)
    except ImportError:
        return False
    return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")) or \
        bool(os.environ.get("BROWSER_PATH"))


def notebook_figures() -> str:
    """Make every plotly figure a notebook shows carry outputs that render anywhere: plotly's own mimetype
    (JupyterLab keeps its interactive figure), HTML with plotly.js embedded once per notebook (nbconvert's HTML,
    ``make report``, offline), and, where kaleido and Chromium are installed, a PNG fallback. ``PLOTLY_RENDERER``
    overrides it. Returns the renderer set."""
    import plotly.io as pio

    names = ["plotly_mimetype", "notebook"] + (["png"] if static_export() else [])
    pio.renderers.default = os.environ.get("PLOTLY_RENDERER") or "+".join(names)
    return pio.renderers.default


def _quiet_library_bars() -> None:
    """Hide the progress bars libraries draw as notebook widgets (weights loading, dataset preparation):
    a long cell shows prunelib's one bar, not one per library step."""
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def build(executed: Path, figures: Path, out: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    notebooks = sorted(executed.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no executed notebooks in {executed}: run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    pages = []
    for nb_path in notebooks:
        body, _ = exporter.from_notebook_node(nbformat.read(nb_path, as_version=4))
        page = out / f"{nb_path.stem}.html"
        page.write_text(body, encoding="utf-8")
        pages.append(page.name)
    fig_out = out / "figures"
    if figures.exists():
        shutil.copytree(figures, fig_out, dirs_exist_ok=True)
    figs = sorted(p.name for p in fig_out.glob("*") if p.suffix in (".png", ".svg", ".html")) if fig_out.exists() else []
    items = "\n".join(f'<li><a href="{html.escape(p)}">{html.escape(p[:-5])}</a></li>' for p in pages)
    fig_items = "\n".join(
        f'<li><a href="figures/{html.escape(f)}">{html.escape(f)}</a></li>' for f in figs)
    imgs = "\n".join(f'<figure><img src="figures/{html.escape(f)}" width="560"><figcaption>{html.escape(f)}</figcaption></figure>'
                     for f in figs if f.endswith(".png") and f.startswith("pareto"))
    (out / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>prunelib report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}</style></head><body>
<h1>prunelib report</h1><h2>Notebooks</h2><ul>{items}</ul>
<h2>Pareto frontiers</h2>{imgs or '<p>no Pareto figure yet</p>'}
<h2>All figures</h2><ul>{fig_items}</ul></body></html>""", encoding="utf-8")
    return out / "index.html"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--executed", default=str(REPO_ROOT / "build" / "notebooks"))
    p.add_argument("--figures", default=str(REPO_ROOT / "figures"))
    p.add_argument("--out", default=str(REPO_ROOT / "report"))
    a = p.parse_args(argv)
    print("report:", build(Path(a.executed), Path(a.figures), Path(a.out)))


if __name__ == "__main__":
    main()
