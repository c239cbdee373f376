r"""UFL forms of the semi-discrete Bloch-Torrey operator on the broken P1 space.

Strong form, per compartment (tetrahedron) T, magnetisation m (dimensionless), time t in ms:

    dm/dt = div(D grad m) - i q f(t) (g . x) m,

with a flux condition on every face f between cells + and -:

    -D grad m+ . n+ = kappa_f (m+ - m-)            (interior faces)
    -D grad m . n   = kappa_f m   (robin)  or 0    (neumann, outer faces)

Weak form with v in the same broken space:

    (dm/dt, v) + (D grad m, grad v)_T + <kappa [m], [v]>_interior + <kappa m, v>_outer
        + i q f(t) (g . x m, v) = 0.

Units: x in um, D in um^2/ms, kappa in um/ms; forms integrate over um^3 (volume) or um^2 (faces).
"""

from __future__ import annotations

import ufl


def mass(u, v, dx):
    """(u, v) in um^3."""
    return u * v * dx


def stiffness(u, v, diffusivity, dx):
    """Broken stiffness (D grad u, grad v), D in um^2/ms (constant or per cell)."""
    return diffusivity * ufl.inner(ufl.grad(u), ufl.grad(v)) * dx


def anisotropic_stiffness(u, v, tensor, dx):
    """Broken stiffness (D grad u, grad v) with D a 3 x 3 tensor in um^2/ms (per cell)."""
    return ufl.inner(ufl.dot(tensor, ufl.grad(u)), ufl.grad(v)) * dx


def moment(u, v, axis: int, dx):
    """(x_axis u, v) in um^4: the gradient-encoding operator J_axis."""
    x = ufl.SpatialCoordinate(u.ufl_function_space().mesh)
    return x[axis] * u * v * dx


def face_coupling(u, v, kappa, dS):
    """<kappa [u], [v]> over interior faces; kappa (um/ms) is one value per face."""
    return kappa("+") * ufl.jump(u) * ufl.jump(v) * dS


def robin_sink(u, v, kappa, ds):
    """<kappa u, v> over outer faces (a permeable outer surface draining to zero)."""
    return kappa * u * v * ds


def relaxation(u, v, rate, dx):
    """(R u, v) with R = 1/T2 in 1/ms."""
    return rate * u * v * dx


def interior_face_sensitivity(w, a, b, dS):
    """<w, [a] . [b]> over interior faces: w in the per-face space, a and b (blocked) broken P1.

    Assembled as a vector over faces it gives d/dkappa_f of sum_k a_k^T B(kappa) b_k.
    """
    return w("+") * ufl.inner(ufl.jump(a), ufl.jump(b)) * dS


def outer_face_sensitivity(w, a, b, ds):
    """<w, a . b> over outer faces (robin sensitivities)."""
    return w * ufl.inner(a, b) * ds


def cell_stiffness_sensitivity(w, a, b, dx):
    """(w, grad a : grad b) over cells: w per cell (DG0), a and b (blocked) broken P1.

    Assembled as a vector over cells it gives d/dD_t of sum_k a_k^T A(D) b_k (D per cell).
    """
    return w * ufl.inner(ufl.grad(a), ufl.grad(b)) * dx


def cell_mass_sensitivity(w, a, b, dx):
    """(w, a . b) over cells: d/dr_t of sum_k a_k^T R(r) b_k (r = 1/T2 per cell)."""
    return w * ufl.inner(a, b) * dx
