# The two commands a newcomer needs (README): `make demo` and `make test`.
# Both create .venv with the project and its test tools on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCSTAMP := $(VENV)/.installed-docs

# Django 6.x needs Python 3.12+: its tests run in a second venv (see test-django61).
# The first candidate that really runs 3.12 (a pyenv shim may exist but refuse).
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python; do \
    "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 \
    && { command -v "$$p"; break; }; done)
VENV61    := .venv-django61
STAMP61   := $(VENV61)/.installed

# The floors of pyproject.toml, tested: see test-lowest.
VENVLOW   := .venv-lowest
STAMPLOW  := $(VENVLOW)/.installed
LOWEST_PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-django61 test-lowest lint docs typecheck clean

# The first run installs for a minute or two: say so, and let pip show its progress
# (one line per package and its download bars) rather than sit silent.
$(STAMP): pyproject.toml
	@echo "==> [1/3] creating $(VENV) with $(PYTHON) (first run only)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] upgrading pip in $(VENV)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> [3/3] installing mailqueue and its test tools into $(VENV) (a minute or two the first time)"
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)
	@echo "==> $(VENV) is ready"

demo: $(STAMP)
	$(BIN)/mailqueue demo

$(STAMP61): pyproject.toml
	$(PYTHON312) -m venv $(VENV61)
	$(VENV61)/bin/python -m pip install --quiet --upgrade pip
	$(VENV61)/bin/python -m pip install --quiet -e '.[dev]'  # on 3.12 the dev extra picks Django 6.1
	touch $(STAMP61)

# The whole suite on the default Python (Django 5.2 LTS), then the Django
# tests again on Python 3.12 with Django 6.1. With PYTEST_ARGS (a subset) only
# the first run happens; `make test-django61` runs the second on its own. The
# second run includes the hostile-input suite (issue #15), so that the guard
# is also proven on the unpatched Python 3.12.1 (CVE-2024-6923 is fixed only
# from 3.12.5). test_django.py goes first: its session fixture sets Django up.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
ifeq ($(strip $(PYTEST_ARGS)),)
	@$(MAKE) --no-print-directory test-django61
endif

test-django61:
	@if [ -z "$(PYTHON312)" ]; then \
	    case "$$CI" in 1|true|TRUE|True|yes) \
	        echo "CI=true and no Python 3.12 found (set PYTHON312=...): the Django 6.1 tests cannot run" >&2; exit 1;; \
	    esac; \
	    echo "SKIPPED: the Django 6.1 tests need Python 3.12 (none found; set PYTHON312=/path/to/python3.12)"; \
	    exit 0; \
	fi; \
	$(MAKE) --no-print-directory $(STAMP61) && \
	$(VENV61)/bin/python -c "import django, sys; print('Django', django.get_version(), 'on Python', sys.version.split()[0])" && \
	$(VENV61)/bin/python -m pytest tests/test_django.py tests/test_hostile_django.py tests/test_hostile.py \
	    tests/peer/django/test_django61.py \
	    tests/test_django_admin.py tests/test_django_admin_browser.py \
	    $(DJANGO61_PYTEST_ARGS)

# Every direct dependency at the lowest version pyproject.toml allows (uv's
# lowest-direct resolution; what they pull in resolves as usual), then the fast
# part of the suite (everything but the tests that start worker processes,
# about 2 minutes): a floor that is declared is a floor that was tested. The
# venv is built afresh whenever pyproject.toml changes, so nothing newer stays.
$(STAMPLOW): pyproject.toml
	rm -rf $(VENVLOW)
	$(PYTHON) -m venv $(VENVLOW)
	$(VENVLOW)/bin/python -m pip install --quiet --upgrade pip uv
	$(VENVLOW)/bin/uv pip install --quiet --python $(VENVLOW)/bin/python \
	    --resolution lowest-direct -e '.[dev]'
	touch $(STAMPLOW)

test-lowest: $(STAMPLOW)
	$(VENVLOW)/bin/uv pip list --python $(VENVLOW)/bin/python 2>/dev/null \
	    | grep -iE '^(celery|kombu|redis|sqlalchemy|alembic|tenacity|aiosmtplib|aiosmtpd|email-validator|starlette|hypothesis) ' || true
	$(VENVLOW)/bin/python -m pytest $(LOWEST_PYTEST_ARGS)

lint: $(STAMP) $(DOCSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet  # the banner: Material ends its life 2027-05

# The documentation site (docs/, mkdocs.yml) into build/site/; the docs extra
# (MkDocs, Material theme) goes into .venv beside the dev extra.
$(DOCSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCSTAMP)

docs: $(DOCSTAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(VENV61) $(VENVLOW) mailqueue-demo *.db
