# discgeo — thin aliases. CI runs `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD ?= build
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup system-deps up down k8s-validate images base-image kube-play kube-down bench-containers run test test-fast lint typecheck format bench bench-quick bench-gateway bench-geometry bench-real reliability real-discs reproduce train-autoencoder seg-data train-segmenter finetune-segmenter loo-segmenter train-classifier clean

setup: $(STAMP)

# One environment for everything: the torch pin makes pip take the CPU wheel on the build machines,
# onnxruntime-gpu is the only ONNX runtime (it runs on CPU too).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,services,training]'
	@touch $@

# The main job on a built-in sample: a synthetic lumbar study written as DICOM, then the whole
# pipeline on it (segment, measure, encode, classify) with JSON, SEG, SR and an overview PNG.
run: setup
	rm -rf $(BUILD)/sample $(BUILD)/sample-results
	$(VENV)/bin/discgeo phantom $(BUILD)/sample --cases 1 --seed 42 --format dicom --contrast t1 --quiet
	$(VENV)/bin/discgeo info $(BUILD)/sample/case-0000/dicom
	$(VENV)/bin/discgeo run $(BUILD)/sample/case-0000/dicom --out $(BUILD)/sample-results

# Debian tools the integration tests use (installed when running as root, e.g. in CI).
SYSTEM_PACKAGES := dicom3tools dcmtk orthanc prometheus postgresql podman buildah runc catatonit mmdebstrap
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	else echo "not root: install $(SYSTEM_PACKAGES) yourself for the full test suite"; fi

# The five services and Orthanc (as the PACS) on loopback; see README "Running the stack".
up: setup
	$(PY) -m discgeo.local up

down:
	@test -x $(PY) && $(PY) -m discgeo.local down || true

# Render every kustomize overlay and validate it (schemas, CRDs, policies); also part of the test suite.
k8s-validate: setup
	$(PY) deploy/k8s/validate.py

# Service images (deploy/images.py): the shared runtime and five thin service images, CPU and GPU
# variants (VARIANTS=cpu for one), with podman or docker; on python:3.11-slim where a registry answers,
# else on the Debian base of `make base-image`. Sizes: bench/results/images.{json,md}.
VARIANTS ?= cpu gpu
images: setup system-deps
	$(PY) deploy/images.py $(foreach v,$(VARIANTS),--variant $(v))

# The manifests on this host: deploy/k8s/overlays/local under `podman kube play` (deploy/kube.py), the
# CPU images (make images VARIANTS=cpu first); kube-down removes its pods and volumes.
kube-play: setup system-deps
	$(PY) deploy/kube.py play

kube-down: setup
	$(PY) deploy/kube.py down

# The containerised stack end to end (storescu -> gateway container -> SEG + SR in Orthanc, Prometheus
# scraping the containers), start-to-ready per service and studies/min: bench/results/containers.*
bench-containers: setup system-deps
	$(PY) -m bench.containers

# A Debian bookworm base image from Debian packages (mmdebstrap), for hosts without a registry.
base-image: setup system-deps
	$(PY) deploy/images.py --base-only

lint: setup
	$(VENV)/bin/ruff check src tests services docs bench training deploy
	$(VENV)/bin/ruff format --check src tests services docs bench training deploy

format: setup
	$(VENV)/bin/ruff format src tests services docs bench training deploy
	$(VENV)/bin/ruff check --fix src tests services docs bench training deploy

typecheck: setup
	$(VENV)/bin/mypy

test: setup system-deps lint typecheck
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(BUILD) .pytest_cache .mypy_cache .ruff_cache

# per-stage times, HTTP vs embedded, torch vs ORT, the reference recipe, scaling (~6 min on 2 cores)
bench: setup
	$(PY) -m bench.pipeline

# the same with one study per path; no scaling, peak-memory child or segmenter torch run (< 3 min)
bench-quick: setup
	$(PY) -m bench.pipeline --quick

# The gateway under load: K = 1, 2, 4 workers, ten concurrent studies, a 300 MB STOW-RS body.
bench-gateway: setup
	$(PY) -m bench.gateway

# Bad input, load and faults through every entry point of the real stack on loopback, and a PHI audit
# (~7 min on 2 cores): bench/results/reliability.{json,md}. Also a test of `make test`.
reliability: setup system-deps
	$(PY) -m bench.reliability

bench-geometry: setup
	$(PY) -m bench.geometry --cases 6

