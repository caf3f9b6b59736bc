# Two entry points: `make demo` and `make test`. Both create .venv with only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ibstream demo

test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadscope  # not `python -m pytest`: the repo root on sys.path would hide a missed `ibstream.` import

# The gate CI runs before the tests: ruff (rules in pyproject.toml), then mypy with the pydantic
# plugin and the layer contracts (import-linter), both over the package as a wheel installs it
# (the user's folders become ibstream.*).
lint: $(STAMP)
	$(BIN)/ruff check .
	@rm -rf build; tmp=$$(mktemp -d); \
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w $$tmp/wheel . && \
	$(BIN)/python -m zipfile -e $$tmp/wheel/ibstream-*.whl $$tmp/site && \
	(cd $$tmp/site && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $$tmp/mypy -p ibstream && \
	 PYTHONPATH=$$tmp/site $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml); \
	status=$$?; rm -rf $$tmp build; exit $$status

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
