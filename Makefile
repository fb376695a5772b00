# Two commands for a fresh clone: `make demo` and `make test`. Each creates .venv and installs
# pyact-torch with its test tools into it the first time (torch 2.9.0 + torch_xla 2.9.0: ~7 GB,
# a few minutes); later runs reuse it. Versions are pinned by constraints.txt (the tested set).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := demo-output

.PHONY: demo test test-quick bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[dev,export]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

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
