# FaceHub: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Both set up what they need on a fresh Debian machine (apt packages, a venv in .venv).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the pipeline and `make test` use, recommends left out so that this list
# is the whole of it (containers/ci/check-install.sh proves it on a bare Debian root):
# mosquitto + clients (the test brokers, mosquitto_pub), python3-venv (.venv), iproute2
# (`ip netns` in the chaos test), ca-certificates (pip/uv over HTTPS), git (`git ls-files`
# in the secrets test), chromium + chromium-driver (the console's browser tests, through Selenium),
# systemd (systemd-analyze verifies the units in containers/systemd).
# The deployment tools (podman...) are containers/ci/install-deps.sh's.
APT_PACKAGES := mosquitto mosquitto-clients python3-venv iproute2 ca-certificates git chromium chromium-driver systemd

.PHONY: demo test test-fast test-containers test-systemd bench lint deploy deploy-edge deploy-cloud deploy-deps \
        install-deps system-deps venv lock clean sample-clip

demo: system-deps venv            ## run detector -> brokers -> saver on the built-in clip
	$(PY) -m facehub.cli demo

install-deps: system-deps venv deploy-deps  ## everything the tests and test-containers need (.ci/run --install-only)

test: install-deps                ## the whole suite (real brokers, S3, OpenCV, chaos, deployment checks)
	$(PY) -m pytest -q

test-fast: venv                   ## everything but the slow chaos scenario
	$(PY) -m pytest -q -m "not slow"

bench: system-deps venv           ## speed and quality figures (facehub bench)
	$(PY) -m facehub.cli bench

system-deps:                      ## Debian packages the pipeline and tests use
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml requirements/constraints.txt requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip install --python $(PY) -q -c requirements/constraints.txt -e '.[bench]' -r requirements/test.txt
	touch $@

LINT_VENV ?= /tmp/lintvenv
ANSIBLE_ARGS ?= --ask-vault-pass

deploy-deps:                      ## Ansible and lint tools (pinned venv), podman, debootstrap
	FACEHUB_LINT_VENV=$(LINT_VENV) bash containers/ci/install-deps.sh

lint: deploy-deps                 ## playbooks, ansible-lint, yamllint, manifests, Dockerfiles
	FACEHUB_LINT_VENV=$(LINT_VENV) bash containers/ci/lint.sh

test-containers: venv deploy-deps ## build and run the real containers with podman
	FACEHUB_LINT_VENV=$(LINT_VENV) bash containers/ci/test-containers.sh

test-systemd: deploy-deps         ## the edge play's systemd runtime against systemd booted in podman
	FACEHUB_LINT_VENV=$(LINT_VENV) bash containers/ci/test-systemd.sh

deploy-edge: deploy-deps          ## K3s + FaceHub on the edge group
	$(LINT_VENV)/bin/ansible-playbook ansible/edge.yml $(ANSIBLE_ARGS)

deploy-cloud: deploy-deps         ## Docker, s3fs, broker and savers on the cloud group
	$(LINT_VENV)/bin/ansible-playbook ansible/cloud.yml $(ANSIBLE_ARGS)

deploy: deploy-deps               ## both, cloud first
	$(LINT_VENV)/bin/ansible-playbook ansible/site.yml $(ANSIBLE_ARGS)

sample-clip: venv                 ## regenerate facehub/samples/astronaut.mp4 (needs scikit-image)
	$(VENV)/bin/uv pip install --python $(PY) -q -c requirements/constraints.txt scikit-image
	$(PY) tools/make_sample_clip.py

lock:                             ## re-pin every dependency (needs the registry)
	$(VENV)/bin/uv pip compile -q -o requirements/constraints.txt setup.cfg requirements/test.txt

clean:
	rm -rf $(VENV) demo-out build *.egg-info
