PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint format bench clean

install:  ## make .venv and install the project with its test extra
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"

test:  ## run the test suite
	$(BIN)/pytest -q

lint:  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench:  ## gptoss-mlx bench on MODEL=converted-folder [SRC=hf-folder to compare with mlx-lm]
	@test -n "$(MODEL)" || { echo "usage: make bench MODEL=converted-folder [SRC=hf-layout-folder]  (see docs/PERFORMANCE.md)"; exit 2; }
	$(BIN)/gptoss-mlx bench -m $(MODEL) $(if $(SRC),--compare-mlx-lm $(SRC),)

clean:
	rm -rf build dist *.egg-info .pytest_cache
