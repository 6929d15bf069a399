"""Brute-force dense definitions (torch.func, float64): the tests' ground truth.

Everything here is computed in the most obvious way from the definitions of the theory
page (docs/theory.md#fisher-and-ef, docs/theory.md#metrics), with dense
``D × D`` matrices, explicit inverses and per-sample loops where they make the definition
plain. It never imports fisher_monitor's curvature or metric code, and runs on an
un-extended copy of the model (BackPACK's hooks break torch.func transforms).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

METRIC_NAMES = (
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
    "dimension",
    "damping",
)


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def layer_slices(model: nn.Module) -> dict[str, slice]:
    """Coordinates of each layer (module owning trainable parameters) in the flat vector.

    A module with ``torch.nn.utils.parametrize`` parametrizations owns the parameters the
    parametrizations hold (``parametrizations.weight.original…``): its weight and bias
    form one block, as for a plain module.
    """
    params = trainable(model)
    names = list(params)
    offsets, start = {}, 0
    for name in names:
        offsets[name] = (start, start + params[name].numel())
        start += params[name].numel()
    slices = {}
    for mod_name, module in model.named_modules():
        if ".parametrizations." in f".{mod_name}.":
            continue
        owned = list(module.named_parameters(recurse=False))
        if isinstance(getattr(module, "parametrizations", None), nn.ModuleDict):
            owned += list(module.parametrizations.named_parameters(prefix="parametrizations"))
        own = [f"{mod_name}.{n}" if mod_name else n for n, p in owned if p.requires_grad]
        own = [n for n in own if n in offsets]  # a tied parameter: its first holder's layer
        if own:
            first = min(offsets[n][0] for n in own)
            last = max(offsets[n][1] for n in own)
            assert last - first == sum(params[n].numel() for n in own), "layer not contiguous"
            slices[mod_name or "(root)"] = slice(first, last)
    return slices


def _flatten(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat(
        [t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1) for t in tree.values()],
        dim=1,
    )


def sample_nll(loss_fn: nn.Module) -> nn.Module:
    """The per-sample negative log-likelihood ℓ_n, applied to a batch of one sample.

    A cross-entropy (or NLL, or binary cross-entropy) sample's NLL is the sum over all its
    output positions (those whose target is ``ignore_index`` left out) whatever the
    reduction (``"mean"`` would divide by their number T, a constant that F and EF must not
    see). ``MSELoss("mean")`` on one sample is ‖f − y‖²/K, the NLL
    of a Gaussian with variance K/2; ``"sum"``, ‖f − y‖² (variance ½).
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return type(loss_fn)(reduction="sum", ignore_index=loss_fn.ignore_index)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return type(loss_fn)(reduction="sum")
    return loss_fn


