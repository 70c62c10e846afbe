# Convenience aliases: every target runs the same-named command of ./run, which
# needs only bash (the README's two commands are `./run bench` and `./run test`).
.PHONY: bench test test-c test-asan test-tsan test-py soak fuzz clean
bench test test-c test-asan test-tsan test-py soak fuzz clean:
	./run $@ $(ARGS)
