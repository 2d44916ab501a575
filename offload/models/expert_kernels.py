"""Routed experts computed where they live: kernels that read each expert's weights through a table of addresses.

The copying way to run a routed layer (``MoEDecoder.routed_mlp``) has the host read
the routing, then copy the experts that are not on the device into cache slots and
launch their products: a wait for the GPU at every routed layer, and launches that
depend on what the routing chose. With *direct reads* (``LoadOptions.direct_experts``)
the routing never leaves the device. Every routed expert's block has an address
(``ExpertTable``: in HBM for a resident expert, in pinned host memory for the
others, which the GPU reads over its link as the product runs), and two kernels
compute a routed layer from the router's choices alone:

* ``_gate_up_kernel``: the routes sorted by expert, the program of an expert's first
  route (and of a block of ``BLOCK_N`` features) reads that expert's gate and up
  rows once for all the rows routed to it (one tile) and writes ``silu(gate) * up``;
* ``_down_kernel``: likewise the down projection, each output times its routing
  weight, written into the row of the ``[tokens, top_k]`` grid that the token's
  experts' order gives (each token's experts ascending, as the copying way places
  them), which ``MoEDecoder`` sums.

The launches are the same whatever the routing, so a decode step's layers are
captured in CUDA graphs as a dense model's are (no pieces). A weight crosses the link
once per pass and expert, not once per row: for decode steps and verify passes
(``DIRECT_TOKENS`` tokens or fewer, every chunk's rows in one call); a long prefill,
whose experts serve many rows each, copies them (a tile of all its rows would not fit).

The kernels read experts in the model's dtype, in int8 (one scale per output row, or
groups of a power of two from 16 columns with a scale each and perhaps a minimum: a GGUF
file's Q8_0, Q6_K and Q5_K) or in int4 (groups of a power of two from 16 columns),
making a compressed tile in registers as ``quant_kernels`` does; scales in the model's
dtype, float16 (a GGUF file's, for a 16-bit model) or float32. The roundings are those
of the copying way's operations (each product rounded to the model's dtype,
``silu(gate)`` rounded before its product with ``up``, the weighted output rounded), so
the two ways differ only by how the products sum; where an expert lives never changes
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import triton
from .quant import INT4 as INT4_FORMAT, QuantizedWeight

if triton is not None:
    import triton.language as tl

DIRECT_TOKENS = 64  # passes of at most this many tokens read their routed experts directly
BLOCK_N, BLOCK_K = 32, 128  # an expert's output features and input columns per step (its rows: all in one tile)
DENSE, INT8, INT4, INT8_GROUPS = 0, 1, 2, 3  # how an expert's projections are stored (``Projection.format``)
SCALE_TYPES = {torch.float16: 1, torch.float32: 2}  # ``Projection.scales``; 0: the activations' dtype


@dataclass(frozen=True)
class Projection:
    """Where one projection of every expert's block lies (bytes from the block's start) and how it is stored:
    ``DENSE`` (the model's dtype), ``INT8`` (one scale per output row), ``INT8_GROUPS`` (``group`` columns per
    scale, and per minimum where ``minimum``) or ``INT4`` (``group`` columns per scale and minimum, a group's two
    halves in a byte's two nibbles: ``offload.models.quant``); ``scales``: the scales' dtype (``SCALE_TYPES``;
    0: the activations')."""

    format: int
    data: int
    scale: int = 0
    minimum: int = 0
    group: int = 1
    scales: int = 0

    def args(self) -> tuple[int, int, int]:
        return self.data, self.scale, self.minimum

    def constants(self) -> dict:
        """The kernels' compile-time arguments for this projection (a layer's two may differ: a GGUF file's)."""
        return dict(FORMAT=self.format, GROUP=self.group, SCALES=self.scales,
                    MINIMUMS=self.minimum != 0)  # (a block starts with a projection's data, never a minimum)


def projection(weight, block: torch.Tensor, dtype: torch.dtype) -> Projection | str:
    """Where ``weight`` (a view into the expert block ``block``) lies and how it is stored, or why the kernels
    cannot read it."""
    at = lambda t: t.data_ptr() - block.data_ptr()  # noqa: E731
    if isinstance(weight, torch.Tensor):
        return Projection(DENSE, at(weight))
    if not isinstance(weight, QuantizedWeight):
        return "experts whose gate and up projections are stored in different formats"
    scales = 0 if weight.scale.dtype == dtype else SCALE_TYPES.get(weight.scale.dtype)
    if scales is None:
        return f"scales in {weight.scale.dtype} for {dtype} activations"
    scheme = weight.scheme
    if scheme.format == INT4_FORMAT:
        if scheme.group_size < 16 or scheme.group_size & (scheme.group_size - 1):
            return f"int4 groups of {scheme.group_size} columns (the kernels take powers of two from 16)"
        return Projection(INT4, at(weight.data), at(weight.scale), at(weight.minimum), scheme.group_size, scales)
    if scheme.group_size is not None:
        if scheme.group_size < 16 or scheme.group_size & (scheme.group_size - 1):
            return f"int8 groups of {scheme.group_size} columns (the kernels take powers of two from 16)"
        minimum = 0 if weight.minimum is None else at(weight.minimum)
        return Projection(INT8_GROUPS, at(weight.data), at(weight.scale), minimum, scheme.group_size, scales)
    return Projection(INT8, at(weight.data), at(weight.scale), scales=scales)


def device_address(base: torch.Tensor, device: torch.device) -> int:
    """The address at which kernels on ``device`` read ``base`` (for pinned host memory, where the GPU maps it:
    Triton resolves a tensor argument so); on a CPU (Triton's interpreter) its own."""
    out = torch.zeros(1, dtype=torch.int64, device=device)
    _address_kernel[(1,)](base, out)
    return int(out.item())


def peek(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """The ``nbytes`` bytes a kernel on ``device`` reads at ``address`` (to check an address before trusting it)."""
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _peek_kernel[(1,)](torch.tensor([address], dtype=torch.int64, device=device), out, nbytes,
                       BLOCK=triton.next_power_of_2(nbytes))
    return out


def grid_places(ids: torch.Tensor) -> torch.Tensor:
    """Each route's row of the grid for the routing ``ids [tokens, top_k]``: ``token * top_k`` plus the rank of
    its expert among the token's (ascending; a -1 first)."""
    tokens, k = ids.shape
    rank = (ids[:, None, :] < ids[:, :, None]).sum(-1)
    return (torch.arange(tokens, device=ids.device)[:, None] * k + rank).reshape(-1)


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, addresses: torch.Tensor,
                   gate_up: Projection, down: Projection, features: int, counts: torch.Tensor,
                   on_host: torch.Tensor, places: torch.Tensor | None = None,
                   grid: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[tokens * top_k, d]`` grid of a routed layer's weighted expert outputs for ``x [tokens, d]`` routed to
    ``ids [tokens, top_k]`` (-1: no expert) with ``weights``: row ``token * top_k + rank`` holds the token's
    expert of that rank among its experts (ascending), zero for a -1.

    ``addresses [experts]``: each expert block's address; ``gate_up`` (``[2 features, d]``) and ``down``
    (``[d, features]``): where in a block its projections lie; ``counts [2]`` gains the distinct experts read
    from the device and from elsewhere (``on_host [experts]``). A token routes to an expert once at most, so
    an expert's rows fit one tile of ``tokens`` rows: each expert's weights are read once.

    A layer's experts in waves (more than the device holds at once): each call's ``ids`` keep the wave's experts
    (the others -1), its ``places`` are those of the whole routing (``grid_places``) and its ``grid`` the first
    call's. An expert's routes are the same in every call, so the grid is the one call's, bit for bit."""
    tokens, k = ids.shape
    d, routes = x.shape[1], tokens * k
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # each route's expert's last route, + 1
    places = grid_places(ids) if places is None else places
    h = x.new_empty(routes, features)
    grid = x.new_zeros(routes, d) if grid is None else grid
    common = dict(BLOCK_M=max(16, triton.next_power_of_2(tokens)), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                  PRECISION="ieee" if x.dtype == torch.float32 else None, num_warps=4)
    _gate_up_kernel[(routes, triton.cdiv(features, BLOCK_N))](
        x, order, sorted_ids, ends, addresses, on_host, counts, h, d, features, k, *gate_up.args(),
        **gate_up.constants(), **common)
    _down_kernel[(routes, triton.cdiv(d, BLOCK_N))](
        h, order, sorted_ids, ends, addresses, weights.reshape(-1), places, grid, d, features, *down.args(),
        **down.constants(), **common)
    return grid


if triton is not None:
    from .quant_kernels import _to_float

    @triton.jit
    def _address_kernel(base_ptr, out_ptr):
        tl.store(out_ptr, base_ptr.to(tl.int64, bitcast=True))

    @triton.jit
    def _peek_kernel(address_ptr, out_ptr, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        source = tl.load(address_ptr).to(tl.pointer_type(tl.uint8), bitcast=True)
        tl.store(out_ptr + i, tl.load(source + i, mask=i < N, other=0), mask=i < N)

    @triton.jit
    def _expert(ids_ptr, addresses_ptr, r):
        """Route ``r``'s expert, and its block (a byte pointer) if ``r`` is its expert's first route (else -1)."""
        e = tl.load(ids_ptr + r)
        before = tl.load(ids_ptr + r - 1, mask=r > 0, other=-1)
        first = (e >= 0) & (e != before)
        address = tl.load(addresses_ptr + e, mask=first, other=-1)
        return e, first, address.to(tl.pointer_type(tl.uint8), bitcast=True)

    @triton.jit
    def _part(block, offset, dtype: tl.constexpr):
        """The part of an expert's block at byte ``offset``, as a pointer to ``dtype``: blocks and parts start at
        16-byte boundaries (``ExpertTable`` checks), which lets the loads be 16 bytes wide."""
        return tl.multiple_of((block + offset).to(tl.pointer_type(dtype), bitcast=True), 16)

    @triton.jit
    def _scales(block, offset, dtype: tl.constexpr, SCALES: tl.constexpr):
        """The scales (or minimums) at byte ``offset``: in the activations' ``dtype``, float16 or float32."""
        if SCALES == 1:
            return _part(block, offset, tl.float16)
        elif SCALES == 2:
            return _part(block, offset, tl.float32)
        else:
            return _part(block, offset, dtype)

    @triton.jit
    def _two_groups(values, first, groups, n_ok):
        """The scales (or minimums) ``values`` (pointers ``[BLOCK_N]``) of groups ``first`` and ``first + 1`` (of
        ``groups``) of int4 in groups of 16, one for each of a column step's 16 bytes ``[16, BLOCK_N]``: a load a
        group, as one group's (a load of both as ``[2, BLOCK_N]`` was repeated for each copy of the layout). Where
        a last step holds one group, the second is the row's last again (a finite scale: x is masked to 0 there,
        so its weights add nothing); the group after it would be the next row's, or past the last row."""
        one = tl.load(values + first, mask=n_ok, other=0.0).to(tl.float32)
        two = tl.load(values + tl.minimum(first + 1, groups - 1), mask=n_ok, other=0.0).to(tl.float32)
        return tl.where(tl.arange(0, 16)[:, None] < 8, one[None, :], two[None, :])

    @triton.jit
    def _product(x_rows, m_ok, block, DATA, SCALE, MINIMUM, n, n_ok, K, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                 SCALES: tl.constexpr, MINIMUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``x @ W[n].T`` in float32 ``[BLOCK_M, BLOCK_N]`` for the rows ``x_rows`` (pointers ``[BLOCK_M, 1]``) and
        the rows ``n`` of the ``[*, K]`` projection stored at ``block + DATA`` (scales, minimums after). A
        compressed weight tile is made in registers as ``quant_kernels`` makes it: each weight rounded once to
        the activations' dtype (int8's scale per row applies to the sums)."""
        dtype = x_rows.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if FORMAT == 2:  # int4: a column step is one group (two of 16), its halves in the low and high nibbles
            STEP: tl.constexpr = GROUP if GROUP >= 32 else 32  # a product's 16-bit inputs take 16 columns at least
            data = _part(block, DATA, tl.uint8)
            scales = _scales(block, SCALE, dtype, SCALES) + n * (K // GROUP)
            minimums = _scales(block, MINIMUM, dtype, SCALES) + n * (K // GROUP)
            j = tl.arange(0, STEP // 2)
            if GROUP >= 32:  # each byte's low nibble's column in the step (a plain range: x's loads stay wide)
                low = j
            else:
                low = j // (GROUP // 2) * GROUP + j % (GROUP // 2)
            for k0 in range(0, K, STEP):
                if GROUP >= 32:  # one scale and minimum a row
                    inside, x_ok = n_ok[None, :], m_ok[:, None]
                    scale = tl.load(scales + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    minimum = tl.load(minimums + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                else:  # two a row, each byte given its group's (a last step may hold one group of 16)
                    inside, x_ok = (k0 + low < K)[:, None] & n_ok[None, :], m_ok[:, None] & (k0 + low < K)[None, :]
                    scale = _two_groups(scales, k0 // GROUP, K // GROUP, n_ok)
                    minimum = _two_groups(minimums, k0 // GROUP, K // GROUP, n_ok)
                b = tl.load(data + n[None, :] * (K // 2) + (k0 // 2 + j)[:, None], mask=inside, other=0,
                            eviction_policy="evict_first").to(tl.int32)
                lo = (_to_float(b & 15) * scale + minimum).to(dtype)
                hi = (_to_float(b >> 4) * scale + minimum).to(dtype)
                xl = tl.load(x_rows + (k0 + low)[None, :], mask=x_ok, other=0.0)
                xh = tl.load(x_rows + (k0 + low + GROUP // 2)[None, :], mask=x_ok, other=0.0)
                acc = tl.dot(xl, lo, acc, input_precision=PRECISION)
                acc = tl.dot(xh, hi, acc, input_precision=PRECISION)
        elif FORMAT == 3:  # int8 in groups of columns: each weight scaled (and its minimum added), then rounded
            G: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups a step (powers of two)
            w = _part(block, DATA, tl.uint8)
            scales = _scales(block, SCALE, dtype, SCALES) + n[None, :] * (K // GROUP)
            minimums = _scales(block, MINIMUM, dtype, SCALES) + n[None, :] * (K // GROUP)
            g = tl.arange(0, G)[:, None]
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w + n[None, :] * K + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0,
                             eviction_policy="evict_first")
                q = ((wt.to(tl.int32) ^ 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                # a row's scale (and minimum) loaded once a group, not once a weight: the step as [G, columns, n]
                q = tl.reshape(q, [G, BLOCK_K // G, BLOCK_N])
                ok = (k0 + g * GROUP < K) & n_ok[None, :]
                q *= tl.load(scales + k0 // GROUP + g, mask=ok, other=0.0).to(tl.float32)[:, None, :]
                if MINIMUMS:
                    q += tl.load(minimums + k0 // GROUP + g, mask=ok, other=0.0).to(tl.float32)[:, None, :]
                acc = tl.dot(xt, tl.reshape(q, [BLOCK_K, BLOCK_N]).to(dtype), acc, input_precision=PRECISION)
        else:
            if FORMAT == 1:  # int8 read as bytes (loaded as int8, the tile was not pipelined: sm_90, Triton 3.9)
                w = _part(block, DATA, tl.uint8)
            else:
                w = _part(block, DATA, dtype)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w + n[None, :] * K + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0,
                             eviction_policy="evict_first")
                if FORMAT == 1:  # the byte b holds q + 256 [q < 0]: q + 128 is b ^ 128 (exact in the 16-bit types)
                    wt = (((wt.to(tl.int32) ^ 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0).to(dtype)
                acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
            if FORMAT == 1:
                scales = _scales(block, SCALE, dtype, SCALES)
                acc *= tl.load(scales + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _gate_up_kernel(x_ptr, order_ptr, ids_ptr, ends_ptr, addresses_ptr, on_host_ptr, counts_ptr, h_ptr,
                        D, I, TOP_K, DATA, SCALE, MINIMUM, FORMAT: tl.constexpr, GROUP: tl.constexpr,
                        SCALES: tl.constexpr, MINIMUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``h[route] = silu(x[token] @ gate.T) * (x[token] @ up.T)`` for features ``[pid1 * BLOCK_N, +BLOCK_N)``
        of every route of the expert whose first route (in expert order) is ``pid0``."""
        r = tl.program_id(0)
        dtype = x_ptr.dtype.element_ty
        e, first, block = _expert(ids_ptr, addresses_ptr, r)
        if first:
            if tl.program_id(1) == 0:  # this step reads expert e: from the device, or from elsewhere
                tl.atomic_add(counts_ptr + tl.load(on_host_ptr + e).to(tl.int32), 1)
            m = r + tl.arange(0, BLOCK_M)  # the expert's routes: all of them (BLOCK_M >= tokens)
            m_ok = m < tl.load(ends_ptr + r)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < I
            token = tl.load(order_ptr + m, mask=m_ok, other=0) // TOP_K
            x_rows = x_ptr + token[:, None].to(tl.int64) * D
            gate = _product(x_rows, m_ok, block, DATA, SCALE, MINIMUM, n, n_ok, D, FORMAT, GROUP, SCALES, MINIMUMS,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # rows [0, I): gate's; [I, 2 I): up's
            up = _product(x_rows, m_ok, block, DATA, SCALE, MINIMUM, n + I, n_ok, D, FORMAT, GROUP, SCALES,
                          MINIMUMS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            gate = gate.to(dtype).to(tl.float32)  # each product rounded, as a linear's output is
            silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            h = (silu * up.to(dtype).to(tl.float32)).to(dtype)
            tl.store(h_ptr + m[:, None].to(tl.int64) * I + n[None, :], h, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(h_ptr, order_ptr, ids_ptr, ends_ptr, addresses_ptr, weights_ptr, places_ptr, grid_ptr, D, I,
                     DATA, SCALE, MINIMUM, FORMAT: tl.constexpr, GROUP: tl.constexpr, SCALES: tl.constexpr,
                     MINIMUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
        """``grid[place] = weight * (h[route] @ down.T)`` for outputs ``[pid1 * BLOCK_N, +BLOCK_N)`` of every
        route of the expert whose first route is ``pid0``."""
        r = tl.program_id(0)
        dtype = h_ptr.dtype.element_ty
        e, first, block = _expert(ids_ptr, addresses_ptr, r)
        if first:
            m = r + tl.arange(0, BLOCK_M)
            m_ok = m < tl.load(ends_ptr + r)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < D
            y = _product(h_ptr + m[:, None].to(tl.int64) * I, m_ok, block, DATA, SCALE, MINIMUM, n, n_ok, I,
                         FORMAT, GROUP, SCALES, MINIMUMS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            route = tl.load(order_ptr + m, mask=m_ok, other=0)
            weight = tl.load(weights_ptr + route, mask=m_ok, other=0.0).to(tl.float32)
            y = (y.to(dtype).to(tl.float32) * weight[:, None]).to(dtype)
            place = tl.load(places_ptr + route, mask=m_ok, other=0)
            tl.store(grid_ptr + place[:, None].to(tl.int64) * D + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])
