# The two commands of the README:
#   make demo   install everything, build the default model if absent, run the main job
#   make test   install everything, then lint and run the test suite
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench
setup:
	@bash deploy/setup.sh

demo: setup
	$(BIN)/gradprobe demo --plot artifacts/demo.png

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.features
