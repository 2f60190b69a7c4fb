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

# The main job: speed and accuracy of a pretrained MobileNetV2 and two random-init backbones,
# cached head vs frozen vs full fine-tuning vs LP-FT, on a quick subset, with the data
# analysis (report in runs/demo/report.md and report.html).
demo: setup
	$(VENV)/bin/xfeat compare --data $(DATA) --models mobilenet_v2,resnet18,shufflenet_v2_x2_0 \
		--weights mobilenet_v2=$(WEIGHTS) --quick --analyze --out runs/demo

# Everything, including the integration tests on the real chest X-rays and the large backbones.
test: setup
	$(PY) -m pytest -m "" -q

# The quick default suite (no integration, no large backbones).
test-fast: setup
	$(PY) -m pytest -q

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -delete
