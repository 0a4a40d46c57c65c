"""Tests for rotvq.symbolic: stop-gradient semantics, Jacobian layouts, symbolic dimension."""
import pytest
import sympy
from sympy import Function, Identity, Matrix, MatrixSymbol, Symbol, cos, eye, sin, sqrt, symbols

from rotvq.symbolic import (
    assert_equal, dot, equal, forward, is_zero, jacobian, normalized, outer, plane_pair, sg,
    simplify_with_unit_norms, unit_constraint, unit_vector, vector, vjp,
)

z, q, x = symbols("z q x", real=True)
d = Symbol("d", integer=True, positive=True)


def general_matrix(name, n):
    return Matrix(n, n, lambda i, j: Symbol(f"{name}_{i + 1}{j + 1}", real=True))


# --- stop-gradient -----------------------------------------------------------------------

def test_sg_derivative_is_zero():
    f = Function("f")
    assert sympy.diff(sg(f(z)), z) == 0
    assert sympy.Derivative(sg(z**2), z).doit() == 0
    assert sympy.diff(sg(z) * z, z, 2) == 0
    # without sg the same expressions have non-zero derivatives
    assert sympy.diff(f(z), z) != 0
    assert sympy.diff(z**2, z) == 2 * z


def test_sg_forward_value():
    assert forward(z + sg(q - z)) == q
    assert forward(sg(sg(z) * sg(q + sg(x)))) == z * (q + x)
    assert sympy.expand(forward(z + sg(q - z)) - (z + (q - z))) == 0
    # the expression itself is not q: sg keeps it unevaluated
    assert z + sg(q - z) != q


def test_sg_evaluation_rules_and_assumptions():
    assert sg(3) == 3
    assert sg(sg(z)) == sg(z)
    assert sg(z).is_real is True
    assert sg(Symbol("p", positive=True)).is_positive is True
    assert sympy.latex(sg(z)) == r"\operatorname{sg}\left[z\right]"


def test_chain_rule_through_sg():
    z1, z2 = symbols("z1 z2", real=True)
    e = sin(z1 * sg(z2))
    assert e.diff(z2) == 0
    assert sympy.simplify(e.diff(z1) - cos(z1 * sg(z2)) * sg(z2)) == 0
    # sg inside a product: only the un-stopped factor is differentiated
    assert sympy.simplify(sympy.diff(z1 * z2 * sg(z1 * z2), z1) - z2 * sg(z1 * z2)) == 0


def test_sg_elementwise_on_matrix():
    G = general_matrix("G", 2)
    v = vector("z", 2)
    M = sg(G * v)
    assert M.shape == (2, 1)
    assert all(isinstance(e, sg) for e in M)
    assert jacobian(M, v) == sympy.zeros(2, 2)
    assert forward(M) == G * v


# --- Jacobians and layouts ---------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_ste_jacobian_is_identity(n):
    zv, qv = vector("z", n), vector("q", n)
    zq = zv + sg(qv - zv)
    assert forward(zq) == qv
    assert jacobian(zq, zv) == eye(n)
    assert jacobian(zq, zv, layout="denominator") == eye(n)
    assert jacobian(zq, qv) == sympy.zeros(n, n)  # q gets no gradient


def test_generalized_ste_jacobian_is_G():
    n = 3
    G = general_matrix("G", n)
    zv, qv = vector("z", n), vector("q", n)
    g = vector("g", n)
    zq = sg(G) * zv + sg(qv - G * zv)
    assert equal(forward(zq), qv)
    J = jacobian(zq, zv)
    assert J == sg(G)
    assert forward(J) == G
    assert G != G.T  # so the layout checks below distinguish G from its transpose
    assert jacobian(zq, zv, layout="denominator") == J.T
    assert forward(jacobian(zq, zv, layout="denominator")) == G.T
    assert equal(forward(vjp(zq, zv, g)), G.T * g)
    assert not equal(forward(vjp(zq, zv, g)), G * g)


def test_jacobian_nonsquare_and_scalar():
    zv = vector("z", 3)
    y = Matrix([zv[0] * zv[1], sin(zv[2])])
    J = jacobian(y, zv)
    assert J.shape == (2, 3)
    assert J == Matrix([[zv[1], zv[0], 0], [0, 0, cos(zv[2])]])
    assert jacobian(y, zv, layout="denominator").shape == (3, 2)
    # a scalar: denominator layout is the gradient column
    f = dot(zv, zv)
    assert jacobian(f, zv, layout="denominator") == 2 * zv
    assert jacobian(f, list(zv)) == 2 * zv.T
    assert vjp(y, zv, [1, 0]) == Matrix([zv[1], zv[0], 0])


# --- vectors -----------------------------------------------------------------------------

def test_vector_symbols():
    v = vector("z", 3)
    assert v.shape == (3, 1)
    assert [str(e) for e in v] == ["z_1", "z_2", "z_3"]
    assert all(e.is_real for e in v)


@pytest.mark.parametrize("n", [2, 4])
def test_normalized_has_unit_norm(n):
    u = unit_vector("u", n)
    assert sympy.simplify(dot(u, u)) == 1
    assert sympy.simplify(unit_constraint(u)) == 0
    assert sympy.simplify(unit_constraint(vector("u", n))) != 0
    assert equal(normalized(Matrix([3, 4])), Matrix([sympy.Rational(3, 5), sympy.Rational(4, 5)]))


