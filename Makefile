# The two commands of the README:
#   make demo   install everything, build the default model if absent, run the main job
#   make test   install everything, then lint and run the test suite
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench proto
setup:
	@bash deploy/setup.sh

demo: setup
	$(BIN)/gradprobe demo --plot artifacts/demo.png

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

proto: setup
	$(BIN)/python -m service.protos

bench: setup
	$(BIN)/python -m benchmarks.features
