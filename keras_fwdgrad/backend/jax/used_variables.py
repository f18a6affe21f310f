"""Which variables a JAX function's output depends on, from its jaxpr.

`used_variables(fn, values)` reads the jaxpr of `fn`'s JVP and follows data
dependences from the tangent inputs to the tangent output. The JAX trainer
uses it to give a trainable variable the loss does not depend on (an unused
head, a layer behind `stop_gradient`) an exactly zero forward gradient, as
reverse mode does, rather than `d·v`.
"""

import jax
from jax.extend.core import Literal


# Primitives whose inner jaxpr takes the equation's inputs and gives its
# outputs one to one (checked on JAX 0.10): their dependences are followed
# inside. Any other equation with an inner jaxpr (`scan`, `while`, `cond`)
# is taken whole.
_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


def _inner_jaxpr(equation):
    if equation.primitive.name not in _CALL_PRIMITIVES:
        return None
    inner = equation.params.get("jaxpr", equation.params.get("call_jaxpr"))
    inner = getattr(inner, "jaxpr", inner)
    if inner is None or len(inner.invars) != len(equation.invars):
        return None
    if len(inner.outvars) != len(equation.outvars):
        return None
    return inner


def _dependences(jaxpr, inputs):
    """For each output of `jaxpr`, the set of input labels it depends on,
    given the label sets `inputs` of its inputs."""
    depends = {var: labels for var, labels in zip(jaxpr.invars, inputs) if labels}

    def sources(variables):
        found = set()
        for var in variables:
            if not isinstance(var, Literal):
                found |= depends.get(var, set())
        return found

    for equation in jaxpr.eqns:
        inner = _inner_jaxpr(equation)
        if inner is not None:
            outputs = _dependences(inner, [sources([var]) for var in equation.invars])
        else:
            outputs = [sources(equation.invars)] * len(equation.outvars)
        for var, labels in zip(equation.outvars, outputs):
            if labels:
                depends[var] = labels
    return [sources([var]) for var in jaxpr.outvars]


def used_variables(fn, values, *args):
    """Which of `values` the output of `fn(values, *args)` depends on.

    Reads the jaxpr of `fn`'s JVP along `values` and follows data
    dependences from the tangent inputs to the tangent output, so a value
    whose tangent is cut (by `jax.lax.stop_gradient`, or by an op JAX
    differentiates as zero, such as `jnp.round`) counts as unused. The
    inner jaxprs of `jit` calls are followed; those of loops and branches
    (`scan`, `while`, `cond`) are taken whole: each of their outputs
    depends on all their inputs, which can only count a value as used.

    Args:
        fn: A function of `values` (a list of arrays) and `args`.
        values: The list of arrays to differentiate by.
        *args: The other arguments of `fn`; arrays or tracers.

    Returns:
        A list of booleans, one per entry of `values`.
    """

    def tangent_output(tangents, values, *args):
        return jax.jvp(lambda v: fn(v, *args), (values,), (tangents,))[1]

    jaxpr = jax.make_jaxpr(tangent_output)(values, values, *args).jaxpr
    inputs = [{i} if i < len(values) else set() for i in range(len(jaxpr.invars))]
    found = set().union(*_dependences(jaxpr, inputs))
    return [i in found for i in range(len(values))]


def signature(tree):
    """The structure, shapes and dtypes of a tree of arrays: a cache key
    for what `used_variables` finds."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((tuple(t.shape), str(t.dtype)) for t in leaves)
