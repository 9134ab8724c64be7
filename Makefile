# pgdispatch: the only entry point. `make help` lists the targets.
.DEFAULT_GOAL := all
SHELL := /bin/bash

CC       ?= cc
PYTHON   := /usr/bin/python3
BUILD    := build
PG_INC   := $(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wformat=2
CFLAGS   ?= -O2 -g
ALLCFLAGS = -std=c11 -D_GNU_SOURCE $(WARN) $(CFLAGS) -Isrc/common -I$(PG_INC)
SANFLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
LIBS     := -lpq -lcurl -lmicrohttpd -ljansson -lm

# Debian packages a fresh Debian 12 machine needs for build, test and run.
DEB_PACKAGES := build-essential pkg-config libpq-dev libcurl4-openssl-dev libmicrohttpd-dev \
	libjansson-dev libcmocka-dev postgresql-15 postgresql-contrib postgresql-15-pgtap \
	libtap-parser-sourcehandler-pgtap-perl python3-pytest python3-psycopg curl procps \
	$(if $(shell command -v npm),,nodejs npm)

# libFuzzer (make fuzz, make test-fuzz): clang and its runtime (only recommended by clang-14).
DEB_PACKAGES += clang libclang-rt-14-dev

# Instructions per call of the hot SQL functions (bench/sqlcost.py, part of make bench).
DEB_PACKAGES += valgrind

# The network-cut fault test drops a daemon's packets with iptables (as root).
DEB_PACKAGES += iptables

COMMON_SRC  := $(wildcard src/common/*.c)
GATEWAY_SRC := $(wildcard src/gateway/*.c)
DAEMON_SRC  := $(wildcard daemon/*.c)
FAKE_SRC    := $(wildcard tests/fake_provider/*.c)
UNIT_SRC    := $(wildcard tests/unit/test_*.c)
HEADERS     := $(wildcard src/common/*.h src/gateway/*.h daemon/*.h tests/fake_provider/*.h)

# Unit tests link every module except the programs' main.c.
LIB_SRC := $(COMMON_SRC) $(filter-out %/main.c,$(GATEWAY_SRC) $(DAEMON_SRC))

BINARIES := $(if $(GATEWAY_SRC),$(BUILD)/pgdispatch-gateway) \
            $(if $(DAEMON_SRC),$(BUILD)/pgdispatch-daemon) \
            $(if $(FAKE_SRC),$(BUILD)/fake-provider)
SAN_BINARIES := $(patsubst $(BUILD)/%,$(BUILD)/san/%,$(BINARIES))
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/san/unit/%,$(UNIT_SRC))

.PHONY: all help deps sdk-deps build test test-unit test-sql test-integration migrate run clean

all: build ## build the programs

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

deps: ## install missing Debian packages (a no-op when all are there)
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "deps: installing" $$missing; \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@$(MAKE) --no-print-directory sdk-deps

# Node or npm from the machine (Debian's nodejs and npm when it had none, see DEB_PACKAGES).
sdk-deps: ## install the OpenAI Node SDK for the streaming checks (npm ci into tests/sdk, once)
	@[ -d tests/sdk/node_modules ] || npm ci --prefix tests/sdk --no-audit --no-fund

build: $(BINARIES) $(SAN_BINARIES) ## build the programs and their sanitizer builds

$(BUILD)/pgdispatch-gateway: $(COMMON_SRC) $(GATEWAY_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ $(COMMON_SRC) $(GATEWAY_SRC) $(LIBS)
$(BUILD)/pgdispatch-daemon: $(COMMON_SRC) $(DAEMON_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ $(COMMON_SRC) $(DAEMON_SRC) $(LIBS)
$(BUILD)/fake-provider: $(COMMON_SRC) $(FAKE_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ $(COMMON_SRC) $(FAKE_SRC) $(LIBS)

$(BUILD)/san/pgdispatch-gateway: $(COMMON_SRC) $(GATEWAY_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) $(SANFLAGS) -o $@ $(COMMON_SRC) $(GATEWAY_SRC) $(LIBS)
$(BUILD)/san/pgdispatch-daemon: $(COMMON_SRC) $(DAEMON_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) $(SANFLAGS) -o $@ $(COMMON_SRC) $(DAEMON_SRC) $(LIBS)
$(BUILD)/san/fake-provider: $(COMMON_SRC) $(FAKE_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) $(SANFLAGS) -o $@ $(COMMON_SRC) $(FAKE_SRC) $(LIBS)

$(BUILD)/san/unit/%: tests/unit/%.c $(LIB_SRC) $(HEADERS)
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) $(SANFLAGS) -Isrc/gateway -Idaemon -o $@ $< $(LIB_SRC) $(LIBS) -lcmocka

# The benchmarks' C clients are compiled by `make test` too (warnings are errors), not run.
BENCH_BINS := $(BUILD)/loadgen $(BUILD)/hopfloor $(BUILD)/pgsubmit

test: deps build $(BENCH_BINS) ## run every suite: C unit (ASan+UBSan), fuzz (20 s each), pgTAP, integration
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-fuzz
	$(MAKE) --no-print-directory test-sql
	$(MAKE) --no-print-directory test-integration

test-unit: $(UNIT_BINS) ## C unit tests under AddressSanitizer and UBSan (with a throwaway PostgreSQL)
	$(PYTHON) tests/pgharness.py run -- sh -ec 'for t in $(UNIT_BINS); do echo "== $$t"; \
	    PGDISPATCH_TEST_DATABASE_URL="$$DATABASE_URL" ASAN_OPTIONS=detect_leaks=1 $$t; done'

test-sql: ## pgTAP tests of every SQL function, against a throwaway server
	$(PYTHON) tests/pgharness.py run -- pg_prove --verbose --failures --shuffle tests/sql/*.sql

# The integration suite runs once, against the ASan/UBSan builds: every process it
# starts must exit cleanly, so a leak or undefined behaviour fails the test.
test-integration: build sdk-deps ## pytest against real PostgreSQL, the sanitizer builds of the binaries, fake provider
	PGD_SANITIZE=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 $(PYTHON) -m pytest -q tests/integration

run: deps build ## run the whole system locally: PostgreSQL, provider, daemon, gateway on :8080
	$(PYTHON) tests/run_local.py

migrate: ## apply sql/NNN_*.sql to the database in DATABASE_URL (or the PG* environment)
	sh sql/migrate.sh

clean: ## remove build output
	rm -rf $(BUILD)

# Benchmarks (../shared/BENCHMARKS.md): `make bench` measures B1-B9 into bench/RESULTS.md;
# `make bench B=B4` (or B="B1 B6") runs only those; bench/out/ keeps logs and raw JSON.
.PHONY: bench bench-sqlcost
$(BUILD)/loadgen: bench/loadgen.c
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ bench/loadgen.c -lm
$(BUILD)/hopfloor: bench/hopfloor.c bench/benchutil.h
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ bench/hopfloor.c -lpq -lm
$(BUILD)/pgsubmit: bench/pgsubmit.c bench/benchutil.h
	@mkdir -p $(@D)
	$(CC) $(ALLCFLAGS) -o $@ bench/pgsubmit.c -lpq

bench: deps $(BINARIES) $(BENCH_BINS) ## measure BENCHMARKS.md B1-B9 into bench/RESULTS.md (one: B=B4)
	$(PYTHON) bench/run.py $(if $(B),--only "$(B)")
bench-sqlcost: deps ## instructions a backend runs per call of exchange, submit_many and results (callgrind)
	$(PYTHON) bench/sqlcost.py

.PHONY: test-compose
test-compose: ## run docker-compose.yml for real (podman-compose, as root) and check the running system
	bash docker/test-compose.sh

# libFuzzer targets (tests/fuzz/): the gateway's request parsing, the daemon's provider
# response classification and its SSE relay, built with clang under ASan+UBSan from the
# module sources (no main.c). `make test` runs each for FUZZ_TEST_SECONDS; `make fuzz`
# for FUZZ_SECONDS. New inputs go to build/fuzz/corpus/<target> (seeds stay in
# tests/fuzz/corpus/<target>); a crash leaves build/fuzz/crash-* and fails the run.
.PHONY: fuzz test-fuzz
FUZZ_CC           ?= clang
FUZZ_SECONDS      ?= 300
FUZZ_TEST_SECONDS ?= 20
FUZZ_TARGETS      := fuzz_gateway_request fuzz_daemon_classify fuzz_daemon_relay
FUZZ_BINS         := $(addprefix $(BUILD)/fuzz/,$(FUZZ_TARGETS))
FUZZ_FLAGS        := -std=c11 -D_GNU_SOURCE $(filter-out -Werror,$(WARN)) -g -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Isrc/common -Isrc/gateway -Idaemon -I$(PG_INC)
FUZZ_BUILD = @mkdir -p $(@D); echo "$(FUZZ_CC) -o $@ $(filter %.c,$^)"; \
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $(filter %.c,$^) -ljansson -lcurl -lm

$(BUILD)/fuzz/fuzz_gateway_request: tests/fuzz/fuzz_gateway_request.c src/gateway/request.c src/gateway/errors.c \
		src/gateway/batch.c src/common/buf.c $(HEADERS)
	$(FUZZ_BUILD)
$(BUILD)/fuzz/fuzz_daemon_classify: tests/fuzz/fuzz_daemon_classify.c daemon/provider.c daemon/relay.c src/common/clock.c src/common/log.c \
		src/common/buf.c $(HEADERS)
	$(FUZZ_BUILD)
$(BUILD)/fuzz/fuzz_daemon_relay: tests/fuzz/fuzz_daemon_relay.c daemon/relay.c src/common/buf.c $(HEADERS)
	$(FUZZ_BUILD)

test-fuzz: $(FUZZ_BINS) ## run each libFuzzer target for FUZZ_TEST_SECONDS (20) from its seed corpus
	@for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(BUILD)/fuzz/corpus/$$t; \
	    echo "== $$t: $(FUZZ_TEST_SECONDS) s"; \
	    if ! ASAN_OPTIONS=detect_leaks=1 $(BUILD)/fuzz/$$t -max_total_time=$(FUZZ_TEST_SECONDS) -timeout=10 \
	            -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=$(BUILD)/fuzz/ \
	            $(BUILD)/fuzz/corpus/$$t tests/fuzz/corpus/$$t >$(BUILD)/fuzz/$$t.log 2>&1; then \
	        tail -60 $(BUILD)/fuzz/$$t.log; echo "$$t FAILED (log: $(BUILD)/fuzz/$$t.log)"; exit 1; fi; \
	    grep -E '^stat::(number_of_executed_units|new_units_added)' $(BUILD)/fuzz/$$t.log | tr '\n' ' '; echo; \
	done

fuzz: ## run each libFuzzer target for FUZZ_SECONDS (300)
	$(MAKE) --no-print-directory test-fuzz FUZZ_TEST_SECONDS=$(FUZZ_SECONDS)

# Longer fault runs (tests/RELIABILITY.md, second table): test_faults.py with PGD_FAULTS_LONG=1 —
# 45 s of load around a daemon kill, three PostgreSQL outages per shutdown mode, 60 s at 3x capacity —
# against the release builds, so the peak RSS it reports (and checks stays flat) is the programs' own.
.PHONY: test-long
test-long: build ## longer fault and overload runs (about 6 minutes); writes the long table of tests/RELIABILITY.md
	PGD_FAULTS_LONG=1 $(PYTHON) -m pytest -q tests/integration/test_faults.py
