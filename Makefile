# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each step is guarded by a stamp file or a presence check, so a second run
# skips what is done and takes seconds.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
APT_PACKAGES := espeak-ng flite festival festvox-kallpc16k festvox-us-slt-hts festvox-kdlpc16k fortunes sox
# What KenLM's lmplz and build_binary are compiled with (the word LM).
APT_PACKAGES += cmake g++ make libboost-program-options-dev libboost-system-dev libboost-thread-dev \
  libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev
KENLM_VERSION := 0.3.0
KENLM_SRC := $(VENV)/kenlm-src
DEMO_DIR ?= exp/demo

.PHONY: all setup apt voices browser venv test demo pretrained clean help

help:
	@echo "make demo   - set up, then run the main job on the embedded corpus"
	@echo "make test   - set up, then run the test suite"
	@echo "make setup  - only the set-up (apt packages, .venv, pinned deps)"
	@echo "make pretrained - retrain the committed teacher (benchmark corpus, hours of CPU) into pretrained/"

setup: apt voices venv

# Shell fragments of the apt targets: $$missing = the packages of $(1) that
# dpkg has not installed (each after a space); $$SUDO = sudo unless root.
missing_packages = missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done
SET_SUDO = SUDO=""; if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi

# System packages: the TTS engines and the fortunes text the corpus is made from.
apt:
	@$(call missing_packages,$(APT_PACKAGES)); \
	if [ -z "$$missing" ]; then echo "apt: all present"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "error: apt-get is unavailable; install these packages by hand:$$missing" >&2; exit 1; fi; \
	$(SET_SUDO); \
	echo "apt: installing$$missing"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing

# Voices of other kinds for `streamkd corpus build --more-voices` (MBROLA,
# festival rab_diphone, SVOX Pico), from Debian's contrib and non-free
# sections, which this target enables for the running release when apt has
# no candidate for them. Best effort: where it cannot, it warns, the tests of
# those voices skip, and --more-voices stops with a message naming this target.
VOICE_PACKAGES := mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 festvox-rablpc16k festvox-us1 festvox-us2 festvox-us3 festvox-en1 libttspico-utils
voices:
	@$(call missing_packages,$(VOICE_PACKAGES)); \
	if [ -z "$$missing" ]; then echo "voices: all present"; exit 0; fi; \
	$(SET_SUDO); \
	ok=0; if command -v apt-get >/dev/null && [ -r /etc/os-release ]; then \
	  . /etc/os-release; \
	  need=0; for p in $$missing; do apt-cache policy $$p 2>/dev/null | grep -q "Candidate: [0-9]" || need=1; done; \
	  if [ $$need = 1 ] && [ "$$ID" = debian ]; then \
	    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	      "$$VERSION_CODENAME" | $$SUDO tee /etc/apt/sources.list.d/streamkd-contrib-non-free.sources >/dev/null; \
	  fi; \
	  echo "voices: installing$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing && ok=1; \
	fi; \
	if [ $$ok = 0 ]; then echo "warning: could not install$$missing; --more-voices and its tests need them" >&2; fi

# Debian's chromium for the browser tests of `streamkd serve` (Playwright
# drives it; it never downloads a browser). Where apt cannot install it the
# browser tests skip and say so.
browser:
	@if command -v chromium >/dev/null; then echo "browser: chromium present"; exit 0; fi; \
	$(SET_SUDO); \
	if command -v apt-get >/dev/null && $$SUDO apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; then \
	  echo "browser: chromium installed"; \
	else echo "warning: could not install chromium with apt; the browser tests will be skipped" >&2; fi

# torch is installed first, pinned, so that nothing can pull another build.
$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	touch $@

$(VENV)/.deps: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[dev,lhotse]"
	@$(PY) -c "import torch,sys; v=torch.__version__.split('+')[0]; sys.exit(0 if v=='$(TORCH_VERSION)' else 'torch changed to '+torch.__version__)"
	touch $@

# KenLM's lmplz and build_binary, from the source release on PyPI whose
# Python query module pyproject.toml installs: its lm/builder is compiled into
# the venv's bin, where streamkd looks for them.
$(VENV)/.kenlm: $(VENV)/.deps
	rm -rf $(KENLM_SRC) && mkdir -p $(KENLM_SRC)
	$(PIP) download -q --no-deps --no-binary kenlm kenlm==$(KENLM_VERSION) -d $(KENLM_SRC)
	tar xzf $(KENLM_SRC)/kenlm-$(KENLM_VERSION).tar.gz -C $(KENLM_SRC)
	cmake -S $(KENLM_SRC)/kenlm-$(KENLM_VERSION) -B $(KENLM_SRC)/build -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(MAKE) -s -C $(KENLM_SRC)/build -j$$(nproc) lmplz build_binary >/dev/null
	cp $(KENLM_SRC)/build/bin/lmplz $(KENLM_SRC)/build/bin/build_binary $(VENV)/bin/
	rm -rf $(KENLM_SRC)
	touch $@

venv: $(VENV)/.deps $(VENV)/.kenlm

test: setup browser
	$(PY) -m pytest -x -p no:cacheprovider

demo: setup
	$(VENV)/bin/streamkd demo --out $(DEMO_DIR)

# How pretrained/teacher.pt (what `make demo` distils) was made: the v1
# benchmark teacher, then the v2 teacher that starts from it (both resumable;
# they build their 12 h corpora when missing), then its float16 inference
# checkpoint and language directory.
pretrained: setup
	$(VENV)/bin/streamkd experiment configs/experiments/benchmark_v1.yaml --runs teacher --no-report
	$(VENV)/bin/streamkd experiment configs/experiments/benchmark.yaml --runs teacher --no-report
	$(VENV)/bin/streamkd pretrained --checkpoint exp/benchmark_v2/teacher/final.pt --out pretrained

clean:
	rm -rf $(VENV) exp
