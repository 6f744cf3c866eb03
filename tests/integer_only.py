"""The check that a jitted computation is integers only: no float dtype in its jaxpr (sub-jaxprs
included: cond, scan, while) nor in the HLO XLA is given."""
import re

import jax

FLOAT_TYPES = re.compile(r"\b(f16|bf16|f32|f64|f8\w*|float\d*|bfloat16)\b")


def _sub_jaxprs(value):
    """The jaxprs inside one equation parameter (a Jaxpr, a ClosedJaxpr, or a tuple of them as in cond)."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)
    elif hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr


def _all_vars(jx):
    for eqn in jx.eqns:
        yield from eqn.invars
        yield from eqn.outvars
        for p in eqn.params.values():
            for sub in _sub_jaxprs(p):
                yield from _all_vars(sub)


def assert_integer_only(fn, *args) -> None:
    jaxpr = jax.make_jaxpr(fn)(*args)
    dtypes = {str(v.aval.dtype) for v in _all_vars(jaxpr.jaxpr) if hasattr(v, "aval")}
    assert dtypes and not any("float" in d for d in dtypes), dtypes
    hlo = jax.jit(fn).lower(*args).as_text()
    assert not FLOAT_TYPES.search(hlo), FLOAT_TYPES.search(hlo)
