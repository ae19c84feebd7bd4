"""Loopback servers for the demo command, the tests and the benchmarks: ``testserver`` (our own image farm),
``nginxfarm`` (real nginx hosts) and ``scenario`` (the demo's URLs and the outcome each should have)."""
