"""Master weights for any rule, as a spec derived from it: low-precision parameters, float32 state.

Why a derived spec (as the VJP is one): the mode is then one more graph, lowered, verified and
rendered by the same pipeline, and nothing below the spec knows it exists. :func:`master_spec`
works for any rule that names its parameter and gradient (``torch_adam``, ``lion``, a user's
rule): it takes the rule's float32 graph and

* adds the tensor ``master_<parameter>``, the float32 master copy of the parameter, which an
  optimizer starts as the parameter's value (``StatePair.init="parameter"``) and keeps in place;
* computes every output of the rule from the master instead of the parameter, with the gradient
  stored in the parameter's low dtype and widened exactly (``Tensor.storage``);
* makes the parameter itself an output only: the new master rounded to the low dtype, to
  nearest even, or stochastically (``round_to(..., stochastic=True)``, stream 0).

So the new master and every state output are bit for bit the rule's float32 outputs for the
widened gradient (the same expressions over the same values), and the parameter is that master
rounded once; the parameter's old value is never read. Every other state of the rule keeps the
compute dtype (float32).

Which derivation a kernel computes is part of its key: :data:`DERIVATIVES` names them as
``SpecRef.derivative`` (``"master:bfloat16"``, ``"stochastic:bfloat16"``, ...).
"""

from __future__ import annotations

import sympy

from .errors import SpecError
from .interface import MASTER_DTYPES, MASTER_FORMS, StatePair, Tensor, master_form
from .language import round_to
from .spec import UpdateSpec

#: Low-precision parameter dtypes master weights are derived for (the master is float32).
PARAMETER_DTYPES = MASTER_DTYPES
#: ``SpecRef.derivative`` -> (parameter dtype, stochastic rounding); plain data in
#: :mod:`adamgen.interface`, so the runtime names a form without importing SymPy.
DERIVATIVES = MASTER_FORMS
derivative_name = master_form


def master_spec(spec: UpdateSpec, dtype: str, *, stochastic: bool = False) -> UpdateSpec:
    """``spec`` with float32 master weights for a parameter (and gradient) stored as ``dtype``
    (see the module docstring).

    Raises:
        SpecError: the rule names no parameter or gradient, stores a tensor narrow already, or
            a name ``master_<parameter>`` is taken.
    """
    interface = spec.interface
    parameter, gradient = interface.parameter, interface.gradient
    if parameter is None or gradient is None:
        raise SpecError(f"{spec.name}: master weights need a rule that names its parameter "
                        "and gradient")
    if interface.narrow:
        raise SpecError(f"{spec.name}: the rule stores tensors narrow already; master "
                        "weights derive from its full-precision form")
    master = f"master_{parameter}"
    pairs = {p.input: p for p in interface.state}
    param_output = pairs[parameter].output
    master_output = master if param_output == parameter else f"master_{param_output}"
    taken = set(interface.tensor_names) | set(interface.hyperparameter_names) | \
        set(interface.outputs) | {name for name, _ in spec.names}
    for name in {master, master_output}:
        if name in taken:
            raise SpecError(f"{spec.name}: master weights need the name {name!r}, which the "
                            "rule uses")
    symbol = {s.name: s for s in spec.inputs}[parameter]
    master_symbol = sympy.Symbol(master, real=True)

    def from_master(expr: sympy.Basic) -> sympy.Basic:
        with sympy.evaluate(False):  # keep the rule's binary nesting: its rounding order
            return expr.xreplace({symbol: master_symbol})

    tensors: list[Tensor] = []
    for tensor in interface.tensors:
        if tensor.name in (parameter, gradient):
            tensors.append(Tensor(tensor.name, tensor.scalar, tensor.range, tensor.doc, dtype))
        else:
            tensors.append(tensor)
        if tensor.name == gradient:
            tensors.append(Tensor(master, doc=f"float32 master copy of {parameter}"))
    new_master = from_master(spec.output(param_output))
    outputs: list[tuple[str, sympy.Basic]] = []
    for name, expr in spec.outputs:
        if name == param_output:
            outputs.append((name, round_to(new_master, dtype, stochastic=stochastic)))
            outputs.append((master_output, new_master))
        else:
            outputs.append((name, from_master(expr)))
    state: list[StatePair] = []
    for pair in interface.state:
        state.append(pair)
        if pair.input == parameter:
            state.append(StatePair(master_output, master, master, init="parameter"))
    how = "rounded stochastically" if stochastic else "rounded to nearest even"
    return UpdateSpec(
        spec.name, tensors=tensors, hyperparameters=interface.hyperparameters,
        outputs=outputs, state=state, parameter=parameter, gradient=gradient,
        names=[(name, from_master(expr)) for name, expr in spec.names],
        options=(*interface.options, ("master_weights", dtype),
                 ("stochastic_rounding", stochastic)),
        summary=f"{interface.summary}; float32 master weights, {dtype} parameter {how}")


def derived(spec: UpdateSpec, derivative: str) -> UpdateSpec:
    """The master-weight form ``derivative`` (a key of :data:`DERIVATIVES`) of ``spec``."""
    dtype, stochastic = DERIVATIVES[derivative]
    return master_spec(spec, dtype, stochastic=stochastic)
