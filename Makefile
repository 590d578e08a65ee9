# Two commands: `make demo` and `make test`. Each sets up .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo demo-instruct test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# Pin torch here (a CPU wheel on a plain machine); pyproject keeps a range.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/mtnlg demo

demo-instruct: $(STAMP)
	.venv/bin/mtnlg demo --instruct

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv runs
