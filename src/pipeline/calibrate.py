"""`precision=auto` measures instead of guessing: a few seconds on this machine, cached.

Which decode format and product path are fastest depends on the CPU (AVX2-only machines run bf16 GEMM 5x
slower than fp32 and take a scalar path in torch's int8 kernel with fp32 activations; AVX512-BF16 machines do
the opposite), so they are measured, with random weights at the model's real shapes (timing does not depend
on values):

- the engine's real step (over a shared prefix, as the default stages' rows read one): one decode step through
  every layer (the fused layer call of our kernels, or the
  eager path in fp32) plus the lm_head, at 1, 8 and 32 rows, in each decode format (fp32, q8, q4), with int8
  activations for one row (`q8x8`, `q4x8`: x quantized per 32 values, llama.cpp's scheme), and the same step
  with every product in GEMM (`engine:gemm`, and `engine:gemm_bf16` where bf16 is native) or in the int8 tiles
  (`engine:tiles`, AVX512 builds), also at 128 rows, to find where our kernel stops paying and where the tiles
  do, and the tiles at one row, where they may beat our kernel (taken for a 10% gain);
- the transformers backend's linear layers: fp32 and bf16 (F.linear) and int8 (torch's `_weight_int8pack_mm`).

Repetitions are interleaved (each round times every candidate once, so a busy moment hits all of them), the
median is kept with the spread of its repetitions, and a calibration whose repetitions spread widely is
measured again, and if still noisy used for this process only, never cached. A calibration that passes is
measured once more in the opposite order (a third time where that leads to other choices), and each candidate
keeps its median over them: repetitions can agree and all be slow. The format is chosen by the
default stages' mix of one-row and 32-row steps. Results are cached per CPU, kind, thread count, torch
version, model shape and kernel source in the model cache folder. `precision=auto` never picks what measured
slower, and an explicit choice that measured slower than fp32 gets one warning naming the faster one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# rows of a step measured: 1 is single-stream decoding, 4 a short jump-forward, 32 a full batched step
ROWS = (1, 4, 8, 32)
# the default stages' decode steps: 32 questions of ~7 one-row steps, ~20 steps of the batched stage
MIX = {1: 224, 32: 20}
REPS = 3  # interleaved rounds: the median of three, and their spread
NOISY = 1.5  # a median spread of repetitions (max / min) above this means a busy machine: measure again
GEMM_GAIN = 1.1  # bf16 GEMM rounds activations and weights: taken only for a clear gain
MAX_ROUND_S = 20.0  # a calibration round slower than this is not repeated
# other processes busy on more than this share of the CPUs while the calibration measured: its choices are the
# busy machine's (one calibration made while a test suite ran beside it took the tiles to 8 rows instead of 32,
# sending the single stage's prefills of about 16 rows to bf16 GEMM, measured 1.21x slower), so it serves
# that run only
BUSY_SHARE = 0.25
MIN_LOAD_WINDOW_S = 1.0
# a choice counts as slower when it takes this much longer than the reference
SLOWER = 1.15
# int8 activations are not bit-exact, so auto takes them only for a clear gain (at least 15%): one-row steps
# are bound by reading the weights, where int8 and fp32 activations measured within a few percent of each other
# (30 layers' q4 products 2.32 ms either way, AVX512-BF16 EPYC), and a 5% rule let one calibration's noise pick
# int8, raising the single stage's KLD against fp32 from 8.5e-5 to 7.7e-4 for no speed
INT8_GAIN = 1.15
X8 = "x8"  # suffix of an engine format with int8 activations for one row
# the products of many rows are also timed at 128 rows (a prefill), where int8 tiles and GEMM may change places
TILE_ROWS = (4, 8, 32, 128)
TILE_AGREE = 2.0  # two tile limits this close (a factor) are one choice: the confirming measurement agrees
# the tiles are also timed for one row: where our q4 kernel is compute-bound at one row (it unpacks every weight
# to fp32; on an AMX Xeon at 27 GB/s, 30 layers' products took 3.5 ms with the weights in cache against the tiles'
# 2.0 ms) they may decode faster; their activations are int8 (two digits), so they take one row only for
# GEMM_GAIN (tiles_one_row)
ONE_ROW = 1
PREFIX_TOKENS = 320  # the shared prefix the steps timed read (engine_tasks)
# steps of up to this many rows are timed right after one on the same weights: a stage runs them one after another,
# so a cache large enough keeps the weights between them (the AMX Xeon's 480 MB L3 holds SmolLM2's 66 MB of q4
# layers). Timed after other candidates instead, they read from memory: our kernel's one-row step measured 7.7 ms
# and the tiles' 6.3 there, but 6.3 and 4.6 ms in the engine between the stage's own steps. Steps of more rows do
# enough arithmetic per weight that where the weights come from matters little, and are not run twice.
FOLLOWED_ROWS = 8


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    qkv_out: int  # q + k + v output features
    vocab: int
    layers: int

    @classmethod
    def of(cls, config) -> Shapes:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.hidden_size,
            config.intermediate_size,
            (heads + 2 * kv_heads) * head_dim,
            config.vocab_size,
            config.num_hidden_layers,
        )

    def matrices(self) -> list[tuple[int, int, int]]:
        """(out features, in features, how many per step): fused qkv, o, fused gate/up, down, lm_head."""
        h, i = self.hidden, self.intermediate
        return [(self.qkv_out, h, self.layers), (h, h, self.layers), (2 * i, h, self.layers), (h, i, self.layers),
                (self.vocab, h, 1)]  # fmt: skip


@dataclass
class Calibration:
    # step time in ms of each candidate, per number of rows: {"engine:q4": {"1": 9.1, "32": 80.2}, ...}
    step_ms: dict[str, dict[str, float]]
    machine: str
    seconds: float  # how long measuring took
    # max / min of each candidate's repetitions, per number of rows (1.0: they agreed)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    cached: bool = True  # false: the machine was too busy to trust it beyond this process
    # the share of the CPUs other processes kept busy while it measured (NaN: not known on this system)
    other_load: float = float("nan")

    def median_spread(self) -> float:
        values = sorted(v for times in self.spread.values() for v in times.values())
        return values[len(values) // 2] if values else 1.0

    def time(self, candidate: str, rows: int) -> float:
        return self.step_ms.get(candidate, {}).get(str(rows), float("inf"))

    def engine_format(self, int8_activations: bool = False, allowed: tuple[str, ...] | None = None) -> str:
        """The engine's decode format with the least time for the default stages' mix of steps (MIX), among
        `allowed` (those exact for the source weights; None: any); fp32 on ties.

        With `int8_activations` (precision.activations auto or int8) a one-row step counts at its better time,
        with or without int8 activations; a 32-row step at its better time, kernel or GEMM.
        """
        formats = [c.split(":", 1)[1] for c in self.step_ms if _is_format(c)]
        formats = [f for f in formats if allowed is None or f in allowed] or ["fp32"]

        def cost(f: str) -> float:
            one = self.time(f"engine:{f}", 1)
            if int8_activations:
                one = min(one, self.time(f"engine:{f}{X8}", 1) * INT8_GAIN)
                if f == "q4" and self.tile_rows(f):
                    one = min(one, self.time("engine:tiles", ONE_ROW) * GEMM_GAIN)
            many = self.time(f"engine:{f}", 32)
            if f != "fp32":
                many = min(many, self.many_ms(32, f))
            return MIX[1] * one + MIX[32] * many

        return min(formats, key=lambda f: (cost(f), f != "fp32"))

    def gemm_ms(self, rows: int) -> float:
        """A step of `rows` rows with every product in GEMM, in the GEMM dtype `gemm_dtype` picks."""
        return self.time("engine:gemm_bf16" if self.gemm_dtype() == "bf16" else "engine:gemm", rows)

    def many_ms(self, rows: int, fmt: str) -> float:
        """A step of `rows` rows with every product past our kernel, in what runs there: for q4 the int8 tiles up
        to `tile_rows`, GEMM above (and for other formats)."""
        if fmt == "q4" and rows <= self.tile_rows(fmt):
            return self.time("engine:tiles", rows)
        return self.gemm_ms(rows)

    def tile_rows(self, fmt: str) -> int:
        """The most rows the int8 tiles take past the kernel (q4 only; 0 where not measured, or where they lost
        at the fewest rows timed).

        The tiles read q4 weights as stored, with activations in two int8 digits (15 bits), closer to fp32 than
        bf16 GEMM, which rounds weights and activations to 8 bits: against bf16 they keep the rows where they
        measured up to GEMM_GAIN slower, and against fp32 GEMM (more exact than they are) only those where they
        measured GEMM_GAIN faster. Between the last row count timed inside that bound and the first outside it,
        the limit is where their time ratio crosses it, interpolated in log rows: a ratio near the bound moves
        the limit a little, not from one count timed to the next (calibrations here measured tiles/bf16 0.97 and
        1.10 at 128 rows, and cached limits of 128 and 32 rows, which changed the kernel of 33- to 128-row steps
        between two installs on one machine)."""
        if fmt != "q4" or "engine:tiles" not in self.step_ms:
            return 0
        bound = GEMM_GAIN if self.gemm_dtype() == "bf16" else 1.0 / GEMM_GAIN
        rows, ratio = 0, 0.0
        for r in TILE_ROWS:
            now = self.time("engine:tiles", r) / self.gemm_ms(r)
            if not now <= bound:  # NaN (not timed) counts as outside
                if rows and math.isfinite(now):
                    rows = int(rows * (r / rows) ** ((bound - ratio) / (now - ratio)))
                break
            rows, ratio = r, now
        return rows

    def gemm_dtype(self) -> str:
        """bf16 where its GEMM measured at least GEMM_GAIN faster for a 32-row step (native bf16 only), else fp32."""
        bf16, fp32 = self.time("engine:gemm_bf16", 32), self.time("engine:gemm", 32)
        return "bf16" if bf16 * GEMM_GAIN < fp32 else "fp32"

    def tiles_one_row(self, fmt: str) -> bool:
        """Whether the int8 tiles (q4, where they run at all) take one-row steps too: only where they measured
        GEMM_GAIN faster than our kernel's one-row step with the activations it would use (the layers alone where
        they were timed so: the lm_head runs our kernel either way). That is the rule they
        follow against fp32 GEMM: their activations (two int8 digits, 15 bits) are less exact than fp32, far more
        than one int8 digit (INT8_GAIN's rule)."""
        if fmt != "q4" or not self.tile_rows(fmt):
            return False
        kernel = self.time(f"engine:{fmt}", 1)
        if self.int8_activations(fmt):
            kernel = min(kernel, self.time(f"engine:{fmt}{X8}", 1))
        if "engine:layers_tiles" in self.step_ms and not self.int8_activations(fmt):
            # the layers alone, where timed: the head's time is the same for both
            return self.time("engine:layers_tiles", ONE_ROW) * GEMM_GAIN < self.time("engine:layers_q4", ONE_ROW)
        return self.time("engine:tiles", ONE_ROW) * GEMM_GAIN < kernel

    def one_row_ms(self, fmt: str) -> float:
        """A one-row step in what takes it: the tiles where `tiles_one_row`, else our kernel (with int8 activations
        where `int8_activations`)."""
        if self.tiles_one_row(fmt):
            return self.time("engine:tiles", ONE_ROW)
        if self.int8_activations(fmt):
            return self.time(f"engine:{fmt}{X8}", 1)
        return self.time(f"engine:{fmt}", 1)

    def kernel_rows(self, fmt: str, tiles: bool = True) -> int:
        """The most rows for which the format's kernel is no slower than what takes more rows: GEMM, or where
        `tiles` the int8 tiles up to their limit (q4); 0 where `tiles` and the tiles take one row too
        (`tiles_one_row`)."""
        if tiles and self.tiles_one_row(fmt):
            return 0
        if "engine:gemm" not in self.step_ms:  # an older calibration of bare linear layers: against fp32
            return max((r for r in ROWS if self.time(f"engine:{fmt}", r) <= self.time("engine:fp32", r)), default=0)

        def past(r: int) -> float:  # the tiles' own rule decides one row (above)
            return self.many_ms(r, fmt) if tiles and r != ONE_ROW else self.gemm_ms(r)

        return max((r for r in ROWS if self.time(f"engine:{fmt}", r) <= past(r)), default=0)

    def head_rows(self, fmt: str, gemm: str = "fp32") -> int:
        """The most rows for which the lm_head runs our kernel: 32 where its q8 product of 32 rows measured no
        slower than the GEMM that takes more rows (`gemm`: fp32, or bf16 where the layers' GEMM is bf16; the
        head is one large matrix, read rather than computed), else `kernel_rows`."""
        kernel, gemm_ms = self.time("engine:head_q8", max(ROWS)), self.time(f"engine:head_{gemm}", max(ROWS))
        if not math.isfinite(gemm_ms):  # a calibration from before bf16 heads were timed
            gemm_ms = self.time("engine:head_fp32", max(ROWS))
        if math.isfinite(kernel) and kernel <= gemm_ms:
            return max(ROWS)
        return max(1, self.kernel_rows(fmt))  # the head is q8, which has no tiles: one row on our kernel at least

    def jump_forward_pays(self, fmt: str) -> bool:
        """Whether one step of 8 rows (our kernel, or past it, the faster) measured cheaper than 8 one-row steps (then
        a forced run goes in at once)."""
        eight = min(self.time(f"engine:{fmt}", 8), self.many_ms(8, fmt))
        return eight < 8 * self.one_row_ms(fmt)

    def int8_activations(self, fmt: str) -> bool:
        """Whether int8 activations measured faster than fp32 ones for a decode step in `fmt` (by INT8_GAIN)."""
        return self.time(f"engine:{fmt}{X8}", 1) * INT8_GAIN < self.time(f"engine:{fmt}", 1)

    def choices(self) -> tuple:
        """Every decision a run takes from this calibration, for each measured format (a confirming measurement
        must arrive at the same ones)."""
        formats = sorted(c.split(":", 1)[1] for c in self.step_ms if _is_format(c))
        gemm = self.gemm_dtype() if "engine:gemm" in self.step_ms else "fp32"
        per_format = [
            (
                f,
                self.kernel_rows(f),
                self.tile_rows(f),
                self.head_rows(f, gemm),
                self.int8_activations(f),
                self.jump_forward_pays(f),
            )
            for f in formats
        ]
        engine = (self.engine_format(True), self.engine_format(False), gemm) if formats else ()
        other = self.transformers_dtype() if "transformers:fp32" in self.step_ms else ""
        return (*engine, *per_format, other)

    def agrees(self, other: Calibration) -> bool:
        """Whether `other` leads to the same choices, taking tile limits within a factor of TILE_AGREE of each other
        as the same (the limit is interpolated: two measurements give nearby limits, not equal ones)."""
        mine, theirs = self.choices(), other.choices()
        if len(mine) != len(theirs):
            return False
        for a, b in zip(mine, theirs):
            if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a[:2] + a[3:] == b[:2] + b[3:]:
                low, high = sorted((a[2], b[2]))
                if (low == high == 0) or (low > 0 and high <= low * TILE_AGREE):
                    continue
            if a != b:
                return False
        return True

    def transformers_dtype(self) -> str:
        """fp32 or bf16 for transformers: bf16 only where it measured faster both for one row and for a batch."""
        faster = all(self.time("transformers:bf16", r) < self.time("transformers:fp32", r) for r in (1, 32))
        return "bf16" if faster else "fp32"

    def slower_than_fp32(self, candidate: str) -> str:
        """A warning when `candidate` measured slower than fp32 on the same backend ('' when it is not)."""
        backend = candidate.split(":", 1)[0]
        reference = f"{backend}:fp32"
        if candidate not in self.step_ms or reference not in self.step_ms:
            return ""  # not measured here (no kernel of ours): the caller says what runs instead
        rows = [int(r) for r in self.step_ms[candidate] if r in self.step_ms[reference]]
        worst = max(rows, key=lambda r: self.time(candidate, r) / self.time(reference, r))
        ratio = self.time(candidate, worst) / self.time(reference, worst)
        if ratio <= SLOWER:
            return ""
        kind = "a decode step" if worst == 1 else f"a step of {worst} rows"
        return f"{candidate.split(':', 1)[1]} measured {ratio:.1f}x slower than fp32 for {kind} on this CPU"


def _is_format(candidate: str) -> bool:
    name = candidate.split(":", 1)
    return (
        name[0] == "engine" and not name[1].endswith(X8) and not name[1].startswith(("gemm", "head", "tiles", "layers"))
    )


def _interleaved(tasks: list[tuple[str, int, object]], reps: int, reverse: bool = False) -> tuple[dict, dict]:
    """Median ms and spread (max / min) of each (name, rows, function), timed in `reps` interleaved rounds (each
    round in the opposite order with `reverse`, so that what follows a heavy candidate follows another one); a step
    of up to FOLLOWED_ROWS rows is run once untimed right before it is timed."""
    if reverse:
        tasks = tasks[::-1]
    for _, _, function in tasks:  # first calls allocate and spin up threads
        function()
    times: dict[tuple[str, int], list[float]] = {(name, rows): [] for name, rows, _ in tasks}
    for _ in range(reps):
        for name, rows, function in tasks:
            if rows <= FOLLOWED_ROWS:
                function()  # the step timed follows one on the same weights, as a stage's steps do
            start = time.perf_counter()
            function()
            times[(name, rows)].append((time.perf_counter() - start) * 1e3)
    median: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    for (name, rows), values in times.items():
        values.sort()
        median.setdefault(name, {})[str(rows)] = round(values[len(values) // 2], 3)
        spread.setdefault(name, {})[str(rows)] = round(values[-1] / max(values[0], 1e-9), 3)
    return median, spread


def _random_state(config, fmt: str, shared: dict[str, torch.Tensor], generator: torch.Generator):
    """An engine state of random weights at `config`'s shapes in `fmt`; the fp32 GEMM weights come from `shared`
    (one set for every format: each layer its own, so the step reads as many bytes as a real one)."""
    from pipeline.engine import PACKED, head_format

    def packed(fmt: str, n: int, k: int) -> dict[str, torch.Tensor]:
        if fmt == "fp32":
            return {}
        scales = torch.full((n, k // 32), 1e-3)
        if fmt == "q4":
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
            return dict(zip(PACKED["q4"], (q, scales, -8 * scales)))
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        return dict(zip(PACKED["q8"], (q, scales)))

    state = {}
    for name, t in shared.items():
        matrix = name.removesuffix(".t")
        if name.endswith(".t"):
            k, n = t.shape
            state[name] = t
            own = head_format(fmt) if matrix == "lm_head" else fmt
            state.update({f"{matrix}.{key}": v for key, v in packed(own, n, k).items()})
        else:
            state[name] = t
    return state


def _shared_weights(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, i = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    shapes = {"qkv": (h, (heads + 2 * kv) * d), "o": (heads * d, h), "gate_up": (h, 2 * i), "down": (i, h)}
    weights = {}
    for layer in range(config.num_hidden_layers):
        for name, shape in shapes.items():
            weights[f"layers.{layer}.{name}.t"] = torch.empty(shape).uniform_(-0.02, 0.02, generator=generator)
        weights[f"layers.{layer}.attn_norm"] = torch.ones(h)
        weights[f"layers.{layer}.mlp_norm"] = torch.ones(h)
    weights["embedding"] = torch.empty(config.vocab_size, h).uniform_(-0.02, 0.02, generator=generator)
    weights["norm"] = torch.ones(h)
    weights["lm_head.t"] = weights["embedding"].t().contiguous()
    return weights


def engine_tasks(config, generator: torch.Generator) -> list[tuple[str, int, object]]:
    """The engine's real steps to time: each format's decode step (+ lm_head) at each row count, int8
    activations for one row, and the step with every product in GEMM (fp32, and bf16 where native)."""
    from pipeline import cpu, kernels
    from pipeline.engine import Engine

    shared = _shared_weights(config, generator)
    formats = ["fp32", *(("q8", "q4") if kernels.available() else ())]
    tasks: list[tuple[str, int, object]] = []
    # the steps read a shared prefix, as the default stages' do (their prompts share 337 tokens, read from one
    # copy by every row): attention over a slot's own 256 positions instead made 32-row steps 40-50 ms of
    # attention around 10-17 ms of products on the AMX Xeon, hiding which product was faster there
    prefix = min(PREFIX_TOKENS, config.max_position_embeddings // 2)
    position = prefix + 16  # a question's tokens past it

    def step(engine: Engine, rows: int, int8_x: bool, kernel_rows: int, tile_rows: int = 0, head: bool = True):
        tokens, positions = torch.arange(rows) + 100, torch.full((rows,), position)
        # more rows than the 32 slots: a prefill of rows - 32 ... in each slot, its layers only (a prefill's head
        # scores one row)
        slots, chunk = torch.arange(rows) % 32, position + torch.arange(rows) // 32

        def run():
            engine.set_kernel_rows(kernel_rows)
            if tile_rows:
                engine.set_tile_rows(tile_rows)
            if rows > 32:
                engine._fused_layers(tokens, slots, chunk)
                return
            if not head:  # the layers alone: what a constrained row's step runs
                engine._decode_hidden(tokens, positions)
                return
            engine.lm_head.max_kernel_rows = 64  # the head on our kernel throughout: its choice is timed apart
            engine.lm_head(engine._decode_hidden(tokens, positions), int8_x)

        return run

    def head(engine: Engine, rows: int, kernel_rows: int):
        hidden = torch.randn(rows, config.hidden_size, generator=generator)

        def run():
            engine.lm_head.max_kernel_rows = kernel_rows
            engine.lm_head(hidden)

        return run

    engines = []

    def ready(engine: Engine) -> Engine:
        """One KV cache for every engine measured (its contents do not change a step's time; five would be
        2.4 GB to allocate)."""
        if engines:
            first = engines[0]
            engine.k_cache, engine.v_cache, engine.slots, engine.capacity = (
                first.k_cache,
                first.v_cache,
                32,
                first.capacity,
            )
            engine.rotations, engine.rotations_real, engine.prefix_ok = (
                first.rotations,
                first.rotations_real,
                first.prefix_ok,
            )
            engine.prefix, engine.prefix_k, engine.prefix_v, engine.prefix_kt = (
                first.prefix,
                first.prefix_k,
                first.prefix_v,
                first.prefix_kt,
            )
            engine._untouched = False
        else:
            engine._ensure(32, position + 64)
            engine.set_prefix(list(range(100, 100 + prefix)))  # every slot holds it (the first engine's values)
            engine._touch()  # zeros: the steps timed attend over positions no prefill wrote
        engines.append(engine)
        return engine

    states = {fmt: _random_state(config, fmt, shared, generator) for fmt in formats}
    q4_at = formats.index("q4") if "q4" in formats else -1
    for fmt in formats:
        engine = ready(Engine(config=config, state=states[fmt], fmt=fmt))
        for rows in ROWS:
            tasks.append((f"engine:{fmt}", rows, step(engine, rows, False, 64)))
        if fmt != "fp32":
            tasks.append((f"engine:{fmt}{X8}", 1, step(engine, 1, True, 64)))
    if kernels.available():
        gemms = [("gemm", torch.float32)] + ([("gemm_bf16", torch.bfloat16)] if cpu.current().fast_bf16 else [])
        if kernels.gemm_i8_available():  # every product of more than one row in int8 tiles, two digits
            engine = ready(Engine(config=config, state=states["q4"], fmt="q4", tiles=True))
            for rows in (ONE_ROW, *TILE_ROWS):
                tasks.append(("engine:tiles", rows, step(engine, rows, False, 0, max(TILE_ROWS))))
            # the one-row choice between the tiles and our kernel, on the layers alone (the head runs our kernel
            # either way, and its 0.8 ms, with the attention, thinned a 1.38x difference of the layers to 1.07x)
            tasks.append(("engine:layers_tiles", ONE_ROW, step(engine, ONE_ROW, False, 0, max(TILE_ROWS), False)))
            tasks.append(("engine:layers_q4", ONE_ROW, step(engines[q4_at], ONE_ROW, False, 64, head=False)))
        for name, dtype in gemms:
            engine = ready(Engine(config=config, state=states["q8"], fmt="q8", gemm_dtype=dtype))
            for rows in TILE_ROWS:  # one row is our kernel's, always
                tasks.append((f"engine:{name}", rows, step(engine, rows, False, 0)))
            # the lm_head of a full batched step of free rows: its q8 weights in our kernel, or in this GEMM
            if dtype == torch.float32:
                tasks.append(("engine:head_q8", max(ROWS), head(engine, max(ROWS), 64)))
            tasks.append(
                (f"engine:head_{'fp32' if dtype == torch.float32 else 'bf16'}", max(ROWS), head(engine, max(ROWS), 0))
            )
    return tasks


def transformers_tasks(shapes: Shapes, generator: torch.Generator) -> list[tuple[str, int, object]]:
    """The linear layers of one transformers decode step (and of a batched one) in each of its dtypes."""
    weights = {(n, k): torch.randn(n, k, generator=generator) * 0.02 for n, k, _ in shapes.matrices()}
    tasks = []
    for fmt in ("fp32", "bf16", "int8"):
        linears = {key: _transformers_linear(w, fmt) for key, w in weights.items()}
        dtype = torch.bfloat16 if fmt == "int8" and _int8_activations_bf16() else torch.float32
        for rows in ROWS:
            inputs = [
                (linears[(n, k)], count, torch.randn(rows if count > 1 else 1, k, generator=generator).to(dtype))
                for n, k, count in shapes.matrices()
            ]

            def run(inputs=inputs):
                for linear, count, x in inputs:
                    for _ in range(count):
                        linear(x)

            tasks.append((f"transformers:{fmt}", rows, run))
    return tasks


def _transformers_linear(weight: torch.Tensor, fmt: str):
    if fmt == "int8" and not _int8_activations_bf16() and _kernels_available():  # what WeightOnlyInt8Linear does
        from pipeline import kernels

        packed = kernels.quantize_q8(weight)
        return lambda x: kernels.q8_linear(x, *packed)
    if fmt == "int8":
        return _aten_int8(weight)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    cast = weight.to(dtype)
    return lambda x: F.linear(x.to(dtype), cast)


def _kernels_available() -> bool:
    from pipeline import kernels

    return kernels.available()


def _aten_int8(weight: torch.Tensor):
    scales = weight.abs().amax(dim=1) / 127
    quantized = (weight / scales[:, None]).round().to(torch.int8)
    # the kernel wants its scales in the activations' dtype (bf16 activations: bf16 scales), as quantize.py keeps them
    by_dtype = {dtype: scales.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, quantized, by_dtype[x.dtype])


BACKENDS = ("engine", "transformers")  # each measures only its own candidates, cached on its own


def candidates(backend: str | None = None) -> list[str]:
    """The candidates measured for `backend` (None: both): the engine's q4/q8 and its GEMM steps only where our
    kernel runs, transformers' fp32, bf16 and int8."""
    from pipeline import cpu, kernels

    engine = [
        "fp32",
        *(("q8", "q4", f"q8{X8}", f"q4{X8}", "gemm", "head_q8", "head_fp32") if kernels.available() else ()),
    ]
    if kernels.available() and cpu.current().fast_bf16:
        engine += ["gemm_bf16", "head_bf16"]
    if kernels.available() and kernels.gemm_i8_available():
        engine += ["tiles", "layers_tiles", "layers_q4"]
    names = {
        "engine": [f"engine:{f}" for f in engine],
        "transformers": [f"transformers:{f}" for f in ("fp32", "bf16", "int8")],
    }
    return [name for b in ([backend] if backend else BACKENDS) for name in names[b]]


def measure(config, reps: int = REPS, backend: str | None = None, reverse: bool = False) -> tuple[dict, dict]:
    """(median ms, spread) of every candidate of `backend` (None: both) at every row count it is measured at."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        tasks = []
        if backend in (None, "engine"):
            tasks += engine_tasks(config, generator)
        if backend in (None, "transformers"):
            tasks += transformers_tasks(Shapes.of(config), generator)
        return _interleaved(tasks, reps, reverse)


def _combined(passes: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Each candidate's median over several measurements (the mean of two), with the widest spread any of them saw.

    Not the least of them: that took each candidate's luckiest pass, so a candidate that varies more wins more
    often (one calibration here whose first two passes had not taken int8 activations cached them after its
    third; q4x8/q4 measured 0.92-1.21 across calibrations on that machine). Two passes are combined only where
    they agree, and their mean keeps what both chose wherever a choice compares sums of times (most do; those
    with a `min` inside can still differ); of three, the median drops the pass that was slow for one candidate."""
    values: dict[str, dict[str, list[float]]] = {}
    spread: dict[str, dict[str, float]] = {}
    for medians, spreads in passes:
        for name, times in medians.items():
            for rows, value in times.items():
                values.setdefault(name, {}).setdefault(rows, []).append(value)
                wide = spreads.get(name, {}).get(rows, 1.0)
                spread.setdefault(name, {})[rows] = max(wide, spread.get(name, {}).get(rows, 1.0))
    step_ms = {name: {rows: statistics.median(v) for rows, v in times.items()} for name, times in values.items()}
    return step_ms, spread


def _int8_activations_bf16() -> bool:
    from pipeline.models import resolve_dtype

    return resolve_dtype("int8", torch.device("cpu")) == torch.bfloat16


def machine_key(shapes: Shapes, names: list[str]) -> str:
    """What the measurement depends on: CPU model and flags, threads, torch version, shapes, candidates, the
    source of our kernels, the CPU kind in force and the kernel build it loads, and this module (how it is
    measured: a calibration an older version measured is not kept by a newer one)."""
    from pipeline import cpu, kernels
    from pipeline.environment import cpuinfo_field

    text = json.dumps(
        [cpuinfo_field("model name"), cpuinfo_field("flags"), platform.machine(), torch.get_num_threads(),
         torch.__version__, asdict(shapes), names, kernels.SOURCE_DIGEST, cpu.current().describe(), kernels.isa(),
         hashlib.sha1(Path(__file__).read_bytes()).hexdigest()],
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _confirmed(config, backend: str, first: Calibration, first_pass: tuple[dict, dict], log) -> Calibration:
    """The calibration from a second measurement in the opposite order beside the first, and a third where the
    two lead to different choices: each candidate at its median of all of them (`_combined`).

    Three interleaved repetitions that agree can still all be slow for one candidate (one calibration here timed
    q4's one-row step at 7.9 ms, three times, against 4-5 ms in every other; it cached int8 activations, which
    changed an answer). The noise rule cannot see that; a second measurement in another order can."""
    passes = [first_pass, measure(config, backend=backend, reverse=True)]
    second = Calibration(passes[1][0], first.machine, 0.0, passes[1][1])
    if not second.agrees(first):
        changed = [f"{a} -> {b}" for a, b in zip(first.choices(), second.choices()) if a != b]
        log(f"calibration: a second measurement led to other choices ({'; '.join(changed)}); measuring a third time")
        passes.append(measure(config, backend=backend))
    step_ms, spread = _combined(passes)
    return Calibration(step_ms, first.machine, 0.0, spread)


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its finished children), or
    None without /proc/stat.

    Busy is user + nice + system + irq + softirq of /proc/stat's first line: not idle, not I/O wait, and not
    steal (time the hypervisor gave to other machines, which no process here can free)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    if len(fields) < 7:
        return None
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    own = os.times()  # with the children it waited for (a kernel build's compiler is this process's work)
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None, wall_s: float) -> float:
    """The share of the CPUs that processes other than this one kept busy between two `cpu_seconds()`; NaN
    under a second (the counters tick in hundredths of a second per CPU)."""
    if before is None or after is None or wall_s < MIN_LOAD_WINDOW_S:
        return float("nan")
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1))


def calibrate(config, cache_dir: Path, log=print, backend: str = "engine") -> Calibration:
    """The cached calibration for this machine and model shape (a transformers config), measured now if there
    is none: again when its repetitions spread widely, and then, if still noisy, not cached."""
    from pipeline.environment import cpuinfo_field

    shapes = Shapes.of(config)
    names = candidates(backend)
    key = machine_key(shapes, names)
    file = cache_dir / "calibration" / f"{key}.json"
    if file.is_file():
        try:
            return Calibration(**json.loads(file.read_text()))
        except (TypeError, ValueError):
            pass  # an old or damaged file: measure again
    log("calibrating the engine's step and weight formats on this machine (once; cached in " + str(file.parent) + ")")
    start, cpu_before = time.perf_counter(), cpu_seconds()
    for _attempt in range(2):
        round_start = time.perf_counter()
        step_ms, spread = measure(config, backend=backend)
        result = Calibration(step_ms, cpuinfo_field("model name") or platform.machine(), 0.0, spread)
        if result.median_spread() <= NOISY or time.perf_counter() - round_start > MAX_ROUND_S:
            break  # a round this slow means a loaded machine that another round will not see idle
        log(f"calibration: repetitions spread {result.median_spread():.2f}x (a busy machine?); measuring again")
    if result.median_spread() <= NOISY:
        result = _confirmed(config, backend, result, (step_ms, spread), log)
    result.seconds = round(time.perf_counter() - start, 2)
    result.other_load = round(other_load(cpu_before, cpu_seconds(), time.perf_counter() - start), 3)
    if result.other_load > BUSY_SHARE:
        result.cached = False
        log(
            f"calibration: other processes kept {result.other_load:.0%} of the CPUs busy while it measured; used "
            "for this run only, measured again in the next (on a busy machine, its choices are the busy machine's)"
        )
        return result
    if result.median_spread() > NOISY:
        result.cached = False
        log(
            f"calibration: still {result.median_spread():.2f}x spread; used for this run only, measured again in the "
            "next (times in this run may say more about the machine than the code)"
        )
        return result
    from pipeline import cache

    cache.write_text(file, json.dumps(asdict(result), indent=1))  # a full disk: measured again next run
    return result
