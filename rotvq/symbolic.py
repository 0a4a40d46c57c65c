"""Symbolic (sympy) tools for checking the book's derivations.

Conventions
-----------
**Stop-gradient.** ``sg(x)`` is the stop-gradient operator of VQ-VAE (van den Oord et al.
2017, arXiv 1711.00937; written ``sg[x]`` in the book and in Su 2024, kexue.fm/archives/10489):
its *forward value* is ``x``, its *derivative* with respect to anything is zero. Here it is an
unevaluated sympy function, so ``diff`` treats it as a constant (also through the chain rule),
and :func:`forward` replaces every ``sg(x)`` by ``x`` to get the value of the forward pass.
Applied to an explicit ``Matrix`` it acts elementwise.

**Jacobian layouts.** For ``y = f(z)`` with ``y`` of length n and ``z`` of length m,

* numerator layout (default): ``J[i, j] = d y_i / d z_j``, shape (n, m), so ``dy = J dz``;
* denominator layout: the transpose, ``J[j, i] = d y_i / d z_j``, shape (m, n). For a scalar
  ``y`` this is the usual gradient column vector.

The backward pass of reverse-mode autodiff is the vector-Jacobian product
``dL/dz = J^T g`` with ``g = dL/dy`` (:func:`vjp`), whatever layout one writes ``dq/dz`` in.

**Symbolic dimension.** Identities in a general dimension d use ``MatrixSymbol('v', d, 1)``
vectors; :func:`simplify_with_unit_norms` expands products and replaces inner products such as
``v.T*v`` by known scalars (1 for unit vectors).

Example::

    >>> from sympy import symbols
    >>> z, q = symbols("z q", real=True)
    >>> zq = z + sg(q - z)  # straight-through estimator (Bengio et al. 2013)
    >>> forward(zq), zq.diff(z)
    (q, 1)
"""
from __future__ import annotations

from itertools import product

import sympy
from sympy import Expr, Function, Identity, MatrixBase, Matrix, S, Symbol, ZeroMatrix
from sympy.matrices.expressions import MatAdd, MatMul, MatPow, MatrixExpr, Transpose

__all__ = [
    "sg", "forward", "jacobian", "vjp", "vector", "unit_vector", "normalized",
    "unit_constraint", "plane_pair", "dot", "outer", "simplify_with_unit_norms", "is_zero",
    "equal", "assert_equal",
]


class sg(Function):
    """Stop-gradient: forward value ``x``, derivative zero.

    ``sg(x)`` stays unevaluated in expressions; ``sg(number)`` is the number and
    ``sg(sg(x)) == sg(x)``. ``sg(M)`` for an explicit sympy ``Matrix`` is applied elementwise.

    Args:
        arg: a scalar sympy expression or an explicit ``Matrix``.

    Returns:
        ``sg(arg)`` (a sympy expression) or a ``Matrix`` of the same shape.
    """

    nargs = 1

    def __new__(cls, arg, **options):
        if isinstance(arg, MatrixBase):
            return arg.applyfunc(lambda e: cls(e, **options))
        if isinstance(arg, MatrixExpr):
            raise TypeError("sg: symbolic-dimension matrix expressions are not supported; "
                            f"use an explicit sympy Matrix (got {type(arg).__name__})")
        return super().__new__(cls, arg, **options)

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return arg
        if isinstance(arg, sg):
            return arg

    def fdiff(self, argindex=1):
        return S.Zero

    def _eval_derivative(self, s):
        return S.Zero

    # the forward value is the argument, so sg(x) has x's realness and sign
    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return self.args[0].is_positive

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _latex(self, printer):
        return r"\operatorname{sg}\left[%s\right]" % printer._print(self.args[0])


def forward(expr):
    """Forward-pass value: replace every ``sg(x)`` by ``x`` (nested too; Matrix elementwise).

    Args:
        expr: sympy expression or explicit ``Matrix``. Returns: the same kind, free of ``sg``.
    """
    if isinstance(expr, MatrixBase):
        return expr.applyfunc(forward)
    return sympy.sympify(expr).replace(lambda e: isinstance(e, sg), lambda e: e.args[0])


