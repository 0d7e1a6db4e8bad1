"""Benchmarks: each module has a `main()` that prints figures; none asserts a timing."""