def per_sample_gradients(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``(N, D)`` matrix of g_n = ∇ℓ_n with ℓ_n the NLL of sample n (:func:`sample_nll`)."""
    params = trainable(model)
    nll = sample_nll(loss_fn)

    def sample_loss(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nll(out, y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return torch.cat([grads[n].reshape(inputs.shape[0], -1) for n in params], dim=1)


def output_jacobians(model: nn.Module, inputs: Tensor) -> Tensor:
    """``(N, K, D)``: Jacobians of the flattened output of each sample w.r.t. the parameters."""
    params = trainable(model)

    def sample_output(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(sample_output), in_dims=(None, 0))(params, inputs)
    n, k = inputs.shape[0], None
    parts = []
    for name in params:
        j = jac[name]
        k = j.shape[1]
        parts.append(j.reshape(n, k, -1))
    return torch.cat(parts, dim=2)


def output_hessians(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``(N, K, K)``: Hessians of ℓ_n w.r.t. the flattened output f_n."""
    with torch.no_grad():
        outputs = model(inputs)
    shape = outputs.shape[1:]
    nll = sample_nll(loss_fn)

    def sample_loss(f, y):
        return nll(f.reshape(1, *shape), y.unsqueeze(0))

    return vmap(hessian(sample_loss))(outputs.reshape(outputs.shape[0], -1), targets)


def fisher(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """F = (1/N) Σ_n J_nᵀ H_n J_n (the GGN, equal to the Fisher for these losses)."""
    jac = output_jacobians(model, inputs)
    hess = output_hessians(model, loss_fn, inputs, targets)
    return torch.einsum("nkd,nkl,nle->de", jac, hess, jac) / inputs.shape[0]


def sampled_fisher(
    model, loss_name: str, inputs, num_samples: int, generator: torch.Generator
) -> Tensor:
    """Monte-Carlo Fisher from labels drawn from the model, brute force per sample."""
    jac = output_jacobians(model, inputs)  # (N, K, D)
    with torch.no_grad():
        outputs = model(inputs)
    n = inputs.shape[0]
    total = torch.zeros(jac.shape[2], jac.shape[2], dtype=jac.dtype)
    for _ in range(num_samples):
        if loss_name == "cross_entropy":
            probs = outputs.softmax(dim=1)
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            residual = probs - nn.functional.one_hot(labels, probs.shape[1]).to(probs)
        elif loss_name == "bce":
            probs = outputs.sigmoid()
            labels = torch.bernoulli(probs, generator=generator)
            residual = probs - labels
        else:  # mse, mean reduction: ℓ = ‖f − y‖²/K, y ~ N(f, K/2)
            k = outputs.shape[1]
            noise = (
                torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
                * (k / 2) ** 0.5
            )
            residual = 2.0 * (-noise) / k
        grads = torch.einsum("nkd,nk->nd", jac, residual)
        total += grads.T @ grads / n
    return total / num_samples


def empirical_fisher(per_sample: Tensor) -> Tensor:
    return per_sample.T @ per_sample / per_sample.shape[0]


def dense_metrics(F: Tensor, EF: Tensor, per_sample: Tensor, damping: Tensor) -> dict[str, float]:
    """All metrics (docs/theory.md#metrics) for dense F_S, EF_S; ``damping``: λ per coordinate."""
    D = F.shape[0]
    g = per_sample.mean(dim=0)
    A = F + torch.diag(damping)
    B = EF + torch.diag(damping)
    A_inv = torch.linalg.inv(A)
    B_inv = torch.linalg.inv(B)
    nat = torch.linalg.solve(A, g)
    ef = torch.linalg.solve(B, g)

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    return {
        "trace_ratio": float(torch.trace(EF) / torch.trace(F)),
        "rel_error": float(torch.linalg.norm(EF - F) / torch.linalg.norm(F)),
        "matrix_cosine": float((EF * F).sum() / (torch.linalg.norm(EF) * torch.linalg.norm(F))),
        "kl": float(0.5 * (torch.trace(B @ A_inv) - D + torch.logdet(A) - torch.logdet(B))),
        "direction_cosine": cos(nat, ef),
        "nat_grad_cosine": cos(g, nat),
        "ef_grad_cosine": cos(g, ef),
        "nat_projection": float(g @ A_inv @ g),
        "ef_projection": float(g @ B_inv @ g),
        "ef_projection_per_sample": float(
            torch.einsum("nd,de,ne->n", per_sample, B_inv, per_sample).mean()
        ),
        "dimension": float(D),
        "damping": float(damping.mean()),
    }


def restrict(matrix: Tensor, structure: str, slices: dict[str, slice]) -> Tensor:
    """Block-diagonal (per layer) or diagonal restriction of a full D × D matrix."""
    if structure == "diag":
        return torch.diag(torch.diagonal(matrix))
    out = torch.zeros_like(matrix)
    for s in slices.values():
        out[s, s] = matrix[s, s]
    return out


def damping_vector(F_S: Tensor, slices: dict[str, slice], damping: float, mode: str) -> Tensor:
    lam = torch.zeros(F_S.shape[0], dtype=F_S.dtype)
    for s in slices.values():
        block = F_S[s, s]
        lam[s] = damping * torch.trace(block) / block.shape[0] if mode == "relative" else damping
    return lam


DAMPED = (
    "kl",
    "direction_cosine",
    "nat_grad_cosine",
    "ef_grad_cosine",
    "nat_projection",
    "ef_projection",
    "ef_projection_per_sample",
    "damping",
)


def structured_metrics(
    F_S, EF_S, per_sample, slices, structure, dampings, mode, F=None
) -> dict[str, float]:
    """Keys ``{structure}/{metric}/{layer}`` and ``.../all`` from structured dense F_S and EF_S.

    ``all`` is the whole block-diagonal (or diagonal) matrix with each layer's λ on its
    coordinates, computed as one dense matrix. Relative damping uses the layer's Fisher
    block F_b (``F``; by default ``F_S``, which has the same block traces for diag and block).
    """
    several = len(dampings) > 1
    out: dict[str, float] = {}
    for damping in dampings:
        lam = damping_vector(F_S if F is None else F, slices, damping, mode)
        suffix = f"@{float(damping)!r}" if several else ""
        scopes = dict(slices)
        scopes["all"] = slice(0, F_S.shape[0])
        for layer, s in scopes.items():
            values = dense_metrics(F_S[s, s], EF_S[s, s], per_sample[:, s], lam[s])
            for metric, value in values.items():
                out[f"{structure}/{metric}{suffix if metric in DAMPED else ''}/{layer}"] = value
    return out


def reference_metrics(F, per_sample, slices, structure, dampings, mode) -> dict[str, float]:
    """Metrics of the ``diag`` or ``block`` restriction of the full dense F and EF."""
    EF = empirical_fisher(per_sample)
    return structured_metrics(
        restrict(F, structure, slices),
        restrict(EF, structure, slices),
        per_sample,
        slices,
        structure,
        dampings,
        mode,
    )


def diag_and_block_metrics(model, loss_fn, inputs, targets, dampings=(1e-3,), mode="relative"):
    """``diag/...`` and ``block/...`` keys for a model, straight from the definitions."""
    per_sample = per_sample_gradients(model, loss_fn, inputs, targets)
    F = fisher(model, loss_fn, inputs, targets)
    slices = layer_slices(model)
    out: dict[str, float] = {}
    for structure in ("diag", "block"):
        out.update(reference_metrics(F, per_sample, slices, structure, list(dampings), mode))
    return out


# ---------------------------------------------------------------- Kronecker reference


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        (name or "(root)"): m
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    }


def _positions_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """(T, I) layer inputs of one sample at every position the weight is applied to.

    For a convolution, the patch under the kernel at each output position, cut out with
    ``Tensor.unfold`` one spatial dimension at a time (any of 1d/2d/3d).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    dims = len(module.kernel_size)
    padded = nn.functional.pad(x, [p for pad in reversed(module.padding) for p in (pad, pad)])
    patches = padded
    for d in range(dims):
        span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
        patches = patches.unfold(1 + d, span, module.stride[d])
        index = torch.arange(0, span, module.dilation[d])
        patches = patches.index_select(patches.dim() - 1, index)
    # (C, T_1..T_d, k_1..k_d) -> (T_1..T_d, C, k_1..k_d) -> (T, C·k)
    channels = patches.shape[0]
    order = list(range(1, dims + 1)) + [0] + list(range(dims + 1, 2 * dims + 1))
    patches = patches.permute(*order)
    positions = int(torch.tensor(patches.shape[:dims]).prod())
    return patches.reshape(positions, channels * int(torch.tensor(module.kernel_size).prod()))


def _sample_output_ggn(model, module, x, target, nll):
    """One sample's layer-output GGN summed over positions, / T (O × O), and the layer input.

    The GGN ``J_zᵀ H J_z`` of the sample's loss w.r.t. the layer output ``z``, by a zero
    perturbation added to ``z`` (the Jacobian row by row, the loss Hessian by torch.func).
    """
    store = {}

    def pre_hook(mod, args):
        store["input"] = args[0].detach()[0]

    def fwd_hook(mod, args, out):
        eps = torch.zeros_like(out, requires_grad=True)
        store["eps"] = eps
        return out + eps

    h1 = module.register_forward_pre_hook(pre_hook)
    h2 = module.register_forward_hook(fwd_hook)
    out = model(x)
    h1.remove()
    h2.remove()
    eps = store["eps"]
    flat_out = out.reshape(-1)
    J = torch.stack(
        [
            torch.autograd.grad(flat_out[k], eps, retain_graph=True)[0].reshape(-1)
            for k in range(flat_out.numel())
        ]
    )
    H = hessian(lambda f: nll(f.reshape(out.shape), target))(flat_out.detach())
    ggn = J.T @ H @ J  # (T·O) × (T·O) in the output's memory layout
    z_shape = eps.shape[1:]
    if isinstance(module, nn.Linear):
        T = int(torch.tensor(z_shape[:-1]).prod()) if len(z_shape) > 1 else 1
        O = z_shape[-1]
        ggn = ggn.reshape(T, O, T, O)
    else:
        O = z_shape[0]
        T = int(torch.tensor(z_shape[1:]).prod())
        ggn = ggn.reshape(O, T, O, T).permute(1, 0, 3, 2)
    G_i = sum(ggn[t, :, t, :] for t in range(T)) / T
    return G_i, store["input"]


def kronecker_reference(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor):
    """Per layer: (G ⊗ A in the augmented [W | b] layout, permutation from parameter order).

    A = (1/N) Σ_n Σ_t x̃_{n,t} x̃_{n,t}ᵀ, G = (1/N)(1/T) Σ_n Σ_t [J_{z}ᵀ H_n J_{z}]_{t,t} with z the
    layer output and J_z the Jacobian of the network output w.r.t. it (KFC / KFAC-expand).
    """
    model = copy.deepcopy(model)
    nll = sample_nll(loss_fn)  # ℓ_n sums a sample's positions, as for F and EF
    result = {}
    n = inputs.shape[0]
    for name, module in _layer_modules(model).items():
        has_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        has_weight = module.weight.requires_grad
        A = None
        G = None
        for i in range(n):
            G_i, layer_input = _sample_output_ggn(
                model, module, inputs[i : i + 1], targets[i : i + 1], nll
            )
            X = _positions_inputs(module, layer_input)
            parts = [X] if has_weight else []
            if has_bias:
                parts.append(torch.ones(X.shape[0], 1, dtype=X.dtype))
            X = torch.cat(parts, dim=1)
            A_i = X.T @ X
            A = A_i if A is None else A + A_i
            G = G_i if G is None else G + G_i
        A, G = A / n, G / n
        I = A.shape[0]
        O = G.shape[0]
        weight_cols = I - 1 if has_bias else I
        perm = []
        if has_weight:
            perm += [o * I + i for o in range(O) for i in range(weight_cols)]
        if has_bias:
            perm += [o * I + weight_cols for o in range(O)]
        result[name] = (torch.kron(G, A), torch.tensor(perm))
    return result


def kronecker_reference_metrics(
    model, loss_fn, inputs, targets, dampings: Sequence[float], mode: str
) -> dict[str, float]:
    """``kron/{metric}/{layer}`` and ``kron/.../all`` from dense G ⊗ A and the exact EF blocks."""
    per_sample = per_sample_gradients(model, loss_fn, inputs, targets)
    slices = layer_slices(model)
    kron = kronecker_reference(model, loss_fn, inputs, targets)
    D = per_sample.shape[1]
    # assemble in augmented coordinates: per layer, permute parameter order -> augmented order
    F_S = torch.zeros(D, D, dtype=per_sample.dtype)
    permuted = torch.zeros_like(per_sample)
    aug_slices = {}
    for name, s in slices.items():
        K, perm = kron[name]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm))
        # column j of the augmented layout holds parameter-order coordinate inv[j]
        permuted[:, s] = per_sample[:, s][:, inv]
        F_S[s, s] = K
        aug_slices[name] = s
    EF_S = restrict(empirical_fisher(permuted), "block", aug_slices)
    # λ_b = damping · tr(F_b)/D_b with the layer's exact Fisher block (traces do not care
    # about the order of coordinates)
    F_exact = fisher(model, loss_fn, inputs, targets)
    return structured_metrics(F_S, EF_S, permuted, aug_slices, "kron", dampings, mode, F=F_exact)
