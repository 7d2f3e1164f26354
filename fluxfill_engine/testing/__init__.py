"""Models and inputs built in code, with no weights to download: the tiny and mid-size random models,
the demo engine and its inputs. The tests, the benchmarks and the CLI demo all build from here."""
