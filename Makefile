# Two commands for a fresh clone: `make demo` and `make test`. Each creates .venv and installs
# pyact-torch with its test tools into it the first time; later runs reuse it. Versions are
# pinned by constraints.txt (the tested set).
#
# torch comes from PyTorch's CPU wheel index where this machine reaches it, else from PyPI, whose
# build bundles CUDA (a ~8 GB venv); the install says which. TORCH_INDEX= (empty) skips the
# CPU index.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo-output
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-quick lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -rf $(VENV)/cpu-torch; \
	if [ -z "$(TORCH_INDEX)" ]; then \
		echo "torch: the CPU wheel index is skipped (TORCH_INDEX is empty)"; \
	elif $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch: keeping the torch already in $(VENV) (make clean first to install another build)"; \
	elif $(PY) -m pip download -q --no-deps --retries 0 --timeout 20 --index-url $(TORCH_INDEX) \
			-d $(VENV)/cpu-torch "torch==2.9.0+cpu" 2>$(VENV)/cpu-torch.log \
		&& $(PY) -m pip install -c constraints.txt $(VENV)/cpu-torch/torch-*.whl 2>>$(VENV)/cpu-torch.log; then \
		echo "torch: PyTorch's CPU wheel, from $(TORCH_INDEX)"; \
	else \
		echo "torch: no CPU wheel from $(TORCH_INDEX) (pip: $$(grep -m 1 -o 'ERROR: .*' $(VENV)/cpu-torch.log | cut -c 8-140)); PyPI's torch instead"; \
	fi; \
	rm -rf $(VENV)/cpu-torch $(VENV)/cpu-torch.log
	$(PY) -m pip install -c constraints.txt -e '.[dev,export]'
	@$(PY) -c "import torch; print('torch', torch.__version__, 'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU only', 'in $(VENV)')"
	touch $(STAMP)

# --durations: CI's log then says which tests use up the suite's 25 minutes
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# formatting, lint and types: what CI checks before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff format --check pyact_torch tests bench scripts
	$(VENV)/bin/ruff check pyact_torch tests bench scripts
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(VENV)/bin/pyact demo --out $(DEMO)

bench: $(STAMP)
	$(PY) bench/preprocess.py
	$(PY) bench/train.py
	$(PY) bench/evaluate.py
	$(PY) bench/detect.py
	$(PY) bench/accelerator.py --device cpu --out bench-accelerator.json

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
