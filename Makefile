# One-command set-up: every target that needs the environment depends on `setup`, which does nothing when the
# environment is already up to date with the pyproject files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
PACKAGES := tera gaussianip rodinhd gas
SETUP_INPUTS := Makefile pyproject.toml shared/avatar_core/pyproject.toml $(foreach p,$(PACKAGES),packages/$(p)/pyproject.toml)
# `make test` runs one xdist worker per core; PYTEST_ARGS adds to these (e.g. PYTEST_ARGS="-k tera -x").
PYTEST_DEFAULTS := -n auto --dist loadfile
PYTEST_ARGS ?=
# Where pip finds torch: empty uses pip's configuration (the CUDA build on a stock machine); a CPU-only machine
# can say TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU wheel (README, "Install").
TORCH_INDEX ?=
CONFIG ?= tiny

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo bench lint train-rodinhd train-tera study-tera train-gaussianip train-gas clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# The pinned torch first, from TORCH_INDEX when given (the CPU wheel index on a CPU-only machine).
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install $(foreach p,$(PACKAGES),-e packages/$(p)) "./shared/avatar_core[dev]"
	# The packages pull the kernel in as a copy; replace it by an editable install of this checkout.
	$(BIN)/pip install --no-deps -e shared/avatar_core
	# lpips: LPIPS's linear heads (read from its wheel by avatar_core.perceptual) and the LPIPS test oracle.
	# --no-deps: it declares torchvision, whose install would replace the pinned torch; it is never imported.
	$(BIN)/pip install --no-deps "lpips==0.1.4"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_DEFAULTS) $(PYTEST_ARGS)

demo: setup
	$(BIN)/python tools/demo.py --out outputs/demo

bench: setup
	$(BIN)/python tools/bench_render.py

lint: setup
	$(BIN)/ruff check .

# RodinHD end to end on the synthetic dataset: stage 1 -> stage 2 -> base -> upsample -> one sample from a held-out
# portrait (CONFIG=paper for the paper's settings).
train-rodinhd: setup
	$(BIN)/rodinhd train-all --config $(CONFIG) --out outputs/rodinhd-$(CONFIG)

# TeRA's tiny pipeline on the synthetic dataset (CONFIG=paper for the paper's settings and your own data).
# The dataset step follows the config: tiny writes its synthetic dataset when missing (data.synthetic: true);
# paper reads your dataset at data.root and never generates one.
train-tera: setup
	$(BIN)/tera fit-teacher --config $(CONFIG) --make-dataset
	$(BIN)/tera distill --config $(CONFIG)
	$(BIN)/tera train --config $(CONFIG)
	$(BIN)/tera generate --config $(CONFIG) "a woman in a red dress"

# TeRA's data-scaling study of text faithfulness (packages/tera/README.md, "The data-scaling study"): 320 synthetic
# avatars, teacher and stage-1 decoder on the first 256 (stage 1's 150 steps scaled to 2400 for 256 avatars), stage 2
# at 16 / 64 / 256 avatars with steps scaled to the data, scored on the captions of the last 64 (about 35 minutes on
# 2 cores; resumes where it stopped).
TERA_STUDY = run_dir=outputs/tera/study data.root=outputs/tera/study-dataset data.num=320 data.max_avatars=256 \
	'evaluate.data_sizes=[16,64,256]' distill.train.max_steps=2400
study-tera: setup
	$(BIN)/tera fit-teacher --make-dataset $(TERA_STUDY)
	$(BIN)/tera distill $(TERA_STUDY)
	$(BIN)/tera train $(TERA_STUDY)
	$(BIN)/tera evaluate $(TERA_STUDY) --overwrite

# GaussianIP: train the embedded prior on synthetic avatars, then generate from a held-out face and a prompt
# (CONFIG=paper for the paper's settings with pretrained weights from local folders; the prompt and face as you like).
train-gaussianip: setup
	$(BIN)/gaussianip train-prior --config $(CONFIG) --overwrite
	$(BIN)/gaussianip generate --config $(CONFIG) --prompt "a woman in a red dress" --out outputs/gaussianip/$(CONFIG)-result --overwrite

# GAS: stage 1 (human NeRF) and stage 2 (video model) on synthetic clips, held-out metrics, then a novel-view orbit
# and a novel-pose clip of a held-out person from one image + parameters file (CONFIG=paper: SVD-xt-1.1 from a
# local folder, see packages/gas/README.md).
GAS_OUT = outputs/gas-$(CONFIG)
train-gas: setup
	$(BIN)/gas train-nerf --config $(CONFIG) --run $(GAS_OUT)
	$(BIN)/gas train-video --config $(CONFIG) --run $(GAS_OUT)
	$(BIN)/gas evaluate --config $(CONFIG) --run $(GAS_OUT)
	$(BIN)/gas reference --config $(CONFIG) --run $(GAS_OUT) --out $(GAS_OUT)/input/person.png --overwrite
	$(BIN)/gas novel-view --config $(CONFIG) --run $(GAS_OUT) --image $(GAS_OUT)/input/person.png --out $(GAS_OUT)/novel_view --overwrite
	$(BIN)/gas novel-pose --config $(CONFIG) --run $(GAS_OUT) --image $(GAS_OUT)/input/person.png --motion walk --out $(GAS_OUT)/novel_pose --overwrite

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