def test_plane_pair():
    t = Symbol("theta", real=True)
    zh, qh = plane_pair(t, 4)
    assert zh.shape == qh.shape == (4, 1)
    assert equal(dot(zh, zh), 1) and equal(dot(qh, qh), 1)
    assert equal(dot(zh, qh), cos(t))


# --- symbolic dimension ------------------------------------------------------------------

def test_householder_identity_symbolic_dimension():
    v = MatrixSymbol("v", d, 1)
    H = Identity(d) - 2 * outer(v, v)
    assert simplify_with_unit_norms(H * H, [v]) == Identity(d)
    assert is_zero(simplify_with_unit_norms(H * H, [v]) - Identity(d))
    # without the unit-norm constraint, H is not an involution
    assert not is_zero(H * H - Identity(d))
    assert equal(simplify_with_unit_norms(H * v, [v]), -v)


def rotation_trick_R(zh, qh, c, I):
    r = (zh + qh) / sqrt(2 + 2 * c)  # |zh + qh|^2 = 2 + 2c for unit zh, qh with zh.qh = c
    return I - 2 * r * r.T + 2 * qh * zh.T


def test_rotation_matrix_symbolic_dimension():
    zh, qh = MatrixSymbol("z", d, 1), MatrixSymbol("q", d, 1)
    c = Symbol("c", real=True)
    R = rotation_trick_R(zh, qh, c, Identity(d))
    known = dict(unit_vectors=[zh, qh], inner_products={(zh, qh): c})
    assert simplify_with_unit_norms(R * zh, **known) == qh
    assert simplify_with_unit_norms(R.T * R, **known) == Identity(d)
    assert simplify_with_unit_norms(dot(zh, R * qh), **known) != c  # R is not symmetric


def test_reduction_agrees_with_explicit_vectors():
    # independent check: reduce in symbolic d, then compare with explicit 3-D vectors
    zh, qh, w = MatrixSymbol("z", d, 1), MatrixSymbol("q", d, 1), MatrixSymbol("w", d, 1)
    c = Symbol("c", real=True)
    expr = (Identity(d) - 2 * zh * zh.T) * (qh * qh.T + w * zh.T) * zh
    reduced = simplify_with_unit_norms(expr, [zh, qh], {(zh, qh): c})
    # by hand: (I - 2 z z^T)(c q + w) = c q + w - 2 c^2 z - 2 z z^T w
    assert is_zero(reduced - (c * qh + w - 2 * c**2 * zh - 2 * zh * zh.T * w))
    t = Symbol("theta", real=True)
    ze, qe = plane_pair(t, 3)
    we = vector("w", 3)
    explicit = (eye(3) - 2 * ze * ze.T) * (qe * qe.T + we * ze.T) * ze
    subs = {zh: ze, qh: qe, w: we, d: 3}
    value = reduced.subs(subs).doit().subs(c, cos(t))
    assert equal(Matrix(value), explicit)


def test_scalar_result_of_full_reduction():
    v = MatrixSymbol("v", d, 1)
    H = Identity(d) - 2 * v * v.T
    assert simplify_with_unit_norms(v.T * H * v, [v]) == -1


# --- equality helpers and input validation -----------------------------------------------

def test_equal_and_assert_equal():
    assert equal(sin(x) ** 2 + cos(x) ** 2, 1)
    assert not equal(sin(x), cos(x))
    assert_equal(Matrix([x * (x + 1)]), Matrix([x**2 + x]))
    with pytest.raises(AssertionError, match="difference"):
        assert_equal(Matrix([x]), Matrix([x + 1]))
    with pytest.raises(ValueError, match="shapes differ"):
        equal(Matrix([x]), Matrix([x, x]))


def test_bad_input_errors():
    zv = vector("z", 2)
    with pytest.raises(ValueError, match="column or row vector"):
        jacobian(eye(2) * z, zv)
    with pytest.raises(TypeError, match="symbolic-dimension"):
        jacobian(MatrixSymbol("m", d, 1), zv)
    with pytest.raises(TypeError, match="Symbols"):
        jacobian(zv, [z + 1])
    with pytest.raises(ValueError, match="repeated"):
        jacobian(zv, [zv[0], zv[0]])
    with pytest.raises(ValueError, match="layout"):
        jacobian(zv, zv, layout="rows")
    with pytest.raises(ValueError, match="entries"):
        vjp(zv, zv, [1, 2, 3])
    with pytest.raises(ValueError, match="dimensions differ"):
        dot(vector("a", 2), vector("b", 3))
    with pytest.raises(TypeError, match="column vector"):
        dot(eye(2), eye(2))
    with pytest.raises(ValueError, match="dimensions differ"):
        outer(MatrixSymbol("a", d, 1), MatrixSymbol("b", d + 1, 1))
    with pytest.raises(ValueError, match=">= 1"):
        vector("z", 0)
    with pytest.raises(TypeError, match="int"):
        vector("z", 2.0)
    with pytest.raises(ValueError, match="zero vector"):
        normalized(Matrix([0, 0]))
    with pytest.raises(TypeError, match="MatrixExpr"):
        simplify_with_unit_norms(z, [])
    with pytest.raises(TypeError, match="symbolic-dimension"):
        sg(MatrixSymbol("G", d, d))
    with pytest.raises(ValueError, match="d >= 2"):
        plane_pair(x, 1)
