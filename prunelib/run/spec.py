"""A sweep spec (YAML or TOML, see docs/SWEEPS.md): read, checked whole before any job starts (every error
listed at once with its line), and expanded into jobs."""
from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


from prunelib.core.store import config_hash
from prunelib.pruning.registry import check_options

EXECUTORS = ("inprocess", "local", "ray")
DEFAULTS = dict(seeds=[0], phases=["prefill", "decode"], batches=[1], lengths=[512], devices=["cpu"],
                dtype="float32", timing_mode="auto", reps=20, quality="quick", fidelity=True,
                calibration={"n": 32, "length": 256}, options={}, threads=None, retries=2, plugins=[],
                baseline_seeds=5, runtime="pytorch", export_dtype="f16")
KEYS = ("models", "methods", "sparsities", *DEFAULTS)
REQUIRED = ("models", "methods", "sparsities")


class SpecError(ValueError):
    """A sweep spec with errors; ``errors`` lists them, each ``file:line: what``."""

    def __init__(self, source, errors):
        self.errors = errors
        super().__init__(f"sweep spec {source} has {len(errors)} error(s); nothing was run:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class Spec:
    models: tuple
    methods: tuple
    sparsities: tuple
    seeds: tuple
    phases: tuple
    batches: tuple
    lengths: tuple
    devices: tuple
    dtype: str
    timing_mode: str | None  # None: the device's default (prunelib.measure.timing.choose_mode)
    reps: int
    quality: str | None  # a preset of prunelib.measure.scoring.PRESETS (plugins may add one), or None
    fidelity: bool
    calibration: dict
    options: dict
    threads: int
    retries: int
    plugins: tuple
    baseline_seeds: int = 5  # a random baseline runs at seeds 0..n-1 (and the spec's seeds): one draw decides nothing
    ladders: dict = field(default_factory=dict)  # sparsities "ladder": (model, method) -> its rungs on that model
    runtime: str = "pytorch"  # or "llama.cpp": each model exported to GGUF (export_dtype) and timed there
    export_dtype: str = "f16"


@dataclass(frozen=True)
class Job:
    model: str
    method: str
    sparsity: float
    seed: int
    device: str
    spec: Spec = field(repr=False)

    @property
    def key(self) -> str:
        s = {k: v for k, v in asdict(self.spec).items() if k not in ("models", "methods", "sparsities", "seeds",
                                                                      "devices", "retries", "plugins",
                                                                      "baseline_seeds", "ladders")}
        if s["runtime"] == "pytorch":  # the keys of PyTorch jobs stay what they were before runtimes existed
            s.pop("runtime"), s.pop("export_dtype")
        return config_hash({"kind": "sweep_job", "model": self.model, "method": self.method,
                            "sparsity": self.sparsity, "seed": self.seed, "device": self.device, **s})

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.rstrip("/").split("/")[-1])
        return f"{slug}__{self.method}__{self.sparsity:g}__seed{self.seed}__{self.device}__{self.key[:8]}"

    @property
    def exclusive(self) -> bool:
        """Needs the node's timing slot (CPU timing) or a whole GPU."""
        return self.device == "cuda" or bool(self.spec.phases)