def _as_vector(x, what, allow_scalar=True):
    """Entries of a vector given as column/row Matrix, list/tuple or (optionally) a scalar."""
    if isinstance(x, MatrixBase):
        if min(x.shape) > 1 or 0 in x.shape:
            raise ValueError(f"{what} must be a column or row vector, got a Matrix of shape "
                             f"{x.shape}")
        return list(x)
    if isinstance(x, MatrixExpr):
        raise TypeError(f"{what} must be an explicit Matrix, list or scalar, not a "
                        f"symbolic-dimension {type(x).__name__}")
    if isinstance(x, (list, tuple)):
        items = list(x)
    elif allow_scalar:
        items = [x]
    else:
        raise TypeError(f"{what} must be a Matrix vector or a list, got {type(x).__name__}")
    out = []
    for item in items:
        e = sympy.sympify(item)
        if not isinstance(e, Expr):
            raise TypeError(f"{what} entries must be scalar expressions, got "
                            f"{type(item).__name__}")
        out.append(e)
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def jacobian(expr, variables, layout="numerator"):
    """Jacobian of a vector expression, with ``sg`` honoured (its derivative is zero).

    Args:
        expr: n outputs: a column/row ``Matrix``, a list of scalar expressions, or one scalar.
        variables: m ``Symbol``s: a column/row ``Matrix``, a list, or one ``Symbol``.
        layout: ``"numerator"`` (``J[i, j] = d out_i / d var_j``, shape (n, m)) or
            ``"denominator"`` (the transpose, shape (m, n); the gradient for a scalar).

    Returns:
        sympy ``Matrix`` of shape (n, m) or (m, n).
    """
    outs = _as_vector(expr, "jacobian: expr")
    wrt = _as_vector(variables, "jacobian: variables")
    bad = [v for v in wrt if not isinstance(v, Symbol)]
    if bad:
        raise TypeError(f"jacobian: variables must be sympy Symbols, got {bad}")
    if len(set(wrt)) != len(wrt):
        raise ValueError(f"jacobian: repeated variables in {wrt}")
    J = Matrix(len(outs), len(wrt), lambda i, j: sympy.diff(outs[i], wrt[j]))
    if layout == "numerator":
        return J
    if layout == "denominator":
        return J.T
    raise ValueError(f"jacobian: layout must be 'numerator' or 'denominator', got {layout!r}")


def vjp(expr, variables, g):
    """Backward pass: vector-Jacobian product ``J^T g`` (``J`` in numerator layout).

    Args:
        expr: n outputs (as in :func:`jacobian`).
        variables: m Symbols.
        g: upstream gradient dL/d(expr), n entries (Matrix vector or list).

    Returns:
        (m, 1) ``Matrix`` dL/d(variables).
    """
    J = jacobian(expr, variables)
    gs = _as_vector(g, "vjp: g")
    if len(gs) != J.shape[0]:
        raise ValueError(f"vjp: g has {len(gs)} entries but expr has {J.shape[0]} outputs")
    return J.T * Matrix(gs)


def _check_dim(d):
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"dimension must be a Python int, got {type(d).__name__}")
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")


def vector(name, d):
    """(d, 1) ``Matrix`` of real symbols ``name_1 .. name_d`` (``d``: int >= 1)."""
    _check_dim(d)
    return Matrix([Symbol(f"{name}_{i}", real=True) for i in range(1, d + 1)])


def normalized(v):
    """``v / sqrt(v^T v)`` for an explicit non-zero real (d, 1) ``Matrix``; same shape."""
    v = Matrix(_as_vector(v, "normalized: v", allow_scalar=False))
    sq = sum(e**2 for e in v)
    if sympy.simplify(sq) == 0:
        raise ValueError("normalized: v is the zero vector")
    return v / sympy.sqrt(sq)


