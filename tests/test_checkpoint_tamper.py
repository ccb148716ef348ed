"""Tampered checkpoints: each loads the exact model or raises CheckpointError naming the folder and what is
wrong, and none runs code: os.system, os.popen / exec*, subprocess, eval / exec / compile and any import of a
module not yet imported fail the test if called, while loading and while running the loaded model (the
calls raise; a new import is recorded)."""
import builtins
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelib import pruning
from prunelib.model.checkpoint import STATE_FILE, STRUCTURE_FILE, WEIGHTS_FILE, CheckpointError
from prunelib.model.models import load_pruned, save_pruned
from tests.conftest import synthetic_calibration, tiny_config

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
#: one checkpoint per kind of saved state: low-rank pairs, token pruning (shared pruner, hooks), routed layers,
#: sparse attention (a config copy, counters), non-uniform width (biases, feature counts), SliceGPT
BASES = {"lowrank": "lowrank_svd", "tokens": "token_prune_attn", "routed": "dyn_depth_router",
         "sparse": "sparse_attn_block", "width": "width_flap", "sliced": "slicegpt"}


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each base checkpoint and the logits of its clean reload (a fresh load runs dynamic state identically)."""
    root, cal, out = tmp_path_factory.mktemp("ckpt"), synthetic_calibration(), {}
    for name, method in BASES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config()).eval()
        save_pruned(pruning.prune(model, method, 0.25, calibration=cal)[0], root / name)
        out[name] = root / name, logits(load_pruned(root / name))
    return out


class Ran(BaseException):
    """Raised by a trapped function: a BaseException, so no loader's ``except Exception`` can hide it."""


@contextlib.contextmanager
def no_foreign_code():
    calls, real_import, real_import_module = [], builtins.__import__, importlib.import_module

    def trap(name):
        def f(*args, **kwargs):
            calls.append(name)  # (no repr of the arguments: a tensor's repr would import)
            raise Ran(name)
        return f

    def guarded_import(name, *args, **kwargs):  # a new import is recorded (it fails the test) and let through
        if name not in sys.modules:
            calls.append(f"import {name}")
        return real_import(name, *args, **kwargs)

    def guarded_import_module(name, package=None):
        if name not in sys.modules:
            calls.append(f"importlib.import_module({name})")
        return real_import_module(name, package)

    with pytest.MonkeyPatch.context() as mp:
        for mod, names in ((os, ("system", "popen", "execv", "execve", "execvp", "posix_spawn")),
                           (subprocess, ("Popen", "run", "call", "check_call", "check_output")),
                           (builtins, ("eval", "exec", "compile"))):
            for n in names:
                mp.setattr(mod, n, trap(f"{mod.__name__}.{n}"))
        mp.setattr(builtins, "__import__", guarded_import)
        mp.setattr(importlib, "import_module", guarded_import_module)
        yield calls


# --- tampering -------------------------------------------------------------------------------
def structure(fn):
    """A change to the structure JSON, made in place by ``fn``."""
    def mutate(folder):
        f = folder / STRUCTURE_FILE
        s = json.loads(f.read_text())
        fn(s)
        f.write_text(json.dumps(s))
    return mutate


def text(fn):
    def mutate(folder):
        f = folder / STRUCTURE_FILE
        f.write_text(fn(f.read_text()))
    return mutate


def retensor(key, make, declare=True):
    """Replace tensor ``key`` by ``make(t)`` in its file; ``declare``: the structure's table follows (a consistent
    forgery the shape checks must see through) or not (the table check sees it)."""
    from safetensors.torch import load_file, save_file

    def mutate(folder):
        f = folder / STRUCTURE_FILE
        s = json.loads(f.read_text())
        name = s["tensors"][key]["file"]
        ts = load_file(folder / name)
        ts[key] = make(ts[key]).contiguous()
        save_file(ts, folder / name, metadata={"format": "pt"})
        if declare:
            s["tensors"][key].update(shape=list(ts[key].shape), dtype=str(ts[key].dtype).removeprefix("torch."))
            f.write_text(json.dumps(s))
    return mutate


