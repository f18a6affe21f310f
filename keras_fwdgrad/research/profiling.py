"""Step costs of forward gradient and backpropagation, measured fairly.

`profile_step_costs` measures, in one process, the first paper's runtime
measures for one model and one minibatch:

- the base runtime: forward pass and loss, no derivatives, no update;
- the time of a forward-gradient training step (one per direction family)
  and of a backpropagation training step, updates included;
- `Rf`, `Rb` (step time over base time) and `Rf/Rb`;
- peak memory of each step.

The methods are timed round-robin (base, forward..., backprop, base, ...)
so that drifts of the machine hit all of them alike; each figure is the
median over rounds, after one untimed round. The first calls, which trace
and XLA-compile, are timed apart and reported as `compile_s`. Every call goes through the same Keras
entry point (`train_on_batch` / `test_on_batch`, the function `fit` and
`evaluate` run), so the Python overhead is the same for every method.
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_fwdgrad.model import ForwardGradientModel


def memory_device():
    """The device whose allocator `profile_step_costs` reads: `"GPU:0"`
    when a GPU is visible, else `"CPU:0"`."""
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _memory_info(device):
    try:
        return tf.config.experimental.get_memory_info(device)
    except (ValueError, RuntimeError):  # Allocator without statistics.
        return None


def _state_bytes(model):
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    seen, total = set(), 0
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        total += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
    return total


# Sizes of a tensor held while the step's peak is measured again: 256 KiB
# to 64 MiB in powers of 4.
_BALLAST_BYTES = tuple(1 << k for k in range(18, 27, 2))


def step_bytes(call, device):
    """Memory one call of `call` allocates at its peak, beyond what was
    allocated before it; `None` without allocator statistics.

    TensorFlow's BFC allocator hands out a free chunk of less than twice
    the requested size whole and counts all of it as in use, so a step
    that lands in such a hole is charged up to twice what it requested;
    which holes exist depends on everything the process allocated before.
    The step is therefore measured under several allocator states and the
    smallest measurement is kept: holding nothing, holding one tensor of
    each size in `_BALLAST_BYTES`, then holding one to four tensors, each
    7/8 of the smallest measurement when it was added, which fill the
    holes a step of that size lands in (an XLA-compiled step allocates
    its temporaries as one buffer: the chunk it gets is at most the
    measurement and less than twice the request, so such a tensor fits
    in it and takes it whole). A
    chunk is never smaller than its request, so no measurement understates
    the peak the step requests; for the XLA-compiled models of
    `benchmarks/step_costs.py` the result equals the temporary buffer of
    XLA's buffer assignment.
    """
    if _memory_info(device) is None:
        return None

    def measure(*held_bytes):
        with tf.device(device):
            held = [tf.zeros([max(1, b // 4)], tf.float32) for b in held_bytes]
        before = _memory_info(device)
        tf.config.experimental.reset_memory_stats(device)
        call()
        after = _memory_info(device)
        del held
        return max(0, int(after["peak"]) - int(before["current"]))

    best = min([measure()] + [measure(b) for b in _BALLAST_BYTES])
    holes = []
    for _ in range(4):
        # The chunk the step landed in is at most `best` (which also counts
        # the step's outputs) and less than twice its request: a tensor of
        # 7/8 of `best` fits in it and takes it whole.
        holes.append(best - best // 8)
        best = min(best, measure(*holes))
    return best


def profile_step_costs(
    build_model,
    x,
    y,
    loss,
    directions=("gaussian",),
    backprop=True,
    optimizer=None,
    jit_compile=True,
    steps=10,
    repeats=5,
    warmup=2,
    seed=0,
    **forward_kwargs,
):
    """Measures base, forward-gradient and backpropagation step costs.

    Args:
        build_model: Callable returning a fresh, built Keras model. It is
            called once per method, after `keras.utils.set_random_seed`
            with `seed`, so all methods start from the same weights.
        x: One minibatch of inputs (NumPy array or tensor).
        y: The matching targets.
        loss: Loss passed to `compile()`.
        directions: Direction families to time the forward gradient with:
            names (the method is then `"forward-<name>"`) or dicts of
            `ForwardGradientModel` arguments with a `"direction"` and an
            optional `"label"` (for example `{"direction": "gaussian",
            "layer_rules": False, "label": "gaussian-accumulator"}`).
            Defaults to `("gaussian",)`.
        backprop: Whether to time backpropagation. Defaults to `True`.
        optimizer: Callable returning a fresh optimizer for each method.
            Defaults to SGD with learning rate 1e-6: the update costs the
            same at any learning rate, and a small one keeps repeated steps
            on one batch finite.
        jit_compile: Whether to XLA-compile the steps. Defaults to `True`.
        steps: Steps per method and round. Defaults to `10`.
        repeats: Number of timed interleaved rounds, after one untimed
            round. Defaults to `5`.
        warmup: Untimed calls per method before the rounds (tracing and
            compilation). Defaults to `2`.
        seed: Seed of the initial weights and of the directions.
        **forward_kwargs: Passed to `ForwardGradientModel` (for example
            `num_directions`, `jvp_clip`).

    Returns:
        A dict with `"methods"`, mapping `"base"`, `"forward-<direction>"`
        and `"backprop"` to their measures (`ms`: median milliseconds per
        step; `ms_rounds`: the per-round values; `compile_s`: time of the
        warm-up calls; `state_bytes`: variables and optimizer slots;
        `step_bytes`: extra memory the step allocates at its peak (the
        smallest over a few allocator states, so that fragmentation left
        by earlier allocations does not count);
        `peak_bytes`: their sum; `R`: `ms` over the base time), `"ratios"`
        mapping each forward method to `Rf`, `Rb` and `Rf/Rb`, and the
        settings used.

    Example:

    ```python
    costs = keras_fwdgrad.research.profiling.profile_step_costs(
        keras_fwdgrad.research.architectures.mlp, x[:64], y[:64],
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(costs["ratios"]["forward-gaussian"]["Rf/Rb"])
    ```
    """
    for name, value in (("steps", steps), ("repeats", repeats), ("warmup", warmup)):
        if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if isinstance(build_model, keras.Model) or not callable(build_model):
        raise TypeError(
            "`build_model` must be a function that returns a fresh Keras "
            "model (a new one per call), not a model. "
            f"Received: build_model={build_model!r}"
        )
    if optimizer is None:
        optimizer = lambda: keras.optimizers.SGD(1e-6)  # noqa: E731
    x = tf.convert_to_tensor(x)
    y = tf.convert_to_tensor(y)

    calls = {}
    models = {}

    def fresh_model():
        keras.utils.set_random_seed(seed)
        return build_model()

    base = fresh_model()
    base.compile(loss=loss, jit_compile=jit_compile)
    calls["base"] = lambda: base.test_on_batch(x, y)
    models["base"] = base
    for direction in directions:
        kwargs = dict(forward_kwargs)
        if isinstance(direction, dict):
            kwargs.update(direction)
            label = kwargs.pop("label", None) or str(kwargs["direction"])
        elif isinstance(direction, str):
            kwargs["direction"] = label = direction
        else:
            raise TypeError(
                "Each entry of `directions` must be a direction name or a "
                f"dict of `ForwardGradientModel` arguments. Received: {direction!r}"
            )
        model = ForwardGradientModel(fresh_model(), seed=seed, **kwargs)
        model.compile(optimizer=optimizer(), loss=loss, jit_compile=jit_compile)
        calls[f"forward-{label}"] = (lambda m: lambda: m.train_on_batch(x, y))(model)
        models[f"forward-{label}"] = model
    if backprop:
        model = fresh_model()
        model.compile(optimizer=optimizer(), loss=loss, jit_compile=jit_compile)
        calls["backprop"] = lambda: model.train_on_batch(x, y)
        models["backprop"] = model

    results = {}
    device = memory_device()
    for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        compile_s = time.perf_counter() - start
        extra = step_bytes(call, device)
        state = _state_bytes(models[name])
        results[name] = {
            "compile_s": compile_s,
            "state_bytes": state,
            "step_bytes": extra,
            "peak_bytes": None if extra is None else state + extra,
            "ms_rounds": [],
        }
    # One untimed interleaved round first: the first round after the
    # warm-up calls still pays for thread pools, allocator growth and
    # caches, and would pull a median of few rounds.
    for timed in [False] + [True] * repeats:
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(steps):
                call()
            if timed:
                results[name]["ms_rounds"].append(1000.0 * (time.perf_counter() - start) / steps)
    for r in results.values():
        r["ms"] = float(np.median(r["ms_rounds"]))
        r["R"] = r["ms"] / results["base"]["ms"]
    for name, model in models.items():
        if name.startswith("forward-") and int(model.skipped_steps.numpy()):
            results[name]["skipped_steps"] = int(model.skipped_steps.numpy())
    ratios = {}
    if backprop:
        for name in results:
            if name.startswith("forward-"):
                ratios[name] = {
                    "Rf": results[name]["R"],
                    "Rb": results["backprop"]["R"],
                    "Rf/Rb": results[name]["ms"] / results["backprop"]["ms"],
                }
    return {
        "methods": results,
        "ratios": ratios,
        "batch_size": int(x.shape[0]),
        "parameters": int(sum(int(np.prod(v.shape)) for v in base.trainable_variables)),
        "jit_compile": bool(jit_compile),
        "steps": steps,
        "repeats": repeats,
        "memory_device": device,
    }
