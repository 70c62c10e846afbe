# The two commands of the README: `make bench` (the main job) and `make test`
# (the whole suite). Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyshmfeed-installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: bench test test-c test-asan test-tsan test-py venv clean fuzz soak

venv: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.c csrc/*.h) pyshmfeed/_ffi_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "scikit-build-core>=0.10" "cffi>=1.17" cmake ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

bench: $(STAMP)
	$(VENV)/bin/pyshmfeed bench $(ARGS)

test: test-c test-asan test-tsan test-py

test-py: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# C unit tests and the stress test, plain and under sanitizers (CTest).
CMAKE := $(VENV)/bin/cmake
C_CONFIG = -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) -DSHMFEED_BUILD_PYTHON=OFF -DSHMFEED_BUILD_TESTS=ON

test-c: $(STAMP)
	$(CMAKE) -S . -B build/c $(C_CONFIG) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	$(CMAKE) --build build/c
	$(VENV)/bin/ctest --test-dir build/c --output-on-failure

test-asan: $(STAMP)
	$(CMAKE) -S . -B build/asan $(C_CONFIG) -DSHMFEED_SANITIZE=address,undefined >/dev/null
	$(CMAKE) --build build/asan
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
	  $(VENV)/bin/ctest --test-dir build/asan --output-on-failure

test-tsan: $(STAMP)
	$(CMAKE) -S . -B build/tsan $(C_CONFIG) -DSHMFEED_SANITIZE=thread >/dev/null
	$(CMAKE) --build build/tsan
	TSAN_OPTIONS=halt_on_error=1 setarch $$(uname -m) -R $(VENV)/bin/ctest --test-dir build/tsan --output-on-failure

clean:
	rm -rf build $(VENV)

# libFuzzer over the segment validator and every call that reads shared memory,
# under ASan+UBSan (fuzz/fuzz_attach.c). FUZZ_SECONDS=600 make fuzz for a longer run;
# findings land in build/fuzz/ as crash-*/timeout-* files. Needs clang with libFuzzer.
CLANG ?= clang
FUZZ_SECONDS ?= 60
fuzz:
	@command -v $(CLANG) >/dev/null || { echo "make fuzz needs clang with libFuzzer: apt-get install clang libclang-rt-14-dev"; exit 1; }
	mkdir -p build/fuzz/corpus
	$(CLANG) -g -O1 -std=c11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc \
	  fuzz/fuzz_attach.c csrc/segment.c csrc/protocol.c csrc/wait.c -o build/fuzz/fuzz_attach
	cd build/fuzz && UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
	  ./fuzz_attach -max_total_time=$(FUZZ_SECONDS) -max_len=20000 -timeout=10 -print_final_stats=1 \
	  corpus ../../fuzz/seeds

# The long random-kill soak of tests/test_faults_feed.py (CI runs a 30 s version):
# SOAK_SECONDS of producers SIGKILLed at random, split between ordered and unordered feeds.
SOAK_SECONDS ?= 900
soak: $(STAMP)
	PYSHMFEED_SOAK=1 PYSHMFEED_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s tests/test_faults_feed.py -k soak
