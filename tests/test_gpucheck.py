import pandas as pd
import pytest
import torch

from prunelib import gpucheck
from prunelib.model.models import parameter_count, random_config, random_configs


@pytest.mark.slow  # about 80 s on a loaded 2-core machine (torch.compile traces of the dynamic cells)
def test_smoke_runs_every_cell_and_turns_failures_into_rows(tmp_path, capsys):
    """The GPU check's own code on the CPU (tiny model, one thread): every cell at every shape is a row;
    the graph column fails, as it must without CUDA, with an error that names the allowed modes; methods
    that refuse graphs try torch.compile instead."""
    csv = tmp_path / "check.csv"
    df = gpucheck.main(["--smoke", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert csv.exists() and len(pd.read_csv(csv)) == len(df) == len(gpucheck.CELLS) * 3
    assert set(df.cell) == {c[0] for c in gpucheck.CELLS} and "eager_speedup" in out
    assert df.eager_speedup.notna().all() and (df.eager_speedup > 0).all()
    graphs = df.cell.isin(["dense", "static depth", "static width", "hidden width", "2:4", "low rank"])
    assert df[graphs].error.str.contains(r"graph: ValueError: timing mode 'graph' cannot run on cpu").all()
    assert df[~graphs].timing_mode_reason.str.contains("torch.compile").all()
    assert "graph_speedup" not in df.columns and df.host_share.between(0, 1).all()
    assert (df[df.cell == "static depth"].bound > 1.2).all()  # a quarter of the layers gone
    assert (df.eager_dense_vs_roofline > 0).all() and (df.mem_pred_gb > 0).all()


def test_smoke_times_dense_and_the_24_cell_through_faked_cusparselt(tmp_path, capsys):
    """``--smoke`` runs the 2:4 cell through cuSPARSELt's code path, its kernels replaced by reference CPU code;
    without a sparse-kernel spec on the CPU its bound stays 1."""
    csv = tmp_path / "check.csv"
    df = gpucheck.main(["--smoke", "--cells", "dense,2:4", "--csv", str(csv)])
    out = capsys.readouterr().out
    assert out.startswith(f"gpu-check found: torch {torch.__version__}") and "eager_speedup" in out
    assert len(pd.read_csv(csv)) == len(df) == 6 and df.eager_speedup.notna().all() and df.static_speedup.notna().all()
    assert df.error.str.contains(r"graph: ValueError: timing mode 'graph' cannot run on cpu").all()
    assert (df[df.cell == "dense"].bound == 1.0).all()
    assert (df[df.cell == "2:4"].kernel == "cuSPARSELt").all() and (df[df.cell == "2:4"].bound == 1.0).all()
    assert df[df.cell == "2:4"].weight_gb.max() < df[df.cell == "dense"].weight_gb.min()  # packed values + metadata
    assert (df.mem_peak_gb > 0).all() and df.host_share.between(0, 1).all()


def test_lowrank_cell_builds_the_structure_without_svd():
    from prunelib.pruning.lowrank import LowRankLinear, rank_for

    model = gpucheck.tiny_model()
    low = gpucheck._lowrank(model, 0.25)
    pairs = [m for m in low.modules() if isinstance(m, LowRankLinear)]
    assert len(pairs) == 7 * 4
    assert {m.rank for m in pairs} == {rank_for(256, 256, 0.25, 64), rank_for(256, 512, 0.25, 64)}
    assert parameter_count(low) < parameter_count(model)
    with torch.inference_mode():
        assert low(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


def test_bad_cells_are_refused():
    with pytest.raises(SystemExit, match="unknown"):
        gpucheck.main(["--smoke", "--cells", "static depth,quantum"])


@pytest.mark.parametrize("key,family,params", [
    ("llama-3.1-8b", "llama", 8.03e9), ("qwen2.5-7b", "qwen2", 7.62e9), ("mistral-7b-v0.3", "mistral", 7.25e9),
    ("phi-3-mini", "phi3", 3.82e9),
])
def test_random_configs_build_on_the_meta_device(key, family, params):
    """Every shipped random-weight config builds (no memory: meta device) with its model's parameter count."""
    from transformers import AutoModelForCausalLM

    assert key in random_configs()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config(key))
    assert model.config.model_type == family
    assert parameter_count(model) == pytest.approx(params, rel=0.005)
