"""DETRIS benchmarks: `detris bench` (bench_model), the data-loading benchmark (bench_data) and the measuring tools
(harness)."""
