# `make run` and `make test` create .venv and install what they need on first use, every
# package from a lock (exact versions, hash-checked; `make lock` writes them): pylock.toml
# (PEP 751, exported from uv.lock) for tests and benchmarks, requirements/run.txt for serving.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
LOCKS  := requirements
ARGS   ?=
# uv uses the Python it is given; these machines reach only package registries.
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test test-fast test-latest lint bench load lock install-run install-dev kafka-libs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# uv, itself pinned by hash, installs everything else.
$(UV): $(LOCKS)/uv.txt | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r $(LOCKS)/uv.txt
	touch $@

# $(call sync,LOCK): make .venv hold exactly LOCK's packages (hash-checked), then the project
# itself, editable, built by the locked setuptools.
sync = $(UV) pip sync -q --python $(BIN)/python --require-hashes $(1) \
	&& $(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .

# Serving needs no torch: `make run` installs the serving lock alone.
$(VENV)/.run-installed: $(LOCKS)/run.txt pyproject.toml | $(UV)
	$(call sync,$(LOCKS)/run.txt)
	rm -f $(VENV)/.dev-installed
	touch $@

# Tests and benchmarks also train (torch from PyPI, runs on the CPU) and lint.
$(VENV)/.dev-installed: pylock.toml pyproject.toml | $(UV)
	$(call sync,pylock.toml)
	touch $@ $(VENV)/.run-installed

install-run: $(VENV)/.run-installed
install-dev: $(VENV)/.dev-installed

run: install-run
	$(BIN)/mur up $(ARGS)

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: install-dev lint browser proxy kafka-libs
	$(BIN)/pytest

test-fast: install-dev
	$(BIN)/pytest -m "not slow"

# The locks, resolved anew for every platform and Python >= 3.11 with hashes: uv.lock (the
# project's lock, all extras) first, exported as pylock.toml (what the tests run on), then
# requirements/train.txt (serving + torch, the trainer image) and requirements/run.txt
# (serving; pip-installable, for the image) constrained to the same versions. LOCK_UPGRADE= keeps the current pins where pyproject.toml
# still allows them (after adding a dependency); the default takes the newest releases.
LOCK_UPGRADE ?= --upgrade
compile = $(UV) pip compile -q --universal --generate-hashes --python-version 3.11 \
	$(LOCK_UPGRADE) --output-file $(1) $(2)

lock: | $(UV)
	$(call compile,$(LOCKS)/uv.txt,$(LOCKS)/uv.in)
	$(UV) lock -q $(LOCK_UPGRADE)
	$(UV) export -q --frozen --format pylock.toml --all-extras --no-emit-project -o pylock.toml
	@set -e; pins=$(LOCKS)/pylock-pins.txt; trap 'rm -f "$$pins"' EXIT; \
	$(BIN)/python $(LOCKS)/pins.py pylock.toml > "$$pins"; \
	$(call compile,$(LOCKS)/train.txt,pyproject.toml $(LOCKS)/build.in --extra train -c "$$pins"); \
	$(call compile,$(LOCKS)/run.txt,pyproject.toml $(LOCKS)/build.in -c "$$pins")

# Tomorrow's `make lock`, tried today: the newest releases pyproject.toml allows, in a
# throw-away venv, through lint, type-check and the fast tests; first, what differs from
# pylock.toml.
test-latest: | $(UV)
	@set -e; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; py="$$tmp/venv/bin/python"; \
	$(UV) venv -q --python $(PYTHON) "$$tmp/venv"; \
	$(UV) pip install -q --python "$$py" --upgrade -e '.[dev,train]'; \
	$(UV) pip freeze -q --python "$$py" --exclude-editable | sort > "$$tmp/latest.txt"; \
	$(PYTHON) $(LOCKS)/pins.py pylock.toml | cut -d' ' -f1 | sort > "$$tmp/locked.txt"; \
	echo "newer than pylock.toml:"; comm -13 "$$tmp/locked.txt" "$$tmp/latest.txt" | sed 's/^/  /'; \
	"$$tmp/venv/bin/ruff" check src tests bench; \
	"$$tmp/venv/bin/mypy" --cache-dir "$$tmp/mypy-cache"; \
	"$$tmp/venv/bin/pytest" -m "not slow"

# The benchmark suite (bench/__main__.py): every stage in order, results in bench/results/,
# then a one-screen summary of the ratios. ARGS=--quick (or BENCH_QUICK=1): small sizes.
bench: install-dev
	$(BIN)/python -m bench $(ARGS)

# Forecast quality: trains the bundled default's candidates on ../shared, picks the champion
# by the serving rule, rewrites the README's table (not part of `make bench`: ~15 min).
# ARGS=--install also replaces the bundled models.
forecasts: install-dev
	$(BIN)/python -m bench.forecasts $(ARGS)

# One API worker under SSE clients and polling load (not part of `make bench`).
load: install-dev
	$(BIN)/python -m bench.load $(ARGS)

# The dashboard's charting library, vendored (committed) so that `make run` needs no npm and
# the page loads nothing from the internet. Re-run only to change the pinned version.
LWC_VERSION := 5.2.1
VENDOR_DIR  := src/makeusrich/api/static/vendor
LWC_FILE    := lightweight-charts.standalone.production.js

# Writes vendor.json after checking the packed tarball against the registry's integrity.
define VENDOR_MANIFEST_JS
const fs = require("fs"), crypto = require("crypto"), env = process.env;
const pack = JSON.parse(fs.readFileSync("pack.json", "utf8"))[0];
if (pack.integrity !== env.REGISTRY_INTEGRITY)
  throw new Error("tarball " + pack.integrity + " != registry " + env.REGISTRY_INTEGRITY);
const body = fs.readFileSync(env.DEST + "/" + env.FILE);
const manifest = {
  name: pack.name, version: pack.version, file: env.FILE, license: "LICENSE",
  sha256: crypto.createHash("sha256").update(body).digest("hex"),
  integrity: pack.integrity, source: "npm pack " + pack.id,
};
fs.writeFileSync(env.DEST + "/vendor.json", JSON.stringify(manifest, null, 2) + "\n");
console.log("vendored " + pack.id + " -> " + env.DEST + "/" + env.FILE);
endef
export VENDOR_MANIFEST_JS

.PHONY: vendor browser proxy

vendor:
	@command -v npm >/dev/null || { echo "make vendor needs npm (Node.js)"; exit 1; }
	set -e; dest="$$(pwd)/$(VENDOR_DIR)"; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	cd "$$tmp"; \
	npm pack --silent --json lightweight-charts@$(LWC_VERSION) > pack.json; \
	tar -xzf lightweight-charts-$(LWC_VERSION).tgz package/dist/$(LWC_FILE) package/LICENSE; \
	mkdir -p "$$dest"; \
	cp package/dist/$(LWC_FILE) package/LICENSE "$$dest/"; \
	REGISTRY_INTEGRITY="$$(npm view lightweight-charts@$(LWC_VERSION) dist.integrity)" \
	DEST="$$dest" FILE=$(LWC_FILE) node -e "$$VENDOR_MANIFEST_JS"

# $(call apt_install,FILES,PACKAGES[,APT OPTIONS]): install Debian's PACKAGES with apt
# unless every one of FILES is already there and executable.
apt_install = @missing=; for file in $(1); do [ -x "$$file" ] || missing=1; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	echo "installing $(2) (apt)"; \
	$$sudo apt-get update -q && $$sudo apt-get install -y -q $(3) $(2)

# Debian's chromium and chromedriver for the dashboard's headless-browser test.
browser:
	$(call apt_install,/usr/bin/chromium /usr/bin/chromedriver,chromium chromium-driver)

# Debian's nginx for the reverse-proxy test (tests/integration/test_proxy.py), which runs it
# with infra/nginx/api-proxy.conf in front of two API replicas, on ports of its own.
proxy:
	$(call apt_install,/usr/sbin/nginx,nginx,--no-install-recommends)

# Apache Kafka's own jars (the version pinned in infra/kafka/pom.xml), resolved once by Maven
# with checksums verified, into $(KAFKA_LIBS) (ignored by git): the test suite's 3-broker
# tier and `mur up --kafka apache` run them with `java`. Debian's maven and JRE 17 if absent.
# The lock: infra/kafka/kafka-libs.sha256 lists every jar (transitive ones too) by sha256; a
# jar set that differs fails here. After changing the pom: (cd .kafka-libs && sha256sum
# *.jar) > infra/kafka/kafka-libs.sha256.
KAFKA_LIBS := .kafka-libs

kafka-libs: $(KAFKA_LIBS)/.resolved

$(KAFKA_LIBS)/.resolved: infra/kafka/pom.xml infra/kafka/kafka-libs.sha256
	$(call apt_install,/usr/bin/mvn /usr/bin/java,maven openjdk-17-jre-headless,--no-install-recommends)
	rm -rf $(KAFKA_LIBS)
	mvn -q -B --strict-checksums -f infra/kafka/pom.xml -Dkafka.libs.dir=$(abspath $(KAFKA_LIBS)) package
	cd $(KAFKA_LIBS) && sha256sum --quiet --strict -c $(abspath infra/kafka/kafka-libs.sha256) \
		&& [ "$$(ls *.jar | wc -l)" = "$$(wc -l < $(abspath infra/kafka/kafka-libs.sha256))" ]
	touch $@

clean:
	rm -rf $(VENV) $(KAFKA_LIBS) .mur .pytest_cache .mypy_cache .ruff_cache .hypothesis
