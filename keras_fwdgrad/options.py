"""The forward options of `ForwardGradientModel`, written once.

The one list is `ForwardGradientModel.__init__`'s signature: every argument
but `model`, `seed` and `**kwargs` is a forward option, and its default is
the signature's. `keras_fwdgrad.tuning` (what a search may fix or search),
`keras_fwdgrad.research.experiments` (a training method's settings) and the
docs' option tables read this module, so an option added to the model is
searchable and recordable without another edit.

Example:

```python
keras_fwdgrad.options.defaults()
# {'direction': 'gaussian', 'num_directions': 1, 'jvp_clip': None, ...}
```
"""

import inspect

# Arguments of `ForwardGradientModel.__init__` that are not forward options:
# the wrapped model, the seed (a run's, set by whoever runs it) and the
# `keras.Model` keyword arguments.
_NOT_OPTIONS = ("self", "model", "seed", "kwargs")


def defaults():
    """Every forward option and its default, in the signature's order.

    Returns:
        A dict from option name to default value.
    """
    from keras_fwdgrad.model import ForwardGradientModel

    parameters = inspect.signature(ForwardGradientModel.__init__).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if name not in _NOT_OPTIONS and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def names():
    """The names of the forward options, in the signature's order."""
    return tuple(defaults())


def split(settings):
    """Splits `settings` into forward options and the rest.

    Args:
        settings: A dict of keyword arguments.

    Returns:
        A pair of dicts `(forward_options, rest)`.
    """
    known = set(names())
    forward = {k: v for k, v in settings.items() if k in known}
    rest = {k: v for k, v in settings.items() if k not in known}
    return forward, rest


def check_names(given, where, also=()):
    """Raises a `TypeError` naming any key of `given` that is neither a
    forward option nor in `also`.

    Args:
        given: A dict (or iterable) of keyword argument names.
        where: The function or class the names were passed to, for the
            message.
        also: Other names `where` accepts.
    """
    allowed = names() + tuple(also)
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise TypeError(
            f"{where} got unknown keyword argument(s) {unknown}. The forward "
            f"options are {list(names())}"
            + (f", and it also takes {list(also)}." if also else ".")
        )
