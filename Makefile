# The two commands of the README: `make demo` and `make test`. Each installs
# what it needs on a fresh Debian machine (as root) before running.
GO      ?= go
BIN     := bin/onebox
PKGS    := ./...
TIMEOUT ?= 25m

.PHONY: all build demo dev test test-short bench-membership deps tools clean

all: build

# deps installs system packages the agent and tests use (iproute2 for the
# network-namespace testbed) and downloads the Go modules.
deps:
	@./scripts/deps.sh

build: deps
	$(GO) build -o $(BIN) ./cmd/onebox

demo: build
	./$(BIN) demo

dev: build
	./$(BIN) dev --nodes 3

# test runs every test: unit, fuzz seeds, and integration tests that start
# real agents (the netns ones need root, as in CI).
test: deps
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout $(TIMEOUT) $(PKGS)

test-short: deps
	$(GO) test -short -count=1 $(PKGS)

bench-membership: build
	./$(BIN) bench membership


clean:
	rm -rf bin
