"""Data-driven LoRA initialisations (PiSSA, OLoRA) as pure tensor functions.

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", arXiv:2404.02948) puts the top-``r``
singular triplets of the base weight into the adapter and freezes the residual.
OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large
Language Models", arXiv:2406.01775) does the same with the first ``r`` columns
of a QR factorisation.

Both move part of the base weight into the adapter, so the base layer must be
replaced by a residual.  The functions here return ``(lora_A, lora_B,
residual)`` and reproduce PEFT 0.21's arithmetic operation by operation, so an
adapter initialised here is bit-identical to one initialised by PEFT from the
same weight and torch RNG state.  Wiring into modules lives elsewhere.

Dtype contract (as in PEFT): the factorisation runs in float32 and ``lora_A``
/ ``lora_B`` come back in float32; only ``residual`` is cast back to the
weight's dtype.  (PEFT afterwards moves the adapter to the base layer's dtype
and, by default, autocasts bf16/fp16 adapters back to float32.)

Shapes use the ``nn.Linear`` convention: ``weight`` is ``(out, in)``; callers
with ``fan_in_fan_out`` weights must transpose first.
"""

from __future__ import annotations

import re

import torch

__all__ = ["parse_init_lora_weights", "pissa_factors", "olora_factors", "to_original_base"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NITER_RE = re.compile(r"pissa_niter_(\d+)")


def parse_init_lora_weights(value: object) -> tuple[str, int | None]:
    """Parse a data-driven ``init_lora_weights`` string.

    Args:
        value: ``"pissa"``, ``"pissa_niter_K"`` (K a positive int) or ``"olora"``.

    Returns:
        ``(kind, niter)``: kind is ``"pissa"`` or ``"olora"``; niter is K for the
        randomised-SVD variant and ``None`` otherwise.

    Raises:
        ValueError: for any other value, naming it and the allowed forms.
    """
    allowed = "'pissa', 'pissa_niter_K' (K a positive integer) or 'olora'"
    if isinstance(value, str):
        if value == "pissa":
            return "pissa", None
        # PEFT dispatches OLoRA on value.lower(), so accept any casing here too.
        if value.lower() == "olora":
            return "olora", None
        m = _NITER_RE.fullmatch(value)
        if m is not None and int(m.group(1)) > 0:
            return "pissa", int(m.group(1))
    raise ValueError(f"init_lora_weights={value!r} is not a data-driven init; expected {allowed}")


def _check(weight: torch.Tensor, r: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    # PEFT silently returns fewer than r components here (slicing past the
    # end), which then fails to load into an (r, in) adapter; fail early.
    if not 0 < r <= min(weight.shape):
        raise ValueError(f"r={r} must be in [1, min(out, in)={min(weight.shape)}] for weight {tuple(weight.shape)}")


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: split ``weight`` into its principal rank-``r`` part and a residual.

    With ``W = U diag(S) V^T``: ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``
    so that ``s * B @ A`` is the best rank-``r`` approximation of ``W``.

    Args:
        weight: dense base weight, shape ``(out, in)``, float32/float16/bfloat16.
        r: adapter rank, ``1 <= r <= min(out, in)``.
        scaling: LoRA scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        niter: ``None`` for an exact SVD; otherwise the number of subspace
            iterations of ``torch.svd_lowrank`` (consumes the torch RNG).

    Returns:
        ``lora_A`` ``(r, in)`` float32, ``lora_B`` ``(out, r)`` float32, and
        ``residual`` ``(out, in)`` in ``weight.dtype`` with
        ``residual + scaling * lora_B @ lora_A == weight`` up to rounding.

    Raises:
        ValueError: if ``weight`` is not 2-D or ``r`` is out of range.
        TypeError: if ``weight`` is not a float16/bfloat16/float32 tensor.
    """
    _check(weight, r)
    w = weight.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        # Keep PEFT's views (non-contiguous U[:, :r]) so the matmuls below
        # take the same kernel path and round identically.
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        # Randomised SVD: q=r, same positional call as PEFT so the Gaussian
        # sketch consumes the RNG identically.
        Ur, Sr, Vr = torch.svd_lowrank(w, r, niter=niter)
        Sr = Sr / scaling
        Vhr = Vr.t()
    # Split sqrt(S) evenly between the factors so A and B have matching norms.
    root = torch.diag(torch.sqrt(Sr))
    lora_A = root @ Vhr
    lora_B = Ur @ root
    # (scaling * B) @ A, not scaling * (B @ A): this is PEFT's evaluation order.
    residual = (w - (scaling * lora_B) @ lora_A).to(weight.dtype)
    return lora_A, lora_B, residual


def olora_factors(
    weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = QR``; ``B = Q[:, :r]`` (orthonormal), ``A = R[:r]``.

    Unlike PiSSA, ``scaling`` is not folded into the factors, so the adapter
    delta at init is ``scaling * Q_r R_r`` and the residual is ``W`` minus that.

    Args:
        weight: dense base weight, shape ``(out, in)``, float32/float16/bfloat16.
        r: adapter rank, ``1 <= r <= min(out, in)``.
        scaling: LoRA scaling ``s``.

    Returns:
        ``lora_A`` ``(r, in)`` float32, ``lora_B`` ``(out, r)`` float32, and
        ``residual`` ``(out, in)`` in ``weight.dtype``.

    Raises:
        ValueError: if ``weight`` is not 2-D or ``r`` is out of range.
        TypeError: if ``weight`` is not a float16/bfloat16/float32 tensor.
    """
    _check(weight, r)
    w = weight.detach().to(torch.float32)
    Q, R = torch.linalg.qr(w)
    lora_A = R[:r].contiguous()
    lora_B = Q[:, :r].contiguous()
    residual = (w - (scaling * lora_B) @ lora_A).to(weight.dtype)
    return lora_A, lora_B, residual


def to_original_base(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    init_A: torch.Tensor,
    init_B: torch.Tensor,
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Convert a tuned PiSSA/OLoRA adapter into a plain LoRA on the original weight.

    ``W_orig = W_res + s B0 A0`` and the tuned layer is ``W_res + s B A``, so
    the update relative to ``W_orig`` is ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``:
    a rank-``2r`` adapter.  Alpha is adjusted so its scaling equals ``s``.

    Args:
        lora_A: tuned A, ``(r, in)``.   lora_B: tuned B, ``(out, r)``.
        init_A: A at init, ``(r, in)``. init_B: B at init, ``(out, r)``.
        r: rank of the tuned adapter.
        lora_alpha: its alpha.
        use_rslora: whether scaling is ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Returns:
        ``(A2, B2, r2, alpha2)``: ``A2 = cat([A, A0], 0)`` ``(2r, in)``,
        ``B2 = cat([B, -B0], 1)`` ``(out, 2r)``, ``r2 = 2r``, and ``alpha2 = 2 * alpha``
        (``alpha * sqrt(2)`` with rsLoRA), so that
        ``W_orig + s2 * B2 @ A2 == W_res + s * B @ A``.

    Raises:
        ValueError: if the four factor shapes do not agree with ``r``.
    """
    if lora_A.shape != init_A.shape or lora_B.shape != init_B.shape:
        raise ValueError(
            f"tuned and initial factors differ in shape: A {tuple(lora_A.shape)} vs {tuple(init_A.shape)}, "
            f"B {tuple(lora_B.shape)} vs {tuple(init_B.shape)}"
        )
    if lora_A.shape[0] != r or lora_B.shape[1] != r:
        raise ValueError(f"r={r} does not match lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)}")
    # Tuned factors first, initial ones second (PEFT's order), with the sign
    # on B so that B2 @ A2 = B A - B0 A0.
    A2 = torch.cat([lora_A, init_A], dim=0)
    B2 = torch.cat([lora_B, -init_B], dim=1)
    # Doubling r halves alpha/r; rsLoRA's alpha/sqrt(r) only shrinks by sqrt(2).
    alpha2 = lora_alpha * 2**0.5 if use_rslora else lora_alpha * 2
    return A2, B2, 2 * r, alpha2
