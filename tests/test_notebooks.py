"""Every notebook runs under papermill with tiny parameters and produces what it promises."""
import json
from pathlib import Path

import pytest

from prunelib import checks
from prunelib.store import ResultsStore

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
    import papermill as pm

    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(NB / f"{name}.ipynb"), str(out), parameters=params, cwd=str(NB), progress_bar=False,
                        kernel_name="python3")
    return out


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
    "lowrank": (["lowrank_asvd"], 0.25, {}, ["lowrank_speedup.png"]),  # float64 SVDs of 210 weights: one method
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
    if name == "static_width":  # the round_to variant went to its own store, timed only
        side = ResultsStore(ResultsStore().path.parent / "results_round_to_64.jsonl").load()
        assert set(side.metric) == {"speedup"}
        assert side.extra.map(lambda e: e["options"] == {"round_to": 64}).all()
