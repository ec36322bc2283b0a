# Two entry points for a fresh machine with Python 3.11:
#   make demo [DATA=<corpus folder>]   train + evaluate the small Conv-TasNet, write examples
#   make test                          run the test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   ?=
DEMO_MINUTES ?= 4
DEMO_OUT ?= results/demo

.PHONY: demo test venv clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-ref.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or run: make PYTHON=python3 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# reference code the tests compare with (MossFormer2: clearvoice), without its own pins
	$(PY) -m pip install --quiet --no-deps -r requirements-ref.txt
	# SoundFont synthesiser for modules/data/music.py; --no-deps: its pyaudio is not needed offline
	$(PY) -m pip install --quiet --no-deps tinysoundfont==0.3.7
	# GE2E speaker-encoder weights for modules/models/speaker.py; --no-deps: only its
	# pretrained.pt is read (its librosa/webrtcvad front end is not used)
	$(PY) -m pip install --quiet --no-deps resemblyzer==0.1.4
	# benchmark peer of bench/convtasnet.py; --no-deps: only its model code is used
	$(PY) -m pip install --quiet --no-deps asteroid==0.7.0 asteroid-filterbanks==0.4.0
	# the project itself (editable): `import modules` works from anywhere inside the venv
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) recipes/separation/train.py recipes/separation/hparams/convtasnet-small.yaml \
		--max_train_minutes=$(DEMO_MINUTES) --output_folder=$(DEMO_OUT) \
		--segment_seconds=1 --n_test=20 \
		$(if $(DATA),--data_folder=$(DATA),)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