# --- the spec ------------------------------------------------------------------------------------
def load_spec(path, *, executor: str = "inprocess") -> Spec:
    """Read and check a YAML or TOML spec; a :class:`SpecError` lists every problem with its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        data, lines = _read_yaml(text, path)
    elif path.suffix == ".toml":
        data, lines = _read_toml(text, path)
    else:
        raise ValueError(f"sweep spec {str(path)!r}: unknown format {path.suffix!r}; allowed: .yaml, .yml, .toml")
    return _Checker(data, lines, path, executor).spec()


def _read_yaml(text, path):
    import yaml

    try:
        node, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SpecError(path, [f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({err})"]) from err
    lines = {(): 1}

    dup = []

    def walk(n, at):
        if isinstance(n, yaml.MappingNode):
            keys = [str(k.value) for k, _ in n.value]
            dup.extend(f"{path}:{k.start_mark.line + 1}: key {str(k.value)!r} is given twice (YAML keeps only the "
                       f"last); give it once" for i, (k, _) in enumerate(n.value) if str(k.value) in keys[:i])
            for k, v in n.value:
                lines[at + (str(k.value),)] = k.start_mark.line + 1
                walk(v, at + (str(k.value),))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[at + (i,)] = v.start_mark.line + 1
                walk(v, at + (i,))

    if node is not None:
        walk(node, ())
    if dup:
        raise SpecError(path, dup)
    return data, lines


def _read_toml(text, path):
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(path, [f"{path}: not valid TOML ({err})"]) from err
    lines, table = {(): 1}, ()
    for i, line in enumerate(text.splitlines(), 1):  # TOML keeps no positions: a list item is reported at its key
        if m := re.match(r"\s*\[([\w.-]+)\]", line):
            table = tuple(m.group(1).split("."))
            lines.setdefault(table, i)
        elif m := re.match(r"\s*([\w-]+)\s*=", line):
            lines.setdefault(table + (m.group(1),), i)
    return data, lines


class _Checker:
    """Checks a parsed spec, collecting every error with its line before giving up."""

    def __init__(self, data, lines, source, executor):
        self.data, self.lines, self.source, self.executor = data, lines, source, executor
        self.errors: list[tuple[int, str]] = []

    def err(self, at, msg):
        at = tuple(at)
        if at and isinstance(self.data, dict) and at[0] not in self.data:
            msg += f" ({at[0]!r} not given: its default {DEFAULTS.get(at[0])!r})"
        while at not in self.lines:
            at = at[:-1]
        self.errors.append((self.lines[at], msg))

    def items(self, key, kind, check, what):
        """The valid items under ``key`` as (index, item) (a scalar counts as a list of one)."""
        v = self.data.get(key, DEFAULTS.get(key))
        if v is None or v == "none":
            v = []
        v = v if isinstance(v, list) else [v]
        out = []
        for i, x in enumerate(v):
            if not isinstance(x, kind) or isinstance(x, bool) or not check(x):
                self.err((key, i), f"{key}[{i}]: {x!r} is not {what}")
            else:
                out.append((i, x))
        return out

    def spec(self) -> Spec:
        from prunelib.measure import timing
        from prunelib.run.engine_rows import RUNTIMES
        from prunelib.runtime.gguf_export import EXPORT_DTYPES
        from prunelib.pruning import REGISTRY

        d = self.data
        if not isinstance(d, dict):
            raise SpecError(self.source, [f"{self.source}:1: a spec is a mapping of keys; allowed: {list(KEYS)}"])
        for k in d:
            if k not in KEYS:
                self.err((k,), f"unknown key {k!r}; allowed: {list(KEYS)}")
        for k in REQUIRED:
            if not d.get(k):
                self.err((), f"{k!r} is required (a non-empty list)")
        plugins = self.plugins()
        models = [x for _, x in self.items("models", str, lambda x: True, "a model name")]
        methods = self.items("methods", str, lambda x: x in REGISTRY,
                             f"a registered method; registered: {sorted(REGISTRY)}")
        self.ladder = d.get("sparsities") == "ladder"  # each method's own rungs, per model (see model())
        self.ladders = {}
        sparsities = [] if self.ladder else self.items("sparsities", (int, float), lambda x: 0 <= x < 1,
                                                       "a sparsity in [0, 1), or 'ladder'")
        seeds = [x for _, x in self.items("seeds", int, lambda x: x >= 0, "a seed (an integer >= 0)")]
        phases = self.items("phases", str, lambda x: x in ("prefill", "decode"),
                            "a phase: prefill or decode ('none' for quality only)")
        batches = [x for _, x in self.items("batches", int, lambda x: x >= 1, "a batch size (an integer >= 1)")]
        lengths = self.items("lengths", int, lambda x: x >= 1, "a length (an integer >= 1)")
        devices = [x for _, x in self.items("devices", str, self.device_ok, "a device here: " + self.devices_here())]
        dtype = self.choice("dtype", ("float32", "bfloat16", "float16"))
        timing_mode = self.choice("timing_mode", ("auto", *timing.MODES))
        runtime = self.choice("runtime", RUNTIMES)
        export_dtype = self.choice("export_dtype", EXPORT_DTYPES)
        if runtime == "llama.cpp" and (batches != [1] or any(x != "cpu" for x in devices)):
            self.err(("runtime",), f"runtime: 'llama.cpp' is not allowed with batches {batches} on devices {devices}; "
                                   "expected batches [1] on devices ['cpu'] (make setup-engines builds it CPU-only)")
        fidelity = self.choice("fidelity", (True, False))
        reps = self.number("reps", 2, "an integer >= 2 (a CI needs samples)")
        retries = self.number("retries", 0, "an integer >= 0")
        baseline_seeds = self.number("baseline_seeds", 1, "an integer >= 1 (seeds of each random baseline)")
        threads = self.number("threads", 1, "an integer >= 1 (torch threads per job), or null for this machine's")
        calibration = self.calibration()
        options = d.get("options", {}) or {}
        if not isinstance(options, dict):
            self.err(("options",), f"options: {options!r} is not a mapping of method options")
            options = {}
        quality = self.quality()
        self.device_modes(devices, dtype, timing_mode)
        for k in ("seeds", "batches", "lengths", "devices"):
            if d.get(k, DEFAULTS[k]) == []:
                self.err((k,), f"{k}: [] is not allowed; expected a non-empty list (leave the key out for "
                               f"its default {DEFAULTS[k]!r})")
        for k, m in methods:
            try:
                check_options(m, options)
            except ValueError as e:
                self.err(("options",), f"options: {e}")
        self.same_models(models)
        phases = [x for _, x in phases]
        for i, name in enumerate(models):
            self.model(i, name, methods, sparsities, lengths, quality, phases)
        methods, sparsities, lengths = ([x for _, x in v] for v in (methods, sparsities, lengths))
        if self.errors:
            raise SpecError(self.source, [f"{self.source}:{line}: {msg}" for line, msg in sorted(self.errors)])
        import torch

        return Spec(tuple(models), tuple(methods), ("ladder",) if self.ladder else tuple(float(s) for s in sparsities),
                    tuple(seeds), tuple(phases), tuple(batches), tuple(lengths), tuple(devices), dtype,
                    None if timing_mode == "auto" else timing_mode, reps, quality, fidelity, calibration, options,
                    threads or torch.get_num_threads(), retries, tuple(plugins), baseline_seeds, self.ladders,
                    runtime, export_dtype)

    def device_modes(self, devices, dtype, timing_mode):
        """What a CPU cannot run is refused here, not as one failure row per job."""
        if devices and all(x == "cpu" for x in devices):
            if dtype == "float16":
                self.err(("dtype",), "dtype: 'float16' is not allowed on devices ['cpu']; allowed there: "
                                     "['float32', 'bfloat16']")
            if timing_mode == "graph":
                self.err(("timing_mode",), "timing_mode: 'graph' (CUDA graphs) is not allowed on devices ['cpu']; "
                                           "allowed there: ['auto', 'eager', 'compiled']")

    def same_models(self, models):
        """One model under two names (an alias and its folder, two spellings of one path) would be measured twice."""
        from prunelib.model.models import EMBEDDED_ALIASES, embedded_path

        seen = {}
        for i, name in enumerate(models):
            where = str(embedded_path()) if name in EMBEDDED_ALIASES else name
            where = str(Path(where).expanduser().resolve()) if Path(where).expanduser().is_dir() else where
            if where in seen:
                self.err(("models", i), f"models[{i}]: {name!r} is the model of models[{seen[where][0]}] "
                                        f"({seen[where][1]!r}); list each model once")
            seen.setdefault(where, (i, name))

    def devices_here(self) -> str:
        import torch

        return "cpu or cuda" if self.executor == "ray" or torch.cuda.is_available() else "cpu (no CUDA device here)"

    def device_ok(self, x):
        if x not in ("cpu", "cuda"):
            return False
        import torch

        return x == "cpu" or self.executor == "ray" or torch.cuda.is_available()  # a cluster may have GPUs we lack

    def choice(self, key, allowed):
        v = self.data.get(key, DEFAULTS[key])
        if v not in allowed:
            self.err((key,), f"{key}: {v!r} is not allowed; allowed: {list(allowed)}")
        return v

    def number(self, key, low, what):
        v = self.data.get(key, DEFAULTS[key])
        if v is None and key == "threads":
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            self.err((key,), f"{key}: {v!r} is not {what}")
        return v

    def calibration(self):
        c = self.data.get("calibration", DEFAULTS["calibration"])
        if not isinstance(c, dict):
            self.err(("calibration",), f"calibration: {c!r} is not a mapping with n and length")
            return dict(DEFAULTS["calibration"])
        for k in c:
            if k not in ("n", "length"):
                self.err(("calibration", k), f"calibration: unknown key {k!r}; allowed: ['n', 'length']")
        out = dict(DEFAULTS["calibration"], **{k: v for k, v in c.items() if k in ("n", "length")})
        for k, v in out.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                self.err(("calibration", k), f"calibration.{k}: {v!r} is not an integer >= 1")
        return out

    def quality(self):
        from prunelib.measure.scoring import PRESETS

        q = self.data.get("quality", DEFAULTS["quality"])
        if q in (None, False, "none"):
            return None
        if q not in PRESETS:
            self.err(("quality",), f"quality: {q!r} is not a preset; allowed: {sorted(PRESETS)} or none")
        return q

    def plugins(self):
        out = []
        for i, p in self.items("plugins", str, lambda x: True, "a path"):
            path = (Path(self.source).parent / p).resolve()
            try:
                import_plugins([str(path)])
                out.append(str(path))
            except (Exception, SystemExit) as e:  # noqa: BLE001 (any import error, sys.exit too, is a spec error)
                self.err(("plugins", i), f"plugins[{i}]: cannot import {str(path)!r}: {type(e).__name__}: {e}")
        return out

    def model(self, i, name, methods, sparsities, lengths, quality, phases):
        from prunelib.pruning import get
        from prunelib.pruning.registry import rungs

        try:
            config, tokenizer = model_config(name)
        except Exception as e:  # noqa: BLE001 (reported with its line)
            self.err(("models", i), f"models[{i}]: {e}")
            return
        if tokenizer is False and quality is not None:
            self.err(("quality",), f"quality: model {name!r} has random weights and no tokenizer; use quality: none")
        max_pos = getattr(config, "max_position_embeddings", None)
        for j, s in lengths:
            if phases and max_pos and s + 1 > max_pos:
                self.err(("lengths", j), f"lengths[{j}]: {s} (+1 decode step) exceeds model {name!r}'s "
                                         f"max_position_embeddings {max_pos}")
        meta = _meta_model(config)
        for k, m in methods:
            method = get(m)
            if tokenizer is False and method.needs_calibration:
                self.err(("methods", k), f"methods[{k}]: {m!r} needs calibration text, but model {name!r} has no "
                                         "tokenizer")
            if self.ladder:
                try:
                    self.ladders[(name, m)] = tuple(rungs(m, meta))
                except Exception as e:  # noqa: BLE001 (reported with its line)
                    self.err(("sparsities",), f"sparsities: ladder of {m!r} on model {name!r}: {e}")
                continue
            try:
                hi = method.max_sparsity(meta)
            except Exception:  # noqa: BLE001 (the method checks its own range when it runs)
                continue
            for j, s in sparsities:
                if s > hi:
                    self.err(("sparsities", j), f"sparsities[{j}]: {s} is out of range for method {m!r} on model "
                                                f"{name!r} ({method.cell.unit}): allowed 0 <= s <= {hi:.4g}")


def model_config(name: str):
    """``(config, has_tokenizer)`` of a model name as :func:`prunelib.model.models.load_model` reads it, without weights."""
    from transformers import AutoConfig

    from prunelib.model.adapter import ModelAdapter
    from prunelib.model.models import EMBEDDED, EMBEDDED_ALIASES, embedded_path, random_config, random_configs

    if name.startswith("random:"):
        config, tokenizer = random_config(name.split(":", 1)[1]), False
    else:
        path = str(embedded_path()) if name in EMBEDDED_ALIASES else name
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise ValueError(f"model folder {name!r} does not exist")
        try:
            config, tokenizer = AutoConfig.from_pretrained(path), True
        except (OSError, ValueError) as err:
            known = [EMBEDDED] + ["random:" + c for c in random_configs()]
            raise ValueError(f"unknown model {name!r}: not a local folder with a config.json nor reachable on the "
                             f"Hub (known here: {known})") from err
    ModelAdapter.check_type(config)
    return config, tokenizer


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def import_plugins(paths) -> None:
    """Import method modules named by file path (they register extra methods), once per process."""
    for p in paths:
        name = "prunelib_plugin_" + re.sub(r"\W", "_", str(Path(p).resolve().with_suffix("")))
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None:
            raise ImportError(f"{p!r} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def jobs(spec: Spec) -> list[Job]:
    """One dense job per (model, device), then one job per (model, method, sparsity, seed, device): a method's
    sparsities are the spec's, or its ladder's rungs on that model; a random baseline runs at seeds
    0..baseline_seeds-1 besides the spec's, so a criterion is compared with the spread of random draws."""
    from prunelib.pruning import REGISTRY

    out = [Job(m, "dense", 0.0, spec.seeds[0], d, spec) for m in spec.models for d in spec.devices]
    for m in spec.models:
        for method in spec.methods:
            seeds = spec.seeds if REGISTRY[method].baseline is not None else \
                tuple(sorted(set(spec.seeds) | set(range(spec.baseline_seeds))))
            sparsities = spec.ladders[(m, method)] if spec.sparsities == ("ladder",) else spec.sparsities
            out += [Job(m, method, s, seed, d, spec) for s in sparsities for seed in seeds for d in spec.devices]
    return out


# --- one job (runs in a worker) ---------------------------------------------------------------
