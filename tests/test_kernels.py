"""The q4/q8 kernels against their references (dequantize + torch matmul), and the quantizers' losslessness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline import cpu, kernels
from pipeline.errors import PipelineError

GROUP = kernels.GROUP_SIZE


def gguf_q4_1(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as llama.cpp's Q4_1 dequantizes them: d * q + m, d and m through fp16, q 0 and 15 in every block.

    Returns (w [n, k] fp32, q [n, k/32, 32] int64).
    """
    blocks = k // GROUP
    q = torch.randint(0, 16, (n, blocks, GROUP), generator=generator)
    # the quantizer maps each block's min to 0 and its max to 15, at random places
    pos = torch.rand(n, blocks, GROUP, generator=generator).argsort(dim=-1)[..., :2]
    q.scatter_(-1, pos[..., :1], 0)
    q.scatter_(-1, pos[..., 1:], 15)
    scale = torch.exp(torch.empty(n, blocks, 1).uniform_(-9, -1, generator=generator))
    d = scale.half().float()
    m = (-8 * scale * torch.empty(n, blocks, 1).uniform_(0.5, 1.5, generator=generator)).half().float()
    return (d * q + m).reshape(n, k), q


def gguf_q8_0(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as llama.cpp's Q8_0 dequantizes them: d * q, d through fp16, |q| = 127 somewhere in every block."""
    blocks = k // GROUP
    q = torch.randint(-127, 128, (n, blocks, GROUP), generator=generator)
    pos = torch.randint(0, GROUP, (n, blocks, 1), generator=generator)
    sign = torch.randint(0, 2, (n, blocks, 1), generator=generator) * 2 - 1
    q.scatter_(-1, pos, 127 * sign)
    d = torch.exp(torch.empty(n, blocks, 1).uniform_(-9, -1, generator=generator)).half().float()
    return (d * q).reshape(n, k), q


def unpack_q4(qweight: torch.Tensor) -> torch.Tensor:
    packed = qweight.reshape(qweight.shape[0], -1, GROUP // 2).long()
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def test_q4_requantizes_gguf_q4_1_blocks_losslessly():
    w, q = gguf_q4_1(64, 576, torch.Generator().manual_seed(0))
    w[3, :GROUP] = 0.25  # a flat block: d = 0, every q = 0
    q[3, 0] = 0
    qweight, scales, mins = kernels.quantize_q4(w)
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 288)
    assert scales.shape == mins.shape == (64, 18) and scales.dtype == mins.dtype == torch.float32
    assert torch.equal(unpack_q4(qweight), q)
    back = kernels.dequantize_q4(qweight, scales, mins)
    block_scale = w.reshape(64, -1, GROUP).abs().amax(-1, keepdim=True)
    err = (back - w).reshape(64, -1, GROUP).abs() / block_scale
    assert err.max() < 4 * torch.finfo(torch.float32).eps


def test_q8_requantizes_gguf_q8_0_blocks_losslessly():
    w, q = gguf_q8_0(64, 576, torch.Generator().manual_seed(1))
    qweight, scales = kernels.quantize_q8(w)
    assert qweight.dtype == torch.int8 and qweight.shape == (64, 576) and scales.shape == (64, 18)
    assert torch.equal(qweight.reshape(64, -1, GROUP).long(), q)
    back = kernels.dequantize_q8(qweight, scales)
    block_scale = w.reshape(64, -1, GROUP).abs().amax(-1, keepdim=True)
    assert ((back - w).reshape(64, -1, GROUP).abs() / block_scale).max() < 2 * torch.finfo(torch.float32).eps


def test_quantizer_names_a_k_that_is_not_a_multiple_of_32():
    with pytest.raises(PipelineError, match=r"\[4, 40\].*multiple of 32"):
        kernels.quantize_q4(torch.randn(4, 40))


@pytest.mark.slow
def test_requantizing_the_embedded_smollm2_gguf_is_exact():
    """A sample of the real tensors: the layers' Q4_1 and the embedding's Q8_0 round-trip bit for bit."""
    gguf = pytest.importorskip("gguf")
    from pipeline.models import embedded_gguf

    try:
        path = embedded_gguf()
    except PipelineError as error:
        pytest.skip(str(error))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight", "token_embd.weight"]:
        tensor = tensors[name]
        rows = tensor.data[:2048]  # [rows, bytes per row]: the first rows are plenty and keep it quick
        w = torch.from_numpy(gguf.quants.dequantize(rows, tensor.tensor_type).copy()).float()
        assert w.shape == (len(rows), int(tensor.shape[0]))
        if tensor.tensor_type.name == "Q4_1":
            back = kernels.dequantize_q4(*kernels.quantize_q4(w))
        else:
            assert tensor.tensor_type.name == "Q8_0"
            back = kernels.dequantize_q8(*kernels.quantize_q8(w))
        assert torch.equal(back, w), name


def _check(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert (y - ref).abs().max() < 1e-5 * ref.abs().max()


CASES = [(m, k, n) for m in (1, 3, 8, 32) for k in (576, 1536) for n in (192, 576, 1536)] + [
    (1, 576, 49152),
    (1, 1536, 49152),
]


def random_q4(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any bytes are valid q4 codes: cheaper than quantizing random floats, and every nibble value occurs."""
    qweight = torch.randint(0, 256, (n, k // 2), generator=generator, dtype=torch.uint8)
    scales = torch.rand(n, k // GROUP, generator=generator) * 0.01
    return qweight, scales, -8 * scales * torch.rand(n, k // GROUP, generator=generator)


def random_q8(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    return qweight, torch.rand(n, k // GROUP, generator=generator) * 0.01


@pytest.mark.parametrize("m,k,n", CASES)
def test_kernels_match_dequantize_then_matmul(built, m, k, n):
    generator = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=generator)
    q4 = random_q4(n, k, generator)
    _check(built.q4_linear(x, *q4), x @ kernels.dequantize_q4(*q4).t())
    q8 = random_q8(n, k, generator)
    _check(built.q8_linear(x, *q8), x @ kernels.dequantize_q8(*q8).t())


@pytest.mark.parametrize("shape", [(64,), (2, 5, 64), (0, 64)])
def test_leading_dimensions_and_odd_n(built, shape):
    """x [..., K] -> y [..., N]; N = 7 leaves a remainder after every tile of weight rows."""
    w = torch.randn(7, 64)
    x = torch.randn(shape)
    q4 = kernels.quantize_q4(w)
    y = kernels.q4_linear(x, *q4)
    assert y.shape == (*shape[:-1], 7)
    if x.numel():
        _check(y, x @ kernels.dequantize_q4(*q4).t())


def test_results_do_not_depend_on_the_thread_count(built):
    w, x = torch.randn(1536, 576), torch.randn(5, 576)
    q4 = kernels.quantize_q4(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.q4_linear(x, *q4)
        torch.set_num_threads(max(2, threads))
        many = kernels.q4_linear(x, *q4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each output is summed by one thread in one order


def test_bad_inputs_give_messages_that_name_the_problem(built):
    q4 = kernels.quantize_q4(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        built.q4_linear(torch.randn(2, 48), *q4)
    with pytest.raises(RuntimeError, match="float32"):
        built.q4_linear(torch.randn(2, 64, dtype=torch.float64), *q4)
    with pytest.raises(RuntimeError, match=r"expected \[N, K/2\]"):
        built.q4_linear(torch.randn(2, 128), *q4)


def test_fallback_is_dequantize_then_matmul(monkeypatch):
    """Without the extension (no compiler, no AVX2, or disabled) the same functions still compute y."""
    monkeypatch.setattr(kernels, "_states", {})
    monkeypatch.setenv("PIPELINE_DISABLE_KERNELS", "1")
    assert not kernels.available()
    assert "PIPELINE_DISABLE_KERNELS" in kernels.unavailable_reason()
    assert kernels.describe().startswith("none (") and kernels.isa() is None
    w, x = torch.randn(96, 128), torch.randn(3, 128)
    q4, q8 = kernels.quantize_q4(w), kernels.quantize_q8(w)
    _check(kernels.q4_linear(x, *q4), x @ kernels.dequantize_q4(*q4).t())
    _check(kernels.q8_linear(x, *q8), x @ kernels.dequantize_q8(*q8).t())


def test_the_cpu_kind_none_has_no_kernel_and_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "_states", {})
    monkeypatch.setenv(cpu.KIND_ENV, "none")
    assert not kernels.available()
    assert "CPU kind none" in kernels.unavailable_reason() and "AVX2" in kernels.unavailable_reason()


def test_a_failed_build_is_said_once_remembered_and_not_retried(monkeypatch, tmp_path):
    """A source that does not compile: the reason names it, and a later process reads the remembered failure
    instead of compiling again, until asked to rebuild."""
    from torch.utils import cpp_extension

    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this extension does not build\n")
    monkeypatch.setattr(kernels, "_states", {})
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    monkeypatch.setattr(kernels, "SOURCE_DIGEST", "broken")
    monkeypatch.setattr(kernels, "_extension_name", lambda isa: f"pipeline_qlinear_broken_{isa}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    monkeypatch.delenv("PIPELINE_DISABLE_KERNELS", raising=False)
    assert not kernels.available()
    assert kernels.unavailable_reason().startswith("building broken.cpp for avx2 failed")
    assert "this extension does not build" in kernels.unavailable_reason()
    q8 = kernels.quantize_q8(torch.randn(16, 64))
    x = torch.randn(2, 64)
    _check(kernels.q8_linear(x, *q8), x @ kernels.dequantize_q8(*q8).t())
    # a new process: the failure is read back, and the compiler is not run again
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kernels, "_states", {})
    assert not kernels.available()
    assert "remembered" in kernels.unavailable_reason() and kernels.REBUILD_ENV in kernels.unavailable_reason()
    assert calls == []
    monkeypatch.setattr(kernels, "_states", {})
    monkeypatch.setenv(kernels.REBUILD_ENV, "1")
    kernels.available()
    assert len(calls) == 1  # asked to: it builds again


@pytest.mark.parametrize("cause", ["No space left on device", "Disk quota exceeded", "Read-only file system"])
def test_a_build_the_disk_refused_is_not_remembered(monkeypatch, tmp_path, cause):
    """A full disk says nothing about the source: the next process builds again, and the reason names where."""
    from torch.utils import cpp_extension

    def refused(**kwargs):
        raise RuntimeError(f"g++ -c qlinear.cpp\nqlinear.cpp: fatal error: error writing to /tmp/cc1.s: {cause}")

    monkeypatch.setattr(kernels, "_states", {})
    monkeypatch.setattr(cpp_extension, "load", refused)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu.ISA_ENV, "avx2")
    monkeypatch.delenv("PIPELINE_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv(kernels.REBUILD_ENV, raising=False)
    assert not kernels.available()
    assert cause in kernels.unavailable_reason() and "TORCH_EXTENSIONS_DIR" in kernels.unavailable_reason()
    assert not kernels._failure_marker("avx2").exists()


def test_a_build_that_computes_wrong_is_not_used():
    """The check every fresh build passes before use: a q4_linear that returns zeros is caught."""
    lib = torch.library.Library("pipeline_selftest", "DEF")
    lib.define("q4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor mins, bool int8_x=False) -> Tensor")
    lib.define("q8_linear(Tensor x, Tensor qweight, Tensor scales, bool int8_x=False) -> Tensor")
    lib.impl("q4_linear", lambda x, w, s, m, int8_x=False: x.new_zeros(x.shape[0], w.shape[0]), "CPU")
    lib.impl("q8_linear", lambda x, w, s, int8_x=False: x @ kernels.dequantize_q8(w, s).t(), "CPU")
    problem = kernels._self_test("selftest")
    assert "q4_linear" in problem and "off by" in problem


def test_every_built_kernel_passes_its_check(built):
    assert kernels._self_test(kernels.isa()) == ""


def test_unpack_gives_the_reference_dequantization(built):
    generator = torch.Generator().manual_seed(7)
    q4, q8 = random_q4(96, 576, generator), random_q8(96, 576, generator)
    torch.testing.assert_close(built.q4_dequantize(*q4), kernels.dequantize_q4(*q4), rtol=1e-6, atol=1e-7)
    assert torch.equal(built.q8_dequantize(*q8), kernels.dequantize_q8(*q8))


def test_unpacking_named_rows_gives_those_rows_of_the_whole_in_their_order(built):
    """What a constrained step scores (Linear.rows): the rows asked for, repeated or out of order, the same bits
    as the whole matrix's; none asked, none given; a row outside the matrix is an error naming it."""
    generator = torch.Generator().manual_seed(8)
    q4, q8 = random_q4(96, 576, generator), random_q8(96, 576, generator)
    for op, weights, reference in (
        (built.q4_dequantize, q4, kernels.unpack_q4),
        (built.q8_dequantize, q8, kernels.unpack_q8),
    ):
        whole = op(*weights)
        for ids in ([5, 0, 95, 5], [17], list(range(95, -1, -1)), []):
            rows = torch.tensor(ids, dtype=torch.long)
            assert torch.equal(op(*weights, rows), whole[rows]), ids
            assert torch.equal(reference(*weights, rows=rows), whole[rows]), ids
        for bad in ([96], [-1]):
            with pytest.raises(RuntimeError, match=f"row {bad[0]} is outside the matrix's 96 rows"):
                op(*weights, torch.tensor(bad))


def test_each_build_gives_the_same_int8_dot_products(built):
    """VNNI's vpdpbusd and AVX2's maddubs + madd must sum the same integers (no saturation in either)."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1536, generator=generator) * 3
    w4, w8 = random_q4(300, 1536, generator), random_q8(300, 1536, generator)
    w8[0][:, :32] = 127  # the extreme products a block can hold
    for weights, op, dequantize in (
        (w4, built.q4_linear, kernels.dequantize_q4),
        (w8, built.q8_linear, kernels.dequantize_q8),
    ):
        rounded = quantize_x_int8(x) @ dequantize(*weights).t()
        scale = (x.abs() @ dequantize(*weights).abs().t()).max()
        assert ((op(x, *weights, int8_x=True) - rounded).abs().max() / scale) < 2e-6


def test_each_build_rounds_to_bf16_with_torch_s_bits(built):
    """The fused layer writes the bf16 GEMM's inputs itself (round_to_bf16): the bits must be torch's `x.to(bf16)`,
    which the layer's conversion replaced, on ties (to even, up and down), denormals (vcvtneps2bf16 would flush
    them), infinities, overflow to infinity, signed zeros, and a length that leaves a scalar tail."""
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 2**31, (4099,), generator=generator, dtype=torch.int64)
    bits[:8] = torch.tensor([0x3F808000, 0x3F818000, 0x00018000, 0x007FFFFF, 0x7F7FFFFF, 0x7F800000, 0, 0x3F800001])
    values = bits.to(torch.int32).view(torch.float32)
    values = torch.cat([values, -values, torch.randn(1000, generator=generator)])
    got = built.round_bf16(values).view(torch.int16)
    assert torch.equal(got, values.to(torch.bfloat16).view(torch.int16))
    assert got[0] == 0x3F80 and got[1] == 0x3F82 and got[2] == 0x0002  # ties to even, both ways; a denormal kept
    nan = built.round_bf16(torch.tensor([float("nan")] * 17)).float()
    assert nan.isnan().all()


def test_fake_implementations_let_torch_compile_trace_the_ops(built):
    q4 = kernels.quantize_q4(torch.randn(64, 64))
    q8 = kernels.quantize_q8(torch.randn(40, 64))

    def two_layers(x):
        return kernels.q8_linear(torch.relu(kernels.q4_linear(x, *q4)), *q8)

    x = torch.randn(2, 3, 64)
    compiled = torch.compile(two_layers, fullgraph=True, backend="aot_eager")
    _check(compiled(x), two_layers(x))
    torch.library.opcheck(built.q4_linear.default, (x, *q4), test_utils=("test_schema", "test_faketensor"))


def quantize_x_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-activation path sees it: per 32 values, round(x / d) * d with d = max|x| / 127."""
    blocks = x.reshape(*x.shape[:-1], -1, GROUP)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("k,n", [(64, 8), (96, 17), (576, 963), (1536, 576)])  # 96: an odd block count
def test_int8_activations_multiply_the_weights_with_x_rounded_to_int8(built, k, n):
    """One row with int8_x: exactly the product with x quantized per 32 (up to float summation order).

    The tolerance is far below the rounding of x itself, so a kernel that ignored the flag (computing
    with x unrounded) or that rounded x any other way fails.
    """
    generator = torch.Generator().manual_seed(k + n)
    x = torch.randn(1, k, generator=generator) * torch.rand(1, k, generator=generator) * 4
    xq = quantize_x_int8(x)
    for weights, op, dequantize in (
        (random_q4(n, k, generator), built.q4_linear, kernels.dequantize_q4),
        (random_q8(n, k, generator), built.q8_linear, kernels.dequantize_q8),
    ):
        w = dequantize(*weights)
        got = op(x, *weights, int8_x=True)
        exact, rounded = x @ w.t(), xq @ w.t()
        scale = (x.abs() @ w.abs().t()).max()
        assert ((got - rounded).abs().max() / scale) < 2e-6
        assert ((exact - rounded).abs().max() / scale) > 1e-4  # the rounding is visible at this tolerance
        # more than one row: the flag is for single-row decoding, the fp32 path runs
        two = op(torch.cat([x, x]), *weights, int8_x=True)
        torch.testing.assert_close(two[0], exact[0], rtol=1e-5, atol=1e-5 * float(scale))


def x_in_int8_digits(x: torch.Tensor, split: bool) -> torch.Tensor:
    """x as the int8 tiles see it: per 32 values d = max|x| / 127 and q = round(x / d), and with `split` a second
    digit r = round((x - d q) * 128 / d): d (q + r / 128)."""
    blocks = x.reshape(*x.shape[:-1], -1, GROUP).double()
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(d > 0, d, 1)
    q = torch.where(d > 0, torch.round(blocks / safe), 0)
    if not split:
        return (q * d).reshape(x.shape)
    r = torch.where(d > 0, torch.round((blocks - d * q) * 128 / safe).clamp(-127, 127), 0)
    return (d * (q + r / 128)).reshape(x.shape)


def tiles_reference(x: torch.Tensor, q4: tuple, split: bool) -> torch.Tensor:
    """sum over blocks of d (q . x rounded) + m sum(x): the mins meet x's exact sums, as the kernel does."""
    qweight, scales, mins = q4
    codes = unpack_q4(qweight).double()  # [n, blocks, 32]
    xr = x_in_int8_digits(x, split).reshape(x.shape[0], -1, GROUP)
    dots = torch.einsum("rbj,nbj->rnb", xr, codes)
    sums = x.double().reshape(x.shape[0], -1, GROUP).sum(-1)
    return (dots * scales.double()[None]).sum(-1) + sums @ mins.double().t()


TILE_CASES = [(1, 32, 16), (3, 96, 48), (8, 576, 960), (9, 576, 160), (17, 1536, 576), (40, 576, 3072)]


@pytest.mark.parametrize("m,k,n", TILE_CASES)  # rows off the 8-row tiles, odd block counts, every layer shape
def test_int8_tiles_multiply_q4_weights_with_x_in_one_or_two_int8_digits(built, m, k, n):
    """q4_gemm_i8 is the product with x rounded to one int8 digit per 32 values, or two (split), up to summation
    order; the two digits' error against fp32 is a small fraction of one digit's, so a kernel that dropped the
    second digit, or the mins, or mixed up the tiles' order fails. Outlier channels set some blocks' scales,
    as in the model's normed hidden states. On AVX2 the op refuses, naming the build it needs."""
    generator = torch.Generator().manual_seed(m + k + n)
    q4 = random_q4(n, k, generator)
    x = torch.randn(m, k, generator=generator)
    x[:, 5] *= 40
    x[:, k // 2 + 3] *= -25
    tiles = kernels.q4_tiles(*q4)
    assert tiles.shape == (n // 16, k // GROUP, 384) and tiles.dtype == torch.uint8
    if built.name == "pipeline_avx2":
        assert not kernels.gemm_i8_available()
        with pytest.raises(RuntimeError, match="need an AVX512 build"):
            built.q4_gemm_i8(x, tiles, True)
        return
    assert kernels.gemm_i8_available()
    w = kernels.dequantize_q4(*q4).double()
    exact = x.double() @ w.t()
    scale = float((x.abs().double() @ w.abs().t()).max())
    errors = {}
    for split in (False, True):
        got = built.q4_gemm_i8(x, tiles, split)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert float((got.double() - tiles_reference(x, q4, split)).abs().max()) / scale < 2e-6
        errors[split] = float((got.double() - exact).abs().max()) / scale
    assert errors[False] > 1e-4  # one digit's rounding shows at this tolerance
    assert errors[True] < errors[False] / 30


def test_int8_tiles_refuse_what_they_cannot_hold(built):
    q4 = random_q4(40, 64, torch.Generator().manual_seed(3))
    with pytest.raises(PipelineError, match="N a multiple of 16"):
        kernels.q4_tiles(*q4)
    if built.name == "pipeline_avx2":
        return
    tiles = kernels.q4_tiles(*random_q4(32, 64, torch.Generator().manual_seed(4)))
    with pytest.raises(RuntimeError, match=r"q4_tiles\) for K = 96"):
        built.q4_gemm_i8(torch.randn(2, 96), tiles, True)


def test_a_later_process_loads_the_build_without_cpp_extension_and_only_the_very_file_it_remembers(tmp_path):
    """Importing torch.utils.cpp_extension (setuptools with it) took 60-140 ms of every warm start, to find that
    the build was up to date. A process that loaded a build remembers its file; the next loads that file
    directly, and one whose file changed (a rebuild), or that is asked to rebuild, goes through cpp_extension."""
    import json
    import subprocess
    import sys

    if not kernels.available():
        pytest.skip(f"no kernel build on this machine: {kernels.unavailable_reason()}")
    probe = (
        "import sys, json\nfrom pipeline import kernels\nok = kernels.available()\n"
        "print(json.dumps([ok, kernels.describe(), 'torch.utils.cpp_extension' in sys.modules]))"
    )

    def run(**env):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path), **env})  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first[0] and first[2]  # nothing remembered in a new cache: cpp_extension checks the build
    (record,) = tmp_path.glob("kernels/*.built.json")
    assert run() == [True, first[1], False]  # loaded directly, the same build
    assert run(**{kernels.REBUILD_ENV: "1"})[2]  # asked to rebuild: cpp_extension decides
    library = Path(json.loads(record.read_text())["library"])
    stat = library.stat()
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # another file now (as a rebuild makes)
    try:
        assert run() == [True, first[1], True]  # not the file remembered: through cpp_extension, remembered anew
        assert run()[2] is False
    finally:
        os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    other = json.loads(record.read_text())
    record.write_text(json.dumps({**other, "key": {**other["key"], "source": "another source"}}))
    assert run()[2]  # a record of another source (or flags, torch, folder) is not this build's