def node(s, path):
    n = s["tree"]
    for part in path.split(".") if path else ():
        n = n["children"][part]
    return n


def find(s, kind):
    """The first node of a kind whose name ends with ``kind``."""
    stack = [s["tree"]]
    while stack:
        n = stack.pop(0)
        if n.get("kind", "").endswith(kind):
            return n
        stack += [c for c in n["children"].values() if c]
    raise LookupError(kind)


def shared(s, kind):
    return next(o for o in s["shared"] if o["kind"].endswith(kind))


def nested(depth, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


Q = "model.layers.1.self_attn.q_proj"
FN = {"$function": ["prunelib.model.checkpoint", "os.system"]}  # the campaign's payload (format 1 syntax)
CASES = [
    # code named by the file: kinds, functions, objects, hooks, configs that load code
    ("lowrank", structure(lambda s: find(s, "LowRankLinear").update(kind="os.system")), "not one prunelib can rebuild"),
    ("lowrank", structure(lambda s: find(s, "LowRankLinear").update(kind="builtins.eval")), "not one prunelib"),
    ("lowrank", structure(lambda s: find(s, "LowRankLinear").update(kind="subprocess.Popen")), "not one prunelib"),
    ("lowrank", structure(lambda s: find(s, "LowRankLinear").update(
        kind="prunelib.model.checkpoint.os.system")), "not one prunelib"),
    ("lowrank", structure(lambda s: find(s, "LowRankLinear").update(kind=["prunelib.pruning.lowrank", "LowRankLinear"])),
     "not a kind name"),
    ("width", structure(lambda s: node(s, "model.layers.1.mlp").update(kind="builtins.__import__")), "not one prunelib"),
    ("width", structure(lambda s: node(s, "model.layers.1.mlp")["attrs"].update(act_fn=FN)), "not a stored value"),
    ("width", structure(lambda s: node(s, Q).update(hooks={"forward_pre": [{"hook": FN, "with_kwargs": False}]})),
     "not a stored value"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(scale={"$object": 0})), "not a stored value"),
    ("tokens", structure(lambda s: shared(s, "_Tap").update(kind="os.system")), "not one prunelib"),
    ("tokens", structure(lambda s: shared(s, "TokenPruner").update(kind="prunelib.pruning.lowrank.LowRankLinear")),
     "is a module, not an object"),
    ("tokens", structure(lambda s: [h.update(hook=node(s, "model.layers.1")["attrs"]["token_pruner"]) for h in
                                    node(s, "model.layers.0.self_attn.q_proj")["hooks"]["forward"]]),
     "not a registered hook"),
    ("tokens", structure(lambda s: shared(s, "TokenPruner")["attrs"].update(taps={"$shared": 0})),
     "refers to itself"),
    ("tokens", structure(lambda s: shared(s, "_Tap")["attrs"].update(pruner={"$shared": 99})), "shared object 99"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(forward="x")), "would hide"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(__class__="x")), "not an attribute a checkpoint may set"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(_forward_hooks={"$dict": []})), "may set"),
    ("width", structure(lambda s: s["config"].update(auto_map={"AutoModelForCausalLM": "evil.Model"})), "auto_map"),
    ("width", structure(lambda s: s["config"].update(_attn_implementation="kernels-community/flash-attn")),
     "_attn_implementation"),
    ("width", structure(lambda s: s["config"].update(attn_implementation="kernels-community/flash-attn")),
     "attn_implementation"),
    ("width", structure(lambda s: s.update(attn_implementation="kernels-community/flash-attn")), "attn_implementation"),
    ("sparse", structure(lambda s: find(s, "SparseAttention")["attrs"].update(
        config={"$config": {"_attn_implementation": "kernels-community/x"}})), "cannot be set"),
    ("sparse", structure(lambda s: find(s, "SparseAttention")["attrs"].update(config={"$config": {"auto_map": {}}})),
     "cannot be set"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(x={"$eval": "__import__('os').system('true')"})),
     "not a stored value"),
    # malformed files (raw errors before: JSONDecodeError, AttributeError, KeyError, RecursionError)
    ("width", text(lambda t: t[: len(t) // 2]), "not valid JSON"),
    ("width", text(lambda t: ""), "not valid JSON"),
    ("width", text(lambda t: "[1, 2]"), "JSON list"),
    ("width", text(lambda t: "[" * 100_000 + "]" * 100_000), "not valid JSON.*RecursionError"),
    ("width", structure(lambda s: s.update(format=1)), "format 1"),
    ("width", structure(lambda s: s.pop("tree")), "fields missing"),
    ("width", structure(lambda s: s["config"].pop("model_type")), "has no model_type"),
    ("width", structure(lambda s: s["config"].update(model_type="gpt2")), "not supported"),
    ("width", structure(lambda s: s["config"].update(model_type="os")), "not supported"),
    ("width", structure(lambda s: node(s, "model.layers")["children"].update({"../..": node(s, "model.layers.1")})),
     "not a child module name"),
    ("width", structure(lambda s: node(s, Q)["params"].update(weight={"alias": "../../model.embed_tokens.weight"})),
     "no parameter"),
    ("width", structure(lambda s: node(s, Q)["params"].update(weight={"key": "../../etc/passwd",
                                                                      "requires_grad": True})), "is not in"),
    ("width", structure(lambda s: node(s, Q)["attrs"].update(x=nested(60, 1))), "nested deeper"),
    ("width", structure(lambda s: node(s, Q)["children"].update(
        deep=nested_tree(40))), "module tree is nested deeper than 16"),
    ("width", structure(lambda s: node(s, Q)["params"]["weight"].update(requires_grad="yes")), "requires_grad"),
    ("width", structure(lambda s: s.update(dtype="float64")), "dtype"),
    # shapes, dtypes and config edits that used to load silently
    ("width", structure(lambda s: s["config"].update(head_dim=8)), r"q_proj \(Linear\) expects \[32, 64\]"),
    ("width", structure(lambda s: s["config"].update(hidden_size=48)),
     r"embed_tokens \(Embedding\) expects \[256, 48\]"),
    ("width", structure(lambda s: s["config"].update(num_hidden_layers=3)),
     "model.layers.3.self_attn.q_proj: the config builds no module here"),
    ("lowrank", structure(lambda s: s["config"].update(num_hidden_layers=6)),
     r"layers: children \['0', '1', '2', '3'\], but a ModuleList of this config has \['0', .*'5'\]"),
    ("width", structure(lambda s: node(s, "model.layers.1.self_attn")["attrs"].update(head_dim=8)),
     "attention's head_dim is 8"),
    ("width", retensor("model.norm.weight", lambda t: t[:3], declare=False), "declares"),
    ("width", retensor("model.norm.weight", lambda t: t[:3]), r"model.norm.weight: shape \[3\]"),
    ("width", retensor(Q + ".weight", lambda t: t.double(), declare=False), "float64"),
    ("width", retensor(Q + ".weight", lambda t: t.double()), "float64"),
    ("width", retensor(Q + ".weight", lambda t: t.half()), "dtype torch.float16"),
    ("width", retensor(Q + ".weight", lambda t: t[:60]), r"\[60, 64\], but module .*q_proj \(Linear\) expects \[64, 64\]"),
    ("width", lambda f: (structure(lambda s: node(s, Q)["attrs"].update(out_features=60))(f),
                         retensor(Q + ".weight", lambda t: t[:60])(f)), "not whole heads"),
    ("lowrank", structure(lambda s: find(s, "LowRankLinear")["attrs"].update(rank=3)), "rank-3 pair"),
    ("lowrank", lambda f: (structure(lambda s: find(s, "LowRankLinear")["children"]["first"]["attrs"].update(
        out_features=3))(f)), "not a rank-24 pair"),
    ("width", structure(lambda s: s["tensors"].update(extra={"file": WEIGHTS_FILE, "shape": [1], "dtype": "float32"})),
     "missing tensor extra"),
    ("width", structure(lambda s: s["tensors"].pop(Q + ".weight")), "not declared"),
    # each method's own state, out of range or of the wrong type
    ("routed", structure(lambda s: find(s, "RoutedDecoderLayer")["attrs"].update(variant="evil")), "variant"),
    ("routed", structure(lambda s: find(s, "RoutedDecoderLayer")["attrs"]["rows"]["$dict"][0][1].update(
        {"$tuple": ["q_proj", 0, 1000]})), "row range"),
    ("routed", structure(lambda s: find(s, "RoutedDecoderLayer")["attrs"].update(names={"$tuple": ["a", "b", "c", "d"]})),
     "names"),
    ("routed", structure(lambda s: find(s, "LinearRouter")["attrs"].update(in_features=32)), "router"),
    ("sparse", structure(lambda s: find(s, "SparseAttention")["attrs"].update(density=2.0)), "density"),
    ("sparse", structure(lambda s: find(s, "SparseAttention")["attrs"].update(method="os.system")), "method"),
    ("sparse", structure(lambda s: find(s, "SparseAttention")["attrs"].update(head_dim=8)), "head_dim"),
    ("tokens", structure(lambda s: shared(s, "TokenPruner")["attrs"].update(layer=0)), "layer"),
    ("tokens", structure(lambda s: shared(s, "TokenPruner")["attrs"].update(criterion="eval")), "criterion"),
    ("tokens", structure(lambda s: find(s, "TokenPrunedLayer")["attrs"].update(token_pruner=1)), "token_pruner"),
    ("sliced", structure(lambda s: find(s, "SlicedDecoderLayer")["children"]["attn_shortcut"]["attrs"].update(
        in_features=64)), "attn_shortcut is 64 -> 48"),
    ("sliced", structure(lambda s: find(s, "ScaleFreeRMSNorm")["attrs"].update(eps=-1)), "eps"),
    # edits that change nothing the model is: the exact model loads
    ("width", text(lambda t: json.dumps(json.loads(t), indent=4, sort_keys=True)), "exact"),
    ("lowrank", structure(lambda s: s.update(loader="x", representable=True, files={})), "exact"),
    ("tokens", structure(lambda s: s["config"].update(_name_or_path="elsewhere")), "exact"),
]


def nested_tree(depth):
    n = {"attrs": {}, "params": {}, "buffers": {}, "children": {}}
    for _ in range(depth):
        n = {"kind": "torch.nn.modules.linear.Linear", "attrs": {}, "params": {}, "buffers": {}, "children": {"c": n}}
    return n


@pytest.mark.parametrize("base,mutate,outcome", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_a_tampered_checkpoint_loads_exactly_or_is_refused_and_runs_no_code(saved, tmp_path, base, mutate, outcome):
    folder = tmp_path / "m"
    shutil.copytree(saved[base][0], folder)
    mutate(folder)
    with no_foreign_code() as calls:
        try:
            result = logits(load_pruned(folder))
        except CheckpointError as err:
            result = err
    assert calls == [], f"foreign code ran: {calls}"
    if outcome == "exact":
        assert not isinstance(result, Exception), result
        torch.testing.assert_close(result, saved[base][1], rtol=0, atol=0)
    else:
        assert isinstance(result, CheckpointError), "loaded, but the tampering changes the model"
        assert str(folder) in str(result) and re.search(outcome, str(result)), str(result)


def test_the_guard_catches_what_it_should(tmp_path):
    """The trap works: a call or a new import inside it is recorded (the table would miss nothing)."""
    with no_foreign_code() as calls:
        for fn in (lambda: os.system("true"), lambda: subprocess.Popen(["true"]), lambda: eval("1")):
            with pytest.raises(Ran):
                fn()
        with pytest.raises(ImportError):
            __import__("this_module_does_not_exist_xyz")
        with pytest.raises(Ran):  # a new module's code runs through exec: trapped
            importlib.import_module("this")
    assert calls == ["os.system", "subprocess.Popen", "builtins.eval", "import this_module_does_not_exist_xyz",
                     "importlib.import_module(this)", "builtins.exec"], calls


def legacy_checkpoint(folder, payload):
    """A format-1 checkpoint (the old loader's format: classes and functions named for it to import) of a tiny
    Llama whose layer-1 MLP activation is ``payload``, written by hand as the old save laid it out."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()

    def tree(mod, path):
        return {"attrs": {"act_fn": payload} if path == "model.layers.1.mlp" else {},
                "params": {k: None if p is None else {"requires_grad": True} for k, p in mod._parameters.items()},
                "buffers": {k: None if b is None else {"persistent": k not in mod._non_persistent_buffers_set}
                            for k, b in mod._buffers.items()},
                "children": {k: tree(c, f"{path}.{k}" if path else k) for k, c in mod._modules.items()}}

    folder.mkdir()
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, folder / WEIGHTS_FILE)
    save_file({k: b.contiguous() for k, b in model.named_buffers() if k.endswith("inv_freq")}, folder / STATE_FILE)
    (folder / STRUCTURE_FILE).write_text(json.dumps({
        "format": 1, "loader": "prunelib.model.models.load_pruned", "representable": False,
        "config": model.config.to_dict(), "attn_implementation": "sdpa", "tree": tree(model, ""), "objects": []}))


def test_the_campaigns_payload_runs_no_code(saved, tmp_path):  # saved: what loading imports is imported
    """The campaign's payload, ``os.system`` named through prunelib's namespace as a layer's activation: the old
    loader resolved it by attribute walking and called it at the first forward; now the folder is refused."""
    legacy_checkpoint(tmp_path / "m", FN)
    with no_foreign_code() as calls:
        try:
            logits(load_pruned(tmp_path / "m"))
        except CheckpointError as err:
            assert "format 1" in str(err) and str(tmp_path / "m") in str(err)
        except Ran:
            pass
        else:
            pytest.fail("loaded a model whose activation is os.system")
    assert calls == [], f"foreign code ran: {calls}"


def test_state_file_tensors_are_checked_too(saved, tmp_path):
    """A routed layer's counters (non-persistent, in the state file) must keep their dtype."""
    folder = tmp_path / "m"
    shutil.copytree(saved["routed"][0], folder)
    s = json.loads((folder / STRUCTURE_FILE).read_text())
    key = next(k for k, d in s["tensors"].items() if d["file"] == STATE_FILE and k.endswith("counts"))
    retensor(key, lambda t: t.int())(folder)
    with no_foreign_code() as calls, pytest.raises(CheckpointError, match=f"{re.escape(key)}: dtype torch.int32"):
        load_pruned(folder)
    assert calls == []


FUZZ_VALUES = [None, True, 0, -1, 3, 10**9, 1.5, float("nan"), "x", "os.system", [], [1], {}, {"$tuple": [1]},
               {"a": 1}, {"$shared": 0}, {"$tensor": "attr:x"}, {"$config": {"hidden_size": 3}}, FN]


def _places(v, p=()):
    yield p
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _places(x, p + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _places(x, p + (i,))


@pytest.mark.parametrize("seed", range(4))
def test_random_tampering_is_refused_or_loads_a_model_that_runs(saved, tmp_path, seed):
    """Seeded random edits anywhere in a structure (a value swapped for one of FUZZ_VALUES, or deleted): each is a
    CheckpointError, or a model that runs (a changed number, e.g. an eps, is a different model, not a broken one);
    never another exception, never foreign code."""
    import random

    rng = random.Random(seed)
    for trial in range(10):
        base = rng.choice(sorted(BASES))
        s = json.loads((saved[base][0] / STRUCTURE_FILE).read_text())
        place = rng.choice([p for p in _places(s) if p])
        parent = s
        for k in place[:-1]:
            parent = parent[k]
        if rng.random() < 0.7:
            parent[place[-1]] = rng.choice(FUZZ_VALUES)
        else:
            del parent[place[-1]]
        folder = tmp_path / f"m{trial}"
        shutil.copytree(saved[base][0], folder)
        (folder / STRUCTURE_FILE).write_text(json.dumps(s))
        with no_foreign_code() as calls:
            try:
                logits(load_pruned(folder))
            except CheckpointError as err:
                assert str(folder) in str(err), err
        assert calls == [], f"foreign code ran: {calls} ({base}: {place})"
