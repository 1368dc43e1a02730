# mipbits: every target installs what it needs on a fresh Debian machine (run as root).
#   make demo   the demo (see README)
#   make test   the whole test suite, namespace tests included
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables libnetfilter-queue-dev tshark tcpdump iperf3 iproute2 conntrack \
                gcc python3-dev python3-venv procps kmod
STAMP := $(VENV)/.installed

.PHONY: deps sysdeps demo test test-fast bench bench-esp clean

sysdeps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) sysdeps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

deps: sysdeps $(STAMP)

demo: deps
	PYTHON=$(PY) scripts/demo

test: deps
	$(PY) -m pytest -q -ra tests

test-fast: deps
	$(PY) -m pytest -q -ra -m "not netns" tests

bench-esp: deps
	$(PY) scripts/bench-esp

bench: deps
	$(PY) scripts/bench

clean:
	rm -rf $(VENV) build *.egg-info
