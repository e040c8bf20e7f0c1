"""Layout-independent initialisation: each element's value depends only on (seed, parameter
name, global element index), so every rank draws exactly its own elements and the initial
weights are bitwise identical on 1 rank, DDP, FSDP2 on any world size, TP and DeepSpeed ZeRO-3.

A counter-based generator, hand-written because torch has none that can start at an arbitrary
element offset: a 32-bit integer hash (Wellons' hash prospector) of the element index, keyed by
a BLAKE2 digest of (seed, name), gives two uniforms, Box-Muller turns them into a normal. Every
step is a separate elementwise torch op on int64 / float64 that IEEE-754 rounds exactly (integer
ops, +, *, /, sqrt, frexp), so the value does not depend on whether torch computed an element in
a vector lane or a scalar tail, i.e. on how the tensor was sharded or chunked. `log` and `cos`
are therefore polynomials here rather than torch.log / torch.cos, whose vectorised and scalar
paths may differ in the last bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import torch

_MASK32 = 0xFFFFFFFF
CHUNK_ELEMENTS = 1 << 16  # per-chunk temporaries: a few int64/float64 vectors, cache-sized


def name_key(seed: int, name: str) -> tuple[int, int, int, int]:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


def _mix32(x):
    """Wellons' hash-prospector 32-bit mix [16 21f0aaad 15 735a2d97 15] on an int64 tensor
    (or int) holding values < 2^32; both multipliers are < 2^31, so no product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def _log(u: torch.Tensor) -> torch.Tensor:
    """Natural log of float64 u > 0: frexp, then 2 atanh((m-1)/(m+1)) as a series."""
    mantissa, exponent = torch.frexp(u)  # u = m * 2^e, m in [0.5, 1)
    small = mantissa < math.sqrt(0.5)
    mantissa = torch.where(small, mantissa * 2.0, mantissa)  # now in [sqrt(.5), sqrt(2))
    exponent = exponent.to(torch.float64) - small.to(torch.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)  # |s| <= 0.172, s^2 <= 0.0295
    s2 = s * s
    series = torch.full_like(s, 1.0 / 17.0)
    for k in range(7, -1, -1):  # 1 + s2/3 + s2^2/5 + ... (relative error < 1e-14)
        series = series * s2 + 1.0 / (2 * k + 1)
    return exponent * math.log(2.0) + 2.0 * s * series


def _cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u) for float64 u in [0, 1), reduced to an angle in [0, pi/2]; Taylor series."""
    x = torch.where(u > 0.5, 1.0 - u, u)  # cos is even and 1-periodic: x in [0, 0.5]
    far = x > 0.25
    x = torch.where(far, 0.5 - x, x)  # cos(2 pi x) = -cos(2 pi (0.5 - x)); x in [0, .25]
    a2 = (2.0 * math.pi * x) ** 2
    series = torch.full_like(a2, 1.0 / math.factorial(22))
    for k in range(10, -1, -1):  # sum (-1)^k a^2k / (2k)!  (error < 1e-15)
        series = series * (-a2) + 1.0 / math.factorial(2 * k)
    return torch.where(far, -series, series)


def normal_at(indices: torch.Tensor, key: Sequence[int], std: float) -> torch.Tensor:
    """Normal(0, std) float64 samples for int64 global element `indices` under `key`."""
    if indices.numel() and int(indices.max()) < 2**32:  # the high words are all 0
        high = _mix32(key[1])
    else:
        high = _mix32((indices >> 32) ^ key[1])
    h = _mix32((indices & _MASK32) ^ key[0] ^ high)
    u1 = (_mix32(h ^ key[2]).to(torch.float64) + 0.5) / 2.0**32  # (0, 1): log is finite
    u2 = _mix32(h ^ key[3]).to(torch.float64) / 2.0**32
    return (std * torch.sqrt(-2.0 * _log(u1))) * _cos_2pi(u2)


def fill_normal_box(
    local: torch.Tensor,
    global_shape: Sequence[int],
    offsets: Sequence[int],
    key: Sequence[int],
    std: float,
) -> None:
    """Fill `local`, the box at `offsets` of a tensor of `global_shape`, chunk by chunk."""
    assert local.is_contiguous(), "a non-contiguous local shard"
    device, flat = local.device, local.view(-1)
    local_shape, numel = list(local.shape), local.numel()
    global_strides = [math.prod(global_shape[d + 1 :]) for d in range(len(global_shape))]
    for start in range(0, numel, CHUNK_ELEMENTS):
        positions = torch.arange(start, min(start + CHUNK_ELEMENTS, numel), device=device)
        indices = torch.zeros_like(positions)
        rest = positions
        for dim in range(len(local_shape) - 1, -1, -1):  # unravel, shift by the box offset
            coordinate = rest % local_shape[dim]
            rest = rest // local_shape[dim]
            indices += (coordinate + offsets[dim]) * global_strides[dim]
        flat[start : start + positions.numel()] = normal_at(indices, key, std).to(local.dtype)


def fill_normal_flat(
    flat: torch.Tensor, start: int, numel: int, key: Sequence[int], std: float
) -> None:
    """Fill the 1-D `flat` with global elements start, start+1, ... (ZeRO-3 partitions);
    positions past `numel` (the partition's padding) become 0."""
    for begin in range(0, flat.numel(), CHUNK_ELEMENTS):
        end = min(begin + CHUNK_ELEMENTS, flat.numel())
        indices = torch.arange(start + begin, start + end, device=flat.device)
        values = normal_at(indices, key, std).to(flat.dtype)
        flat[begin:end] = torch.where(indices < numel, values, torch.zeros_like(values))


def parameter_std(name: str, init_std: float, n_layers: int) -> float | None:
    """The Llama rule: norms are ones (None), residual-branch outputs are scaled down by depth
    (GPT-2 / torchtitan), everything else Normal(0, init_std)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2")):
        return init_std / math.sqrt(2 * n_layers)
    return init_std


def plain_name(name: str) -> str:
    """A parameter's name in the plain model (without checkpoint/compile wrapper segments)."""
    return ".".join(
        part for part in name.split(".") if part not in ("_checkpoint_wrapped_module", "_orig_mod")
    )


@torch.no_grad()
def init_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]], init_std: float, n_layers: int, seed: int
) -> None:
    """Initialise each parameter's local part: a plain tensor whole, a DTensor its own box."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for raw_name, param in named_parameters:
        name = plain_name(raw_name)
        std = parameter_std(name, init_std, n_layers)
        if isinstance(param, DTensor):
            local = param.to_local()
            _, offsets = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
        else:
            local, offsets = param, [0] * param.ndim
        if local.numel() == 0:
            continue
        if std is None:
            local.fill_(1.0)
        else:
            fill_normal_box(local, list(param.shape), list(offsets), name_key(seed, name), std)
