"""The benchmark scripts, a package: run each from the repository root as a module,
`python -m benchmarks.serving --quick` (see docs/benchmarks.md). Shared pieces are in
`benchmarks._common`."""
