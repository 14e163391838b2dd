"""The benchmarks (not installed with the package): run from a source checkout as
``python -m bench.<name>``; tables and how to read them are in bench/README.md."""