# The real T2 cases and the 145 real healthy discs through the pipeline, fast and accurate mode
# (bench/results/real_cases*), and
# the segmenter on the 34 vb-mri volumes scored against their vertebral bodies (bench/results/vb_mri.*;
# DISCGEO_SEGMENTER_MODE=accurate python -m bench.vb_mri for the accurate mode, ~8x the time) and on the
# phantom variants that test level naming (bench/results/level_phantoms.*): ~17 min.
bench-real: setup
	$(PY) -m bench.real_cases
	DISCGEO_SEGMENTER_MODE=accurate $(PY) -m bench.real_cases
	$(PY) -m bench.vb_mri
	$(PY) -m bench.level_phantoms

# Model training (CPU defaults; see each script's --help). Artifacts land in models/.
# Real reference anatomy (src/discgeo/reference_discs.json) and the phantoms against it
# (training/results/real-discs.md and its pictures).
real-discs: setup
	$(PY) -m training.real_discs

# The reference study's tables from a SPIDER download (training/reproduce.py; README "Reproducing the
# study"): make reproduce SPIDER=DIR [LABELS=spider|FILE] [QUICK=1] [CONTRAST=t1|t2] [OUT=build/reproduce]
reproduce: setup
	@test -n "$(SPIDER)" || { echo "usage: make reproduce SPIDER=/path/to/SPIDER [LABELS=spider|FILE] [QUICK=1] [CONTRAST=t1|t2] [OUT=DIR]"; exit 2; }
	$(PY) -m training.reproduce --spider $(SPIDER) --labels $(or $(LABELS),spider) --contrast $(or $(CONTRAST),t1) $(if $(QUICK),--quick) --out $(or $(OUT),$(BUILD)/reproduce)

# The shipped autoencoder's recipe (about 40 min on 2 CPU cores without AVX-512): 50 calibrated phantom
# patients and every real mask (7 real subjects held out), sagittally aligned crops, Adam 1e-3 to
# epoch 28, 3e-4 to 35, 1e-4 to 38.
AE_T = --data $(BUILD)/ae-data --run $(BUILD)/ae-run --bottleneck 4 --batch 8 --checkpoint-every 2 --monitor 64
train-autoencoder: setup
	$(PY) -m training.autoencoder data --out $(BUILD)/ae-data --phantoms 50 --seed 7
	$(PY) -m training.autoencoder train $(AE_T) --epochs 28 --lr 1e-3
	$(PY) -m training.autoencoder train $(AE_T) --epochs 35 --lr 3e-4
	$(PY) -m training.autoencoder train $(AE_T) --epochs 38 --lr 1e-4
	$(PY) -m training.autoencoder export --run $(BUILD)/ae-run --data $(BUILD)/ae-data --out models/autoencoder

# segmenter step decay: 16 epochs at the configuration's rate, resumed to 32 at 1e-4 and to 40 at 3e-5,
# warm restarts to 64 at 1e-4 and 80 at 3e-5, then to 87 at 1e-4 and 94 at 3e-5; the weights of epochs
# 88-94 are averaged and exported.
# CONFIG=gpu (3D, feature size 48: a ~290 MB model, too large for models/) exports to build/segmenter-gpu,
# CONFIG=wide (2D, feature size 24) to build/segmenter-wide. WORKERS=N augments in N processes (on a GPU
# machine the epoch is bound by augmentation otherwise) and makes the phantoms in N.
SEG_CONFIG = $(or $(CONFIG),cpu)
SEG_DATA = $(BUILD)/seg-data-$(SEG_CONFIG)
SEG_OUT = $(if $(filter cpu,$(SEG_CONFIG)),models/segmenter,$(BUILD)/segmenter-$(SEG_CONFIG))
# $(call seg_schedule,RUN,EXTRA): the schedule above into RUN (EXTRA: e.g. --exclude case-11), weights averaged into RUN-avg
define seg_schedule
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 16
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 32 --lr 1e-4
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 40 --lr 3e-5
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 64 --lr 1e-4
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 80 --lr 3e-5
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 87 --lr 1e-4
	$(PY) -m training.segmenter train $(SEG_T) --run $(1) $(2) --epochs 94 --lr 3e-5 --snapshots-from 88
	$(PY) -m training.segmenter average --checkpoints $(foreach e,088 089 090 091 092 093 094,$(1)/epoch-$(e).pt) --data $(SEG_DATA) --out $(1)-avg
endef
SEG_T = --data $(SEG_DATA) --config $(SEG_CONFIG) --real-weight 5 --workers $(or $(WORKERS),0)

