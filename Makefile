# `make demo`: set up and run the main job.  `make test`: set up and run every test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
SHARED  ?= ../shared
DATA    ?= $(SHARED)/data/chest_xray224
WEIGHTS ?= $(SHARED)/weights/mobilenet_v2_imagenet_features.pth

.PHONY: setup demo test test-fast clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/xfeat extract --data $(DATA) --model mobilenet_v2 --weights $(WEIGHTS)

# Everything, including the integration tests on the real chest X-rays and the large backbones.
test: setup
	$(PY) -m pytest -m "" -q

# The quick default suite (no integration, no large backbones).
test-fast: setup
	$(PY) -m pytest -q

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -delete
