# One command sets up and runs the demo, one sets up and runs the tests (see README).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python tools/demo.py

# The Cortex-A72 test runs artifacts under qemu; the script installs the emulator and an
# aarch64 Python with the TVM runtime into .aarch64/ (idempotent, fast when done).
# One pytest-xdist worker per CPU; loadscope keeps a module's tests (and its compiled
# fixtures) on one worker.
test: $(STAMP)
	bash tools/setup_aarch64_emulation.sh .aarch64
	$(VENV)/bin/python -m pytest -q -n auto --dist loadscope tests

bench: $(STAMP)
	$(VENV)/bin/python tools/bench.py steps --models mobilenetv2-0.35 resnet18 --train last:4 \
		--image-size 32 128 --filter-patch 2 4
	$(VENV)/bin/python tools/bench.py profile
	$(VENV)/bin/python tools/bench.py ort
	$(VENV)/bin/python tools/bench.py --rounds 8 records --image-size 32 128 \
		--csv bench/results/records.csv
	$(VENV)/bin/python tools/bench.py layers --csv bench/results/layers.csv \
		--profile bench/results/profile_layers.txt \
		--plot bench/results/layers.png

clean:
	rm -rf $(VENV) .aarch64 out *.egg-info
