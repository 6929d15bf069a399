"""High-precision (mpmath) references for the block metrics, and a softmax head built by hand.

The float64 code under test receives Gram matrices formed in float64; the reference takes
the *same float64 factors* (their entries are exact binary numbers), promotes them to
``DIGITS`` significant digits and evaluates the definitions of the metrics there, so that
the only rounding left in a comparison is the code's own.

The dense ``D × D`` definition is too slow in mpmath for a layer of 5000 parameters, so
:func:`subspace_metrics` evaluates it in an orthonormal basis of ``range([V, U])`` (a
Gram-Schmidt pass on the exact joint Gram matrix): outside that subspace F, EF and g
vanish, A and B act as ``λI``, and the contributions cancel in every metric.
:func:`dense_metrics` is the plain ``D × D`` definition for small blocks; a test checks
that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import torch
from torch import Tensor

DIGITS = 60
mp = mpmath.MPContext()
mp.dps = DIGITS

COSINES = ("matrix_cosine", "direction_cosine", "nat_grad_cosine", "ef_grad_cosine")
COMPARED = (
    "trace_ratio",
    "rel_error",
    "matrix_cosine",
    "kl",
    "direction_cosine",
    "nat_grad_cosine",
    "ef_grad_cosine",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
)


def to_mp(tensor: Tensor) -> mpmath.matrix:
    """A float64 matrix (or vector, as a column) as an exact mpmath matrix."""
    t = tensor.detach().to(torch.float64).cpu()
    if t.dim() == 1:
        t = t.unsqueeze(1)
    return mp.matrix([[mp.mpf(float(x)) for x in row] for row in t.tolist()])


def gram(left: mpmath.matrix, right: mpmath.matrix) -> mpmath.matrix:
    """``leftᵀ right`` in high precision."""
    out = mp.matrix(left.cols, right.cols)
    for i in range(left.cols):
        column = [left[k, i] for k in range(left.rows)]
        for j in range(right.cols):
            out[i, j] = mp.fdot(column, [right[k, j] for k in range(right.rows)])
    return out


def hadamard(a: mpmath.matrix, b: mpmath.matrix) -> mpmath.matrix:
    return mp.matrix([[a[i, j] * b[i, j] for j in range(a.cols)] for i in range(a.rows)])


def _frob_sq(m: mpmath.matrix) -> mpmath.mpf:
    return mp.fsum(m[i, j] ** 2 for i in range(m.rows) for j in range(m.cols))


def _trace(m: mpmath.matrix) -> mpmath.mpf:
    return mp.fsum(m[i, i] for i in range(m.rows))


def _inner(a: mpmath.matrix, b: mpmath.matrix) -> mpmath.mpf:
    return mp.fsum(a[i, j] * b[i, j] for i in range(a.rows) for j in range(a.cols))


def _metrics(fisher, empirical, gradient, damping, extra_dimensions: int) -> dict[str, float]:
    """The definitions on dense (high-precision) matrices of size ``k``.

    ``extra_dimensions`` directions outside the matrices, where F = EF = 0 and g has no
    component, add nothing: ``tr(BA⁻¹) − D`` and the log-determinants cancel there.
    """
    k = fisher.rows
    lam = mp.mpf(damping)
    eye = mp.eye(k)
    a = fisher + lam * eye
    b = empirical + lam * eye
    a_inv, b_inv = mp.inverse(a), mp.inverse(b)
    nat, ef = a_inv * gradient, b_inv * gradient
    grad_sq = (gradient.T * gradient)[0]
    nat_sq, ef_sq = (nat.T * nat)[0], (ef.T * ef)[0]
    nat_ef = (nat.T * ef)[0]
    nat_projection, ef_projection = (gradient.T * nat)[0], (gradient.T * ef)[0]
    kl = (_trace(b * a_inv) - k + mp.log(mp.det(a)) - mp.log(mp.det(b))) / 2
    diff = empirical - fisher
    del extra_dimensions  # documents why the outside directions do not appear
    values = {
        "trace_ratio": _trace(empirical) / _trace(fisher),
        "rel_error": mp.sqrt(_frob_sq(diff)) / mp.sqrt(_frob_sq(fisher)),
        "matrix_cosine": _inner(empirical, fisher)
        / mp.sqrt(_frob_sq(empirical) * _frob_sq(fisher)),
        "kl": kl,
        "direction_cosine": nat_ef / mp.sqrt(nat_sq * ef_sq),
        "nat_grad_cosine": nat_projection / mp.sqrt(grad_sq * nat_sq),
        "ef_grad_cosine": ef_projection / mp.sqrt(grad_sq * ef_sq),
        "nat_projection": nat_projection,
        "ef_projection": ef_projection,
        "ef_projection_per_sample": _trace(b_inv * empirical),
    }
    return {key: float(value) for key, value in values.items()}


def dense_metrics(v: Tensor, u: Tensor, damping: float) -> dict[str, float]:
    """Metrics of ``F = VVᵀ``, ``EF = UUᵀ``, ``g = U 1/√N`` as ``D × D`` matrices (small D)."""
    v_mp, u_mp = to_mp(v), to_mp(u)
    n = u.shape[1]
    a = mp.matrix([[1 / mp.sqrt(n)] for _ in range(n)])
    return _metrics(v_mp * v_mp.T, u_mp * u_mp.T, u_mp * a, damping, 0)


@dataclass
class JointGram:
    """Exact Gram matrices of ``V`` (``D × R``) and ``U`` (``D × N``)."""

    gram_v: mpmath.matrix
    gram_u: mpmath.matrix
    gram_uv: mpmath.matrix  # UᵀV
    dimension: int


def subspace_metrics(grams: JointGram, damping: float) -> dict[str, float]:
    """Metrics from exact Gram matrices, in an orthonormal basis of ``range([V, U])``.

    A Gram-Schmidt pass on ``K_W = [V, U]ᵀ[V, U]`` (a Cholesky factorisation that skips the
    columns already in the span: pivots below ``1e-40`` of the largest diagonal are exact
    zeros at this precision) gives each column's coordinates in the basis.
    """
    r, n = grams.gram_v.rows, grams.gram_u.rows
    m = r + n

    def entry(i, j):
        if i < r and j < r:
            return grams.gram_v[i, j]
        if i >= r and j >= r:
            return grams.gram_u[i - r, j - r]
        if i >= r:
            return grams.gram_uv[i - r, j]
        return grams.gram_uv[j - r, i]

    scale = max(entry(i, i) for i in range(m))
    rows: list[list] = []  # coordinates of column i in the kept basis directions
    pivots: list[tuple[int, mpmath.mpf]] = []  # (column, its coordinate on its own direction)
    for i in range(m):
        coords = []
        for p, (j, l_jj) in enumerate(pivots):
            s = entry(i, j) - mp.fsum(coords[q] * rows[j][q] for q in range(p))
            coords.append(s / l_jj)
        d = entry(i, i) - mp.fsum(c**2 for c in coords)
        if d > mp.mpf(10) ** -40 * scale:
            coords.append(mp.sqrt(d))
            pivots.append((i, coords[-1]))
        rows.append(coords)
    k = len(pivots)
    coordinates = mp.matrix(k, m)
    for i, coords in enumerate(rows):
        for q, c in enumerate(coords):
            coordinates[q, i] = c
    c_v = coordinates[:, :r] if r else mp.matrix(k, 0)
    c_u = coordinates[:, r:]
    a = mp.matrix([[1 / mp.sqrt(n)] for _ in range(n)])
    return _metrics(c_v * c_v.T, c_u * c_u.T, c_u * a, damping, grams.dimension - k)


@dataclass
class SoftmaxHead:
    """A ``Linear`` layer with cross-entropy, its factors written out by hand (float64).

    ``x̃_n = [x_n, 1]``; per-sample gradient ``g_n = vec(δ_n x̃_nᵀ)``, ``δ_n = p_n − e_{y_n}``;
    square-root columns ``v_{r,n} = vec(s_{r,n} x̃_nᵀ)/√N`` with ``S_n = diag(√p_n) Q_n``
    (``Q_n`` an orthonormal basis of the complement of ``τ_n = √p_n``), and coefficients
    ``β_n = Q_nᵀ(τ_n − e_{y_n}/τ_{y_n})`` with ``S_n β_n = δ_n``. Columns of ``V`` are ordered
    ``r·N + n``, as the package orders them.
    """

    inputs: Tensor  # x̃, N × (I + 1)
    sqrt: Tensor  # (C − 1) × N × C: s_{r,n}
    residuals: Tensor  # δ, N × C (p − e_y, float64)
    beta: Tensor  # N × (C − 1)

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]

    @property
    def dimension(self) -> int:
        return self.inputs.shape[1] * self.residuals.shape[1]

    def scaled_sqrt(self) -> Tensor:
        """``s_{r,n}/√N``: the square-root factors with the mean's ``1/√N``, as the package
        keeps them (``v_{r,n} = vec(s_{r,n} x̃_nᵀ)/√N``)."""
        return self.sqrt / self.num_samples**0.5

    def coefficients(self) -> Tensor:
        """``B`` (``R × N``) with ``U = VB``: ``B[r·N + n, n] = β_{n,r}``."""
        n, columns = self.beta.shape
        matrix = torch.zeros(columns, n, n, dtype=torch.float64)
        matrix[:, torch.arange(n), torch.arange(n)] = self.beta.T
        return matrix.reshape(columns * n, n)

    # ------------------------------------------------------------- float64, as the engine
    def input_gram(self) -> Tensor:
        return self.inputs @ self.inputs.T

    def gram_v(self) -> Tensor:
        n = self.num_samples
        s = self.sqrt.reshape(-1, self.sqrt.shape[-1])
        columns = self.sqrt.shape[0]
        gram = (s @ s.T).view(columns, n, columns, n) * self.input_gram().view(1, n, 1, n) / n
        return gram.reshape(columns * n, columns * n)

    def gram_u(self) -> Tensor:
        return (self.residuals @ self.residuals.T) * self.input_gram() / self.num_samples

    def gram_uv(self) -> Tensor:
        n = self.num_samples
        s = self.sqrt.reshape(-1, self.sqrt.shape[-1])
        columns = self.sqrt.shape[0]
        gram = (self.residuals @ s.T).view(n, columns, n) * self.input_gram().view(n, 1, n) / n
        return gram.reshape(n, columns * n)

    def factors(self) -> tuple[Tensor, Tensor]:
        """Explicit ``V`` (``D × R``) and ``U`` (``D × N``), for small layers."""
        n = self.num_samples
        x = self.inputs
        v = (self.sqrt.unsqueeze(3) * x.view(1, n, 1, -1)).reshape(-1, self.dimension).T / n**0.5
        u = (self.residuals.unsqueeze(2) * x.unsqueeze(1)).reshape(n, -1).T / n**0.5
        return v, u

    # ------------------------------------------------------------------ high precision
    def exact_grams(self, through_coefficients: bool) -> JointGram:
        """Gram matrices in high precision from the float64 factors.

        With ``through_coefficients`` the empirical side is ``U = VB`` exactly (what the
        coefficient path assumes); otherwise ``U`` is built from the float64 residuals.
        """
        n = self.num_samples
        columns, _, classes = self.sqrt.shape
        x = to_mp(self.inputs.T)
        x_gram = gram(x, x)
        s = to_mp(self.sqrt.reshape(-1, classes).T)  # C × R, column r·N + n
        s_gram = gram(s, s)
        scale = mp.mpf(1) / n
        gram_v = mp.matrix(columns * n, columns * n)
        for i in range(columns * n):
            for j in range(columns * n):
                gram_v[i, j] = s_gram[i, j] * x_gram[i % n, j % n] * scale
        if through_coefficients:
            b = to_mp(self.coefficients())
            gram_uv = b.T * gram_v
            gram_u = gram_uv * b
        else:
            d = to_mp(self.residuals.T)  # C × N
            d_gram, ds = gram(d, d), gram(d, s)
            gram_u = hadamard(d_gram, x_gram) * scale
            gram_uv = mp.matrix(n, columns * n)
            for i in range(n):
                for j in range(columns * n):
                    gram_uv[i, j] = ds[i, j] * x_gram[i, j % n] * scale
        return JointGram(gram_v, gram_u, gram_uv, self.dimension)


def softmax_head(inputs: Tensor, weight: Tensor, bias: Tensor, targets: Tensor) -> SoftmaxHead:
    """Build the hand-written factors of ``Linear`` + cross-entropy (all float64)."""
    n, classes = inputs.shape[0], weight.shape[0]
    x = torch.cat([inputs, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    logits = inputs @ weight.T + bias
    p = logits.softmax(dim=1)
    tau = p.sqrt()
    onehot = torch.nn.functional.one_hot(targets, classes).to(torch.float64)
    # the last C − 1 columns of a complete QR of τ_n are an orthonormal basis of τ_n's complement
    q = torch.linalg.qr(tau.unsqueeze(2), mode="complete").Q[:, :, 1:]  # N × C × (C − 1)
    s = tau.unsqueeze(2) * q  # S_n = diag(τ_n) Q_n
    tau_y = tau.gather(1, targets.unsqueeze(1))
    beta = torch.einsum("ncr,nc->nr", q, tau - onehot / tau_y)
    return SoftmaxHead(
        inputs=x, sqrt=s.permute(2, 0, 1).contiguous(), residuals=p - onehot, beta=beta
    )
