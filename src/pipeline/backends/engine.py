"""The engine backend: the project's own decode engine (`pipeline.engine`) over the transformers model's weights."""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable

import torch

from pipeline.backends import BackendInfo, ignored_settings
from pipeline.config import Config
from pipeline.engine import Constraint, Engine, EngineUnsupported, StopTokens
from pipeline.engine_weights import load_tensors, save_tensors
from pipeline.errors import PipelineError
from pipeline.prefix import MIN_PREFIX_TOKENS, shared_prefix_length
from pipeline.results import Generation

__all__ = ["EngineBackend", "EngineUnsupported", "weight_format_for"]


# precision.gemm's int8 products, on q4 weights in tiles: activations in two int8 digits (15 bits) or one (8)
TILE_KINDS = ("int8x2", "int8")
ALL_ROWS = 1 << 62  # the tiles' limit when asked for explicitly: every row past the kernel's

IGNORED = [
    ("attention.implementation", "sdpa", "the engine calls scaled_dot_product_attention itself"),
    ("generation.cache_implementation", "dynamic", "the engine's KV cache is always preallocated"),
    ("generation.use_cache", True, "the engine always keeps a KV cache"),
    ("runtime.compile", "off", "the engine's decode step is not compiled"),
]


def weight_format_for(precision: str) -> str:
    """The engine's decode weight format for a precision name (auto: measured, see `pipeline.calibrate`)."""
    return {"fp32": "fp32", "int8": "q8", "q8": "q8", "q4": "q4"}.get(precision, "")


def _save_copies(file, engine: Engine) -> None:
    copies = engine.bf16_copies()
    if copies:
        save_tensors(file, copies)