def unit_vector(name, d):
    """Unit vector ``normalized(vector(name, d))``: of unit norm for any non-zero symbols."""
    return normalized(vector(name, d))


def unit_constraint(v):
    """Scalar ``v^T v - 1`` for a (d, 1) ``Matrix`` v: zero exactly when v is a unit vector
    (use it with ``solve``/``subs`` to impose the constraint on free symbols)."""
    v = _as_vector(v, "unit_constraint: v", allow_scalar=False)
    return sum(e**2 for e in v) - 1


def plane_pair(theta, d=2):
    """Unit vectors ``z = e_1`` and ``q = cos(theta) e_1 + sin(theta) e_2`` in dimension d.

    Any two unit vectors at angle ``theta`` are mapped to this pair by an orthogonal change of
    basis (``e_1, e_2`` span their plane, ``e_3 .. e_d`` its orthogonal complement), so an
    orthogonally equivariant identity checked here holds for all such pairs.

    Args:
        theta: angle (sympy expression or Symbol).
        d: dimension (int >= 2).

    Returns:
        ``(z, q)``, two (d, 1) ``Matrix``.
    """
    _check_dim(d)
    if d < 2:
        raise ValueError(f"plane_pair: need d >= 2, got {d}")
    z = Matrix([1] + [0] * (d - 1))
    q = Matrix([sympy.cos(theta), sympy.sin(theta)] + [0] * (d - 2))
    return z, q


def _check_vec(x, what):
    if not isinstance(x, (MatrixBase, MatrixExpr)) or x.shape[1] != 1:
        raise TypeError(f"{what} must be a column vector (Matrix or MatrixSymbol of shape "
                        f"(d, 1)), got {getattr(x, 'shape', type(x).__name__)}")


def _same_dim(a, b, what):
    _check_vec(a, what)
    _check_vec(b, what)
    if sympy.simplify(a.shape[0] - b.shape[0]) != 0:
        raise ValueError(f"{what}: dimensions differ ({a.shape[0]} vs {b.shape[0]})")


def dot(a, b):
    """Inner product ``a^T b``: a scalar for explicit vectors, a (1, 1) ``MatMul`` otherwise."""
    _same_dim(a, b, "dot")
    if isinstance(a, MatrixBase) and isinstance(b, MatrixBase):
        return (a.T * b)[0, 0]
    return a.T * b


def outer(a, b):
    """Outer product ``a b^T`` of two column vectors (explicit or ``MatrixSymbol``)."""
    _same_dim(a, b, "outer")
    return a * b.T


def _terms(e):
    """Expand a matrix expression into ``[(scalar coefficient, (matrix factors...)), ...]``."""
    if isinstance(e, MatAdd):
        return [t for a in e.args for t in _terms(a)]
    if isinstance(e, MatPow) and e.exp.is_Integer and e.exp > 0:
        return _terms(MatMul(*[e.base] * int(e.exp), evaluate=False))
    if isinstance(e, Transpose) and not e.arg.is_symbol:
        return [(c, tuple(f.T for f in reversed(fs))) for c, fs in _terms(e.arg)]
    if isinstance(e, MatMul):
        coeff = sympy.Mul(*[a for a in e.args if not a.is_Matrix])
        parts = [_terms(a) for a in e.args if a.is_Matrix]
        return [(coeff * sympy.Mul(*[c for c, _ in combo]), sum((fs for _, fs in combo), ()))
                for combo in product(*parts)]
    if isinstance(e, ZeroMatrix):
        return []
    return [(S.One, (e,))]


