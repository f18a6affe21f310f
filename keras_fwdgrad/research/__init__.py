"""The papers' reproduction harness: architectures, data, experiments,
measures, step-cost profiling, test functions, optimizers with the papers'
learning-rate decay, and plots.

The library itself (`keras_fwdgrad.ForwardGradientModel`) needs none of
this; the scripts in `examples/` and `benchmarks/` use it.
"""
