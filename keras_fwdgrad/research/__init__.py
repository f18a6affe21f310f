"""The papers' reproduction harness: architectures, data, experiments,
measures, step-cost profiling, test functions, the second paper's Table I
(`table1`) and its search reports (`searches`), and plots.

The library itself (`keras_fwdgrad.ForwardGradientModel`) needs none of
this; the scripts in `examples/` and `benchmarks/` use it.
"""
