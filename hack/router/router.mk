# The router's fuzzing: the property tests of its HTTP/1.1 upstream codec
# (crates/keelson-router/src/h1_fuzz.rs) with many more cases than `make test` runs.
# Included from the Makefile: `include hack/router/router.mk`.

.PHONY: fuzz

## fuzz: property-based fuzzing of the router's HTTP/1.1 request encoder and response decoder
## (arbitrary bytes and splits); PROPTEST_CASES cases per property (default 100000)
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} $(or $(CARGO),cargo) test -p keelson-router --lib h1::fuzz -- --test-threads=$${TEST_THREADS:-2}