def simplify_with_unit_norms(expr, unit_vectors=(), inner_products=None):
    """Expand a symbolic-dimension matrix expression and reduce known inner products.

    Products are fully expanded; every adjacent pair ``a.T*b`` with a known value is replaced
    by that scalar (``v.T*v -> 1`` for each unit vector ``v``; ``inner_products`` gives more,
    symmetric in ``a, b``); identity factors are dropped and like terms collected. Products
    left over are compared as written (``w.T*z`` and ``z.T*w`` are not identified), so give
    every inner product that matters a scalar symbol in ``inner_products``.

    Args:
        expr: sympy ``MatrixExpr`` built from ``MatrixSymbol``s (``Identity``, ``+``, ``*``,
            ``.T``, positive integer powers; other nodes are kept as opaque factors).
        unit_vectors: ``MatrixSymbol``s of shape (d, 1) with ``v.T*v = 1``.
        inner_products: optional dict ``{(a, b): value}`` meaning ``a.T*b = b.T*a = value``.

    Returns:
        an equivalent ``MatrixExpr`` (``ZeroMatrix`` when everything cancels); a (1, 1)
        expression whose products all reduce is returned as a scalar.
    """
    if not isinstance(expr, MatrixExpr):
        raise TypeError(f"simplify_with_unit_norms: expr must be a MatrixExpr, got "
                        f"{type(expr).__name__}")
    known = {}
    for v in unit_vectors:
        _check_vec(v, "simplify_with_unit_norms: unit vector")
        known[(v, v)] = S.One
    for (a, b), val in (inner_products or {}).items():
        _same_dim(a, b, "simplify_with_unit_norms: inner product")
        known[(a, b)] = known[(b, a)] = sympy.sympify(val)
    collected = {}
    for coeff, fs in _terms(expr):
        ids = tuple(f for f in fs if isinstance(f, Identity))[:1]
        fs, i = [f for f in fs if not isinstance(f, Identity)], 0
        if not fs:  # a pure identity term
            fs = list(ids)
        while i < len(fs) - 1:  # reduce a.T*b pairs left to right; re-check after each
            a, b = fs[i], fs[i + 1]
            key = (a.arg, b) if isinstance(a, Transpose) else None
            if key in known:
                coeff, fs = coeff * known[key], fs[:i] + fs[i + 2:]
                i = max(i - 1, 0)
            else:
                i += 1
        fs = tuple(fs)
        collected[fs] = collected.get(fs, S.Zero) + coeff
    terms = [(sympy.simplify(c), fs) for fs, c in collected.items()]
    terms = [(c, fs) for c, fs in terms if c != 0]
    if not terms:
        return ZeroMatrix(*expr.shape)
    if all(not fs for _, fs in terms):
        return sympy.Add(*[c for c, _ in terms])
    return MatAdd(*[MatMul(c, *fs) if fs else c * Identity(1) for c, fs in terms]).doit()


def is_zero(expr):
    """Whether ``expr`` simplifies to zero (scalar, explicit ``Matrix`` or ``MatrixExpr``).

    ``sg`` is kept as an opaque function: compare :func:`forward` values for the forward pass.
    ``False`` means sympy could not show it is zero, not a proof that it is non-zero.
    """
    if isinstance(expr, MatrixBase):
        return all(is_zero(e) for e in expr)
    if isinstance(expr, MatrixExpr):
        return isinstance(simplify_with_unit_norms(expr), ZeroMatrix)
    return sympy.simplify(sympy.sympify(expr)) == 0


def equal(a, b):
    """Whether ``a - b`` simplifies to zero; shapes must match (ValueError otherwise)."""
    sa, sb = getattr(a, "shape", ()), getattr(b, "shape", ())
    if sa != sb:
        raise ValueError(f"equal: shapes differ ({sa} vs {sb})")
    return is_zero(a - b)


def assert_equal(a, b):
    """Raise ``AssertionError`` showing the simplified difference unless ``a == b``."""
    if not equal(a, b):
        diff = a - b
        shown = diff.applyfunc(sympy.simplify) if isinstance(diff, MatrixBase) else (
            simplify_with_unit_norms(diff) if isinstance(diff, MatrixExpr)
            else sympy.simplify(diff))
        raise AssertionError(f"not equal; simplified difference: {shown}")