class EngineBackend:
    """The course API on the engine, continuously batched over `stages.micro_batch_size` slots."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        from pipeline import cpu, kernels
        from pipeline.calibrate import calibrate
        from pipeline.engine_weights import Source
        from pipeline.models import exact_engine_formats, model_cache_dir, resolve_device

        gen = cfg.generation
        if gen.do_sample or gen.num_beams != 1:
            raise PipelineError(
                "backend=engine decodes greedily; set generation.do_sample=false generation.num_beams=1, "
                "or use backend=transformers"
            )
        device = resolve_device(cfg.runtime.device)
        if device.type != "cpu":
            raise PipelineError(f"backend=engine runs on the CPU (device is {device.type}); use backend=transformers")
        self.cfg, self.warnings = gen, ignored_settings(cfg, IGNORED, "engine")
        requested = weight_format_for(cfg.precision.name)
        if not requested and cfg.precision.name in ("bf16", "fp16", "half"):
            self.warnings.append(
                f"backend=engine computes in fp32 on the CPU; precision={cfg.precision.name} is not applied"
            )
        start = time.perf_counter()
        self.source = Source(cfg.model, cfg.runtime.seed)
        self.tokenizer, config = self.source.tokenizer, self.source.config
        calibration = calibrate(config, model_cache_dir(cfg.model), log)
        kernel = kernels.describe()
        has_kernel = kernels.available()
        exact = exact_engine_formats(self.source.formats)
        fmt = requested or calibration.engine_format(cfg.precision.activations != "fp32", exact)
        source = "+".join(dict.fromkeys(self.source.formats.values())) or "unknown"
        if requested in ("q4", "q8") and requested not in exact:
            self.warnings.append(
                f"precision={cfg.precision.name}: the source weights are {source}, and {requested} rounds them "
                "further (lossy); its cost is this run's KL divergence against fp32 (kld_mean, top1_agreement)"
            )
        if requested in ("q4", "q8") and not has_kernel:
            self.warnings.append(
                f"precision={cfg.precision.name}: no kernel of ours here ({kernels.unavailable_reason()}), so the "
                f"{requested} weights are dequantized once at load and run as fp32: {requested}'s rounding without "
                "its speed; precision=fp32 is as fast"
            )
        elif requested in ("q4", "q8"):
            slower = calibration.slower_than_fp32(f"engine:{fmt}")
            if slower:
                self.warnings.append(f"precision={cfg.precision.name}: {slower}; precision=auto picks the faster")
        # the products past our kernel's row limit: int8 tiles (q4 on AVX512 builds) up to tile_rows, GEMM above
        choice = cfg.precision.gemm
        can_tile = fmt == "q4" and has_kernel and kernels.gemm_i8_available()
        tiles, tile_rows = "", 0
        if choice in TILE_KINDS and can_tile:
            tiles, tile_rows = choice, ALL_ROWS  # asked for: every product past the kernel
        elif choice in TILE_KINDS:
            why = "q4 weights" if fmt != "q4" else "an AVX512 build of our kernel"
            self.warnings.append(f"precision.gemm={choice} needs {why}; the calibrated GEMM runs instead")
        elif choice == "auto" and can_tile and calibration.tile_rows(fmt):
            tiles, tile_rows = "int8x2", calibration.tile_rows(fmt)
        activations = cfg.precision.activations
        kernel_runs = fmt != "fp32" and has_kernel  # our kernel (or its tiles) runs the products of q4/q8
        # where the calibration measured the tiles faster for one row too (precision.activations=auto: their
        # activations are int8), our kernel's limit is 0 and the tiles decode; an explicit format otherwise runs its
        # kernel even where fp32 GEMM measured faster for one row
        one_row_tiles = bool(tiles) and activations == "auto" and calibration.tiles_one_row(fmt)
        rows = 0 if one_row_tiles or not kernel_runs else max(1, calibration.kernel_rows(fmt, tiles=bool(tiles)))
        int8_x = rows > 0 and (activations == "int8" or (activations == "auto" and calibration.int8_activations(fmt)))
        if activations == "int8" and fmt == "fp32":
            self.warnings.append("precision.activations=int8 applies to q4/int8 weights; fp32 weights decode in fp32")
        elif activations == "int8" and not int8_x:
            self.warnings.append("precision.activations=int8 needs a kernel of ours; it is not applied here")
        gemm = choice if choice in ("fp32", "bf16") else calibration.gemm_dtype()
        if gemm == "bf16" and not kernel_runs:
            gemm = "fp32"  # fp32 weights stay exact, and without a kernel the eager path keeps fp32
        head_rows = max(rows, calibration.head_rows(fmt, gemm)) if kernel_runs else 0  # the lm_head's q8 on our kernel
        if cfg.precision.gemm == "bf16" and not cpu.current().fast_bf16:
            self.warnings.append(
                f"precision.gemm=bf16 on CPU kind {cpu.current().kind}: bf16 GEMM is emulated here and slow"
            )
        if tiles == "int8":
            self.warnings.append(
                "precision.gemm=int8: products of more rows than our kernel's limit (prefills, batched steps) round "
                "activations to one int8 per value (8 bits a block of 32; lossy): see this run's KLD against fp32"
            )
        if gemm == "bf16" and tile_rows < ALL_ROWS:
            # what the calibration measured, not what was asked: an explicit bf16 on a CPU where fp32 GEMM measured
            # faster must not read as a measured gain
            measured = "measured faster than fp32 here" if calibration.gemm_dtype() == "bf16" else (
                "as asked: fp32 GEMM measured faster here")  # fmt: skip
            self.warnings.append(
                "precision.gemm=bf16: products of more rows than our kernel's limit (prefills, batched steps) round "
                f"activations and weights to bf16 ({measured}; lossy), and on AMX CPUs attention over the shared "
                "prefix too: see this run's KLD against fp32"
            )
        described = "int8 activations for one row" if int8_x else "fp32 activations"
        if one_row_tiles:
            described = f"{tiles} activations from one row (the tiles measured faster than our kernel for one row here)"
        past = f"{gemm} GEMM above"
        if tiles:
            past = f"{tiles} tiles above" if tile_rows == ALL_ROWS else f"{tiles} tiles to {tile_rows} rows, {past}"
        products = f"fp32 GEMM ({kernel})"
        if rows:
            products = f"our kernel ({kernel}) up to {rows} rows (the lm_head {head_rows}), {past}"
        elif one_row_tiles:
            span = "for every row count" if tile_rows == ALL_ROWS else f"from one row to {tile_rows}, {gemm} GEMM above"
            products = f"{tiles} tiles of our kernel ({kernel}) {span}, the lm_head on our kernel to {head_rows} rows"
        activations_tag = tiles if one_row_tiles else "int8" if int8_x else "fp32"
        log(f"engine: {fmt} decode weights (source {source}), {described}, {products}")
        with torch.inference_mode():
            state, packed_how = self.source.state(fmt, log)
            # the bf16 GEMM's copies of the weights, rounded and transposed once and kept beside the packed state
            copies_file = self.source.bf16_file(fmt) if gemm == "bf16" and kernel_runs else None
            copies = load_tensors(copies_file) if copies_file is not None else None
            if copies:
                state = {**state, **copies}
            self.engine = Engine(
                config=config, state=state, fmt=fmt, slots=1, max_kernel_rows=rows, int8_activations=int8_x,
                gemm_dtype=torch.bfloat16 if gemm == "bf16" else torch.float32, tiles=bool(tiles),
            )  # fmt: skip
        if copies_file is not None and not copies:
            # written when the process ends, as the packed state is (0.3 s of SmolLM2's load, kept out of the stages)
            atexit.register(_save_copies, copies_file, self.engine)
        self.engine.set_kernel_rows(rows, head_rows)
        if tiles:
            self.engine.set_tile_rows(tile_rows, split=tiles == "int8x2")
        # where the products of many rows are bf16, so is attention over the shared prefix on AMX tiles (calls of
        # 24+ rows: the batched stage's prefill and steps): the 522-row prefill 223 -> 202 ms and the batched
        # steps' passes 139 -> 121 ms (AMX Xeon); precision.prefix_attention=fp32 (or gemm=fp32) keeps it fp32
        wanted = cfg.precision.prefix_attention
        can_amx = kernel_runs and self.engine.head_dim == 64 and kernels.amx_attention()
        amx_attention = can_amx and (wanted == "bf16" or (wanted == "auto" and gemm == "bf16"))
        if wanted == "bf16" and not can_amx:
            self.warnings.append(
                "precision.prefix_attention=bf16 needs our kernel on an AMX CPU (CPU kind amx) and heads of 64 "
                f"dimensions (kind {cpu.current().describe()}, kernel {kernel}); attention stays fp32"
            )
        self.engine.set_bf16_attention(amx_attention)
        if amx_attention:
            log("engine: attention over the shared prefix on AMX bf16 tiles for calls of 24+ rows (the batched stage)")
        # what the prefix's cached keys and values depend on besides the weights
        self._numerics = f"{fmt}-{gemm}-{rows}-{tiles}{tile_rows}-{kernels.isa()}"
        jump = gen.jump_forward if gen.jump_forward is not None else calibration.jump_forward_pays(fmt)
        self.engine.jump_forward = bool(jump)
        self.slots = cfg.stages.micro_batch_size
        eos = config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), self.tokenizer.eos_token_id}
        self.stopper = StopTokens(self.tokenizer, gen.stop_string, sorted(i for i in eos_ids if i is not None))
        self.use_prefix = gen.prefix_cache
        self.prefix_ids: list[int] = []
        self._info = BackendInfo(
            name="engine",
            dtype="fp32",
            weight_format=fmt,
            weight_bytes=self.engine.weight_bytes(),
            device="cpu",
            attention="sdpa (engine)",
            source=self.source.description,
            load_time_s=time.perf_counter() - start,
            tags={
                "engine_kernel_rows": str(rows),
                "engine_head_rows": str(head_rows),
                **self.engine.work_shape(),
                "kernel": kernel,
                "source_formats": source,
                "engine_weights": packed_how,
                "bf16_copies": "cached" if copies else "made" if copies_file is not None else "none",
                "activations": activations_tag,
                "gemm": gemm,
                "tiles": tiles or "none",
                "prefix_attention": "amx_bf16" if amx_attention else "fp32",
                "tile_rows": str(tile_rows),
                "jump_forward": str(bool(jump)).lower(),
                "calibration": ", ".join(
                    f"{name} {times.get('1', float('nan')):.1f}/{times.get('32', float('nan')):.0f} ms"
                    for name, times in calibration.step_ms.items()
                ),
                # whether the calibration was trusted beyond its run, and how busy other processes kept the CPUs
                "calibration_cached": str(calibration.cached).lower(),
                "calibration_other_load": f"{calibration.other_load:.2f}",
            },
        )

    def info(self) -> BackendInfo:
        """fp32 activations; the decode weight format and the bytes a step reads."""
        return self._info

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, as generation feeds them (no special tokens added)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Token length of each prompt."""
        return [len(self.encode(p)) for p in prompts]

    def set_shared_prefix(self, prompts: list[str]) -> float:
        """Compute once the KV cache of the token prefix all `prompts` share, in every slot of the engine."""
        self.prefix_ids = []
        if not self.use_prefix or not prompts:
            self.engine.set_prefix([])
            return 0.0
        encoded = [self.encode(p) for p in prompts]
        length = shared_prefix_length(encoded)
        if length < MIN_PREFIX_TOKENS:
            self.engine.set_prefix([])
            return 0.0
        start = time.perf_counter()
        prefix = encoded[0][:length]
        file = self.source.prefix_file(prefix, self._numerics) if self.source.parsed is not None else None
        cached = load_tensors(file) if file is not None else None
        with torch.inference_mode():
            self.engine._ensure(self.slots, length + 64)
            self.engine.set_prefix(prefix, cached)
        if file is not None and cached is None:
            save_tensors(file, self.engine.prefix_state())
        self.prefix_ids = prefix
        return time.perf_counter() - start

    def warm_up(self, prompts: list[str], full: bool = False) -> float:
        """What the stages' first calls would otherwise pay: the KV cache at its full size, a prefill and a one-row
        step (kernel, int8 activations), and a batched prefill and step just past the kernel's rows (GEMM)."""
        start = time.perf_counter()
        longest = max(len(self.encode(p)) for p in prompts)
        with torch.inference_mode():
            self.engine._ensure(self.slots, longest + self.cfg.max_new_tokens + 1)
        self.generate(max(prompts, key=len), max_new_tokens=None if full else 2)
        rows = self.slots if full else min(self.slots, self.engine.max_kernel_rows + 1)
        batch = sorted(prompts, key=len, reverse=True)[:rows]
        if full:
            self.batched_generate(batch, max_new_tokens=None)
        else:
            # a few tokens of each prompt past the shared prefix: the prefill still goes past every path's row
            # limit (kernel, tiles) to GEMM, and the step runs `rows` rows, without computing the batched stage's
            # whole prefill here (on AVX2 with fp32 GEMM that was 2.4 s of every warm start)
            keep = len(self.prefix_ids or [])
            limit = max(self.engine.max_kernel_rows, self.engine.tile_rows if self.engine.tile_rows < ALL_ROWS else 0)
            per_row = -(-(limit + 1) // len(batch))
            short = [ids[: keep + per_row] for ids in (self.encode(p) for p in batch)]
            with torch.inference_mode():
                self.engine.generate(short, 2, self.stopper, self.slots)
        return time.perf_counter() - start

    def batched_generate(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        constraints: list[Constraint | None] | None = None,
    ) -> list[Generation]:
        """All `prompts`, continuously batched over the slots; rows share one clock as in a batched call.

        `constraints[i]`, where given, limits prompt i's tokens at every step (the engine's `Constraint`).
        """
        start = time.perf_counter()
        first_token_at: list[float] = []
        budget = max_new_tokens or self.cfg.max_new_tokens
        with torch.inference_mode():
            sequences = self.engine.generate(
                [self.encode(p) for p in prompts],
                budget,
                self.stopper,
                self.slots,
                on_first_token=lambda: first_token_at.append(time.perf_counter()),
                constraints=constraints,
            )
        latency_s = time.perf_counter() - start
        first_token_s = first_token_at[0] - start if first_token_at else float("nan")
        return [
            Generation(
                self.tokenizer.decode(seq.generated, skip_special_tokens=True),
                len(seq.generated),
                latency_s,
                first_token_s,
                seq.hit_budget,
                token_ids=list(seq.generated),
            )
            for seq in sequences
        ]

    def generate(
        self, prompt: str, max_new_tokens: int | None = None, constraint: Constraint | None = None
    ) -> Generation:
        """Generate for one prompt."""
        return self.batched_generate([prompt], max_new_tokens, [constraint] if constraint is not None else None)[0]

    def next_token_logprobs(self, prompts: list[list[int]], continuations: list[list[int]], batched: bool):
        """The engine's own distributions along the sequences, run as the stage ran them: one at a time for the
        single stage, `micro_batch_size` rows continuously batched for the batched one (see Engine.teacher_forced)."""
        size = self.slots if batched else 1
        with torch.inference_mode():
            for begin in range(0, len(prompts), size):
                end = begin + size
                yield from self.engine.teacher_forced(prompts[begin:end], continuations[begin:end], size)

    @property
    def model(self):
        """The fp32 transformers model of the engine's source weights, loaded on first use."""
        return self.source.transformers_model().model

    def loss_model(self):
        """The transformers model the engine took its weights from, in fp32."""
        fmt = self._info.weight_format
        note = "" if fmt == "fp32" else f"; the engine decodes with {fmt} weights"
        return self.model, self.tokenizer, f"transformers fp32, same weights{note}"