seg-data: setup
	$(PY) -m training.segmenter data --out $(SEG_DATA) --config $(SEG_CONFIG) --phantoms 50 --seed 11 --workers $(or $(WORKERS),1) $(if $(DATA),--spider $(DATA))

train-segmenter: seg-data
	$(call seg_schedule,$(BUILD)/seg-run-$(SEG_CONFIG))
	$(PY) -m training.segmenter export --run $(BUILD)/seg-run-$(SEG_CONFIG)-avg --out $(SEG_OUT)

# Fine-tuning an exported model (SEG_BASE, default models/segmenter) on the data of `seg-data` plus the
# vb-mri partial labels: 8 epochs at 1e-4 and 6 at 3e-5, the weights of epochs 9-14 averaged (with
# SEG_CONFIG=anatomy: the network grown to the vertebral-body and sacrum classes, see below),
# exported and scored to build/segmenter-ft-CONFIG (training/results/segmenter.md, "Fine-tuning
# on vb-mri": a candidate, not shipped).
SEG_BASE ?= models/segmenter
SEG_FT = $(BUILD)/seg-ft-$(SEG_CONFIG)
SEG_FT_DATA = $(BUILD)/seg-data-vb-$(SEG_CONFIG)
# the anatomy configuration's body and sacrum classes start from a new head: a longer, faster first
# stage (14 epochs at 3e-4, then 6 at 3e-5, epochs 15-20 averaged)
SEG_FT_LR = $(if $(filter anatomy,$(SEG_CONFIG)),3e-4,1e-4)
SEG_FT_E1 = $(if $(filter anatomy,$(SEG_CONFIG)),14,8)
SEG_FT_E2 = $(shell echo $$(($(SEG_FT_E1) + 6)))
SEG_FT_AVG = $(shell seq -f %03g $$(($(SEG_FT_E1) + 1)) $(SEG_FT_E2))
SEG_FT_T = --data $(SEG_FT_DATA) --config $(SEG_CONFIG) --real-weight 5 --workers $(or $(WORKERS),0)
finetune-segmenter: setup
	$(PY) -m training.segmenter data --out $(SEG_FT_DATA) --config $(SEG_CONFIG) --phantoms 50 --seed 11 --vb-mri --workers $(or $(WORKERS),1)
	$(PY) -m training.segmenter train $(SEG_FT_T) --run $(SEG_FT) --init-from $(SEG_BASE) --epochs $(SEG_FT_E1) --lr $(SEG_FT_LR)
	$(PY) -m training.segmenter train $(SEG_FT_T) --run $(SEG_FT) --epochs $(SEG_FT_E2) --lr 3e-5 --snapshots-from $(firstword $(SEG_FT_AVG))
	$(PY) -m training.segmenter average --checkpoints $(foreach e,$(SEG_FT_AVG),$(SEG_FT)/epoch-$(e).pt) --data $(SEG_FT_DATA) --out $(SEG_FT)-avg
	$(PY) -m training.segmenter export --run $(SEG_FT)-avg --out $(BUILD)/segmenter-ft-$(SEG_CONFIG)

# leave-one-case-out of the same recipe: one run per real case without it, each scored on its case (in
# both modes where the configuration has two) and recorded in the exported artifact, which must exist
# (about 3 h per run on the CPU, 94 epochs of ~115 s; 15-25 min on an H200 with WORKERS=13)
SEG_LOO_RUNS = $(foreach case,11 20 25,$(BUILD)/seg-loo-$(SEG_CONFIG)-case-$(case)-avg)
SEG_LOO_OUT = training/results/segmenter-loo$(if $(filter-out cpu,$(SEG_CONFIG)),-$(SEG_CONFIG))
loo-segmenter: seg-data
	$(call seg_schedule,$(BUILD)/seg-loo-$(SEG_CONFIG)-case-11,--exclude case-11)
	$(call seg_schedule,$(BUILD)/seg-loo-$(SEG_CONFIG)-case-20,--exclude case-20)
	$(call seg_schedule,$(BUILD)/seg-loo-$(SEG_CONFIG)-case-25,--exclude case-25)
	$(PY) -m training.segmenter loo --artifact $(SEG_OUT) --runs $(SEG_LOO_RUNS) --out $(SEG_LOO_OUT).md
	$(if $(filter gpu,$(SEG_CONFIG)),,$(PY) -m training.segmenter loo --artifact $(SEG_OUT) --runs $(SEG_LOO_RUNS) --mode accurate --out $(SEG_LOO_OUT)-accurate.md)

train-classifier: setup
	$(PY) -m training.classifier --cohort $(BUILD)/cohort --cases 240 --seed 2024 --segmented 40
