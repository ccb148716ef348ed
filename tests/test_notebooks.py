"""Every notebook runs under papermill with tiny parameters and produces what it promises."""
import json
from pathlib import Path

import pytest

from prunelib.run import checks
from prunelib.core.store import ResultsStore

NB = Path(__file__).resolve().parent.parent / "notebooks"


def test_notebooks_are_committed_clean_with_a_parameters_cell():
    for path in NB.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") or c.get("execution_count") for c in code), path.name
        assert "parameters" in code[0]["metadata"].get("tags", []), path.name


@pytest.mark.parametrize("kw,match", [
    (dict(methods=["shortgpt", "bogus"]), "unknown pruning method 'bogus'"),
    (dict(batches=[1, "2"]), r"batches=\[1, '2'\]"),
    (dict(sparsities=[1.5]), "sparsities"),
    (dict(quality_preset="medium"), "quality_preset='medium'"),
    (dict(long_context_docs=-1), "long_context_docs=-1"),
])
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        checks.parameters(**kw)


def run(name, tmp_path, **params):
    """The notebook executed as ``make demo`` executes it (its library logs go to <name>.log beside it)."""
    from prunelib import demo

    return demo.execute(name, tmp_path, params, progress_bar=False)


AXIS_CELL = {"static_depth": "static_depth", "static_width": "static_width", "hidden_width": "static_hidden",
             "sparse24": "static_k_24", "lowrank": "static_k_lowrank", "dynamic_depth": "dynamic_depth",
             "token_pruning": "token_pruning", "sparse_attention": "dynamic_nk_attention"}


def code_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", sorted(AXIS_CELL))
def test_parameters_cell_lists_the_allowed_methods(name):
    from prunelib import pruning

    line = next(l for l in code_cells(NB / f"{name}.ipynb")[0].splitlines() if l.startswith("methods ="))
    chosen, comment = line.split("  # ")
    allowed = comment.split(": ", 1)[1].split(", ")
    assert f'pruning.methods("{AXIS_CELL[name]}")' in comment and allowed == pruning.methods(AXIS_CELL[name])
    assert set(json.loads(chosen.split("=", 1)[1])) <= set(allowed)


