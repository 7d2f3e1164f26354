"""Models and inputs built in code, with no weights to download. The tests, the benchmarks and the CLI
demo all build from here: :mod:`.tiny` (the tiny and mid-size random models), :mod:`.demo` (the demo
engine and its inputs), :mod:`.random_models` (any architecture, the real one included, with random
weights made on the device; weight-sharing clones), :mod:`.step_inputs` (one transformer step's random
inputs) and :mod:`.pictures` (the benchmarks' picture and mask)."""