@pytest.mark.parametrize("path", sorted(NB.glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """papermill parses each line of the parameters cell (a comment holding '=' would hide its parameter)."""
    from papermill.translators import PythonTranslator

    src = code_cells(path)[0]
    names = [line.split("=")[0].strip() for line in src.splitlines() if "=" in line.split("#")[0]]
    assert [p.name for p in PythonTranslator.inspect({"source": src})] == names


@pytest.mark.parametrize("preset", ["QUICK", "FULL"])
def test_demo_parameters_are_the_notebooks_own_and_valid(preset):
    from prunelib import demo

    for name, params in getattr(demo, preset).items():
        defined = {l.split("=")[0].strip() for l in code_cells(NB / f"{name}.ipynb")[0].splitlines() if "=" in l}
        assert set(params) <= defined, (name, set(params) - defined)
        checks.parameters(**params)


def test_no_cell_with_logic_is_repeated_across_notebooks():
    """Plotting and other logic lives in prunelib; a cell repeated verbatim may only be a short library call."""
    seen = {}
    for path in sorted(NB.glob("*.ipynb")):
        for src in code_cells(path)[1:]:
            lines = [l for l in src.splitlines() if l.strip() and not l.startswith(("from ", "import "))]
            logic = len(lines) > 5 or any(l.lstrip().startswith(("for ", "if ", "with ", "def ")) for l in lines)
            if logic:
                assert src not in seen, f"{path.name} repeats a cell of {seen.get(src)}:\n{src}"
                seen[src] = path.name


def synthetic_store(lengths=(512, 2048)):
    """Timed and scored points of two methods at two lengths, as the axis notebooks store them."""
    rows = []
    for method, cell, loss, speed in (("shortgpt", "static_depth", 20.0, 1.3), ("width_flap", "static_width", 4.0, 1.1)):
        base = dict(model="smollm2-135m", method=method, cell=cell, sparsity=0.25, device="cpu", dtype="float32")
        for phase in ("prefill", "decode"):
            for s in lengths:
                v = speed + s / 5000
                rows.append(dict(base, phase=phase, batch=1, length=s, metric="speedup", value=v, ci_low=v - 0.05,
                                 ci_high=v + 0.05, bound=v + 0.1, config_hash=f"{method}{phase}{s}",
                                 extra={"calibration": {"seed": 0}, "options": {}, "params": 1e8}))
        rows.append(dict(base, phase="quality", metric="quality_loss_pct", value=loss, ci_low=loss - 8,
                         ci_high=loss + 8, config_hash=f"{method}q", extra={"seed": 0, "options": {}, "stderr": 4.0}))
    ResultsStore().append(rows)


@pytest.mark.slow
def test_pareto_run_with_two_lengths_shows_the_s512_frontier(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    synthetic_store()
    out = json.loads(run("pareto", tmp_path).read_text())
    shown = [o for c in out["cells"] if "pareto_figures" in "".join(c["source"]) for o in c["outputs"]]
    titles = [f"{phase}, B=1, S={s}, eager timing" for phase in ("prefill", "decode") for s in (512, 2048)]
    # each shown once: the S=2048 figure no longer replaces the headline S=512 one
    assert [sum(t in json.dumps(o.get("data", {})) for o in shown) for t in titles] == [1, 1, 1, 1]
    for phase in ("prefill", "decode"):
        for s in (512, 2048):
            assert (tmp_path / "fig" / f"pareto_{phase}_B1_S{s}.png").stat().st_size > 1000
    bands = "".join(json.dumps(o) for c in out["cells"] if "best_per_band(pts, [tuple(b) for b in bands])"
                    in "".join(c["source"]) for o in c["outputs"])
    assert "width_flap s=0.25" in bands and "shortgpt s=0.25" in bands


@pytest.mark.slow
def test_executed_notebook_reads_cleanly(tmp_path, monkeypatch):
    """lm-eval's progress bars and warnings go to the log beside the notebook, not into its outputs.

    The baseline notebook scores the dense model on the quick preset: lm-eval's per-request bars
    and warnings (1,115 stderr lines in static_depth before) without pruning anything."""
    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    out = run("baseline", tmp_path, batches=[1], lengths=[16], reps=2, quality_preset="quick")
    nb = json.loads(out.read_text())
    stderr = [line for c in nb["cells"] for o in c.get("outputs", []) if o.get("name") == "stderr"
              for line in "".join(o["text"]).splitlines()]
    assert len(stderr) < 20, "\n".join(stderr[:40])
    log = out.with_suffix(".log").read_text()
    assert "loglikelihood requests" in log  # lm-eval's bars were moved, not lost
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def visible(output):  # a progress bar tqdm closed (leave=False) is hidden through its layout
        view = output.get("data", {}).get("application/vnd.jupyter.widget-view+json")
        if view is None:
            return False
        layout = state.get(view["model_id"], {}).get("state", {}).get("layout", "").removeprefix("IPY_MODEL_")
        return state.get(layout, {}).get("state", {}).get("visibility") != "hidden"

    for c in nb["cells"]:  # each cell shows at most one progress bar (a widget)
        assert sum(map(visible, c.get("outputs", []))) <= 1, "".join(c["source"])


@pytest.mark.slow
def test_pareto_on_empty_store_says_nothing_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    out = run("pareto", tmp_path)
    assert "Nothing measured yet" in out.read_text()


@pytest.mark.slow
def test_bad_parameter_fails_in_first_cell(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="unknown pruning method 'bogus'"):
        run("static_depth", tmp_path, methods=["bogus"])


@pytest.mark.slow
def test_depth_then_pareto(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    run("static_depth", tmp_path, methods=["last_n", "shortgpt"], sparsities=[0.1], lengths=[32], reps=3,
        quality_preset=None, calib_n=4, calib_len=32)
    df = ResultsStore().load()
    assert set(df[df.metric == "speedup"].method) == {"last_n", "shortgpt"}
    assert (tmp_path / "fig" / "depth_importance.png").exists()
    run("baseline", tmp_path, batches=[1], lengths=[16], reps=2, quality_preset=None)
    assert (tmp_path / "fig" / "baseline_latency.png").exists()


def test_report_index_links_pages_and_figures(tmp_path):
    import nbformat

    from prunelib import report

    executed, figs = tmp_path / "exec", tmp_path / "fig"
    executed.mkdir(), figs.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# hi")]), executed / "pareto.ipynb")
    (figs / "pareto_prefill_B1_S512.png").write_bytes(b"\x89PNG")
    index = report.build(executed, figs, tmp_path / "report")
    text = index.read_text()
    assert 'href="pareto.html"' in text and "figures/pareto_prefill_B1_S512.png" in text
    assert (tmp_path / "report" / "pareto.html").exists()
    with pytest.raises(FileNotFoundError, match="make demo"):
        report.build(tmp_path / "none", figs, tmp_path / "r2")


TINY = dict(lengths=[32], reps=2, quality_preset=None, calib_n=4, calib_len=32)
# notebook -> (methods, sparsity, other parameters, figures it promises)
AXES = {
    "static_width": (["width_wanda_sp"], 0.1, {}, ["static_width_speedup.png", "static_width_round_to.png"]),
    "hidden_width": (["slicegpt", "slicegpt_random"], 0.1, {}, ["hidden_width_speedup.png"]),
    "sparse24": (["sparse24_wanda", "sparse24_random"], 0.5, {}, ["sparse24_speedup.png"]),
    "lowrank": (["lowrank_svdllm"], 0.25, {}, ["lowrank_speedup.png"]),  # float64 SVDs of 210 weights: one method
    "dynamic_depth": (["dyn_depth_router", "dyn_depth_random"], 0.25, {},
                      ["dynamic_depth_speedup.png", "dynamic_depth_realised.png"]),
    "token_pruning": (["token_prune_attn", "token_prune_random"], 0.5, {},
                      ["token_pruning_speedup.png", "token_pruning_realised.png"]),
    # 8 blocks of 64 tokens: enough for the sink + diagonal floor to stay below the target density
    "sparse_attention": (["sparse_attn_block", "sparse_attn_random"], 0.5, dict(lengths=[512], long_context_docs=0),
                         ["sparse_attention_speedup.png", "sparse_attention_realised.png"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AXES))
def test_axis_notebook_stores_rows_and_draws_figures(name, tmp_path, monkeypatch):
    methods, sparsity, extra, figures = AXES[name]
    monkeypatch.setenv("PRUNELIB_FIGURES", str(tmp_path / "fig"))
    run(name, tmp_path, **dict(TINY, methods=methods, sparsities=[sparsity], **extra))
    speed = ResultsStore().load().query("metric == 'speedup'")
    assert set(speed.method) == set(methods)
    assert set(speed.phase) == {"prefill", "decode"} and (speed.sparsity == sparsity).all()
    assert (speed.value > 0).all() and (speed.bound > 0).all()
    for fig in figures:
        assert (tmp_path / "fig" / fig).stat().st_size > 1000, fig
    if name in ("dynamic_depth", "token_pruning", "sparse_attention"):
        realised = speed.set_index("phase").extra.map(lambda e: e["realised_sparsity"])
        assert realised.between(0, 1).all() and (realised["prefill"] > 0).all()
    if name == "sparse24":  # on CPU no sparse kernel runs, and the rows say so
        assert not speed.extra.map(lambda e: e["removed"]["sparse_kernel"]).any()
    nb = json.loads((tmp_path / f"{name}.ipynb").read_text())
    curves = [o for c in nb["cells"] if "curves_vs_random" in "".join(c["source"]) for o in c["outputs"]]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) and "text/html" in o.get("data", {})
               for o in curves), "the curve against random is not shown"
    if name == "static_width":  # the round_to variant went to its own store, timed only
        side = ResultsStore(ResultsStore().path.parent / "results_round_to_64.jsonl").load()
        assert set(side.metric) == {"speedup"}
        assert side.extra.map(lambda e: e["options"] == {"round_to": 64}).all()


def test_readme_papermill_example_passes_lists_as_lists(tmp_path):
    """The README's papermill command, as typed (only --prepare-only added): its parameters pass the checks."""
    import re
    import shlex
    import subprocess

    readme = (NB.parent / "README.md").read_text()
    cmd = re.search(r"```bash\n(PLOTLY_RENDERER=notebook papermill .*?)\n```", readme, re.S).group(1)
    argv = shlex.split(cmd.replace("\\\n", " "))[1:]  # drop the environment assignment
    argv[2] = str(tmp_path / "out.ipynb")
    subprocess.run(argv + ["--prepare-only", "--cwd", str(NB.parent)], check=True, cwd=NB.parent,
                   capture_output=True)
    injected = next(c for c in json.loads((tmp_path / "out.ipynb").read_text())["cells"]
                    if "injected-parameters" in c["metadata"].get("tags", []))
    params = {}
    exec("".join(injected["source"]), params)
    assert params["sparsities"] == [0.1, 0.25] and params["reps"] == 5
    checks.parameters(sparsities=params["sparsities"], reps=params["reps"])


def test_demo_only_runs_the_named_notebooks_and_names_what_it_skipped(tmp_path, monkeypatch, capsys):
    from prunelib import demo

    ran = []
    monkeypatch.setattr(demo, "execute", lambda name, out, params, progress_bar=True: ran.append((name, params)))
    demo.main(["--only", "static_depth,engines", "--out", str(tmp_path)])
    assert ran == [("static_depth", demo.QUICK["static_depth"]), ("engines", demo.NOTEBOOKS["engines"])]
    assert len(demo.QUICK["static_depth"]["sparsities"]) >= 3  # three rungs for each headline family
    ran.clear()
    demo.main(["--only", "pareto", "--out", str(tmp_path)])
    assert "skipped engines: " in capsys.readouterr().out and ran == [("pareto", {})]
    with pytest.raises(SystemExit) as e:
        demo.main(["--only", "bogus"])
    assert e.value.code == 2 and "allowed: ['baseline'" in capsys.readouterr().err
