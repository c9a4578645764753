"""The transformers backend: a Hugging Face model in the configured precision and attention kernel, `generate`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.backends import BackendInfo
from pipeline.config import Config
from pipeline.generation import Generator
from pipeline.models import DTYPE_NAMES, load_model, resolve_device, resolve_dtype, weight_format
from pipeline.quantize import weight_bytes


class TransformersBackend(Generator):
    """`Generator` over a model loaded as the config says (precision, attention, compile)."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        device = resolve_device(cfg.runtime.device)
        dtype = resolve_dtype(cfg.precision.name, device)
        attention = cfg.attention.implementation
        log(f"loading model {cfg.model.name} ({DTYPE_NAMES[dtype]}, attention={attention}, {device})")
        int8 = cfg.precision.name == "int8"
        self.loaded = load_model(cfg.model, device, dtype, cfg.attention.implementation, cfg.runtime.seed, int8)
        super().__init__(self.loaded.model, self.loaded.tokenizer, cfg.generation, compile_mode=cfg.runtime.compile)
        self.warnings: list[str] = []
        if cfg.prompt.constrained and cfg.generation.num_beams != 1:
            self.warnings.append(
                "prompt.constrained is not applied with beam search (generation.num_beams > 1); the tool form "
                "is decoded freely and checked afterwards"
            )
        if cfg.precision.activations == "int8":
            self.warnings.append(
                f"backend=transformers ignores precision.activations={cfg.precision.activations} "
                "(it is the engine's single-row decoding option; backend=engine applies it)"
            )
        engine_only = (
            ("generation.jump_forward", cfg.generation.jump_forward, None),
            ("precision.gemm", cfg.precision.gemm, "auto"),
            ("precision.prefix_attention", cfg.precision.prefix_attention, "auto"),
        )
        for key, value, default in engine_only:
            if value not in (default, False):
                self.warnings.append(f"backend=transformers ignores {key}={value} (an option of backend=engine)")
        if device.type == "cpu" and dtype == torch.float16:
            self.warnings.append(
                "fp16 on this CPU is emulated and slow in batches; precision=bf16 or auto is faster here"
            )
        if device.type == "cpu" and dtype != torch.float16:
            dtype = self._apply_calibration(cfg, dtype, log)
        self._info = BackendInfo(
            name="transformers",
            dtype=DTYPE_NAMES[dtype],
            weight_format=weight_format(cfg.precision.name, dtype),
            weight_bytes=weight_bytes(self.loaded.model),
            device=str(device),
            attention=self.loaded.attention,
            source=self.loaded.source,
            load_time_s=self.loaded.load_time_s,
        )

    def _apply_calibration(self, cfg: Config, dtype: torch.dtype, log: Callable[[str], None]) -> torch.dtype:
        """precision=auto takes the dtype measured faster here; an explicit one measured slower than fp32 warns."""
        from pipeline.calibrate import calibrate
        from pipeline.models import DTYPES, model_cache_dir

        calibration = calibrate(self.model.config, model_cache_dir(cfg.model), log, backend="transformers")
        if cfg.precision.name == "auto":
            measured = DTYPES[calibration.transformers_dtype()]
            if measured != dtype:
                self.model.to(measured)
            if measured != torch.float32:
                self.warnings.append(
                    f"precision=auto: {DTYPE_NAMES[measured]} measured faster than fp32 here and rounds the weights "
                    "(lossy); its cost is this run's KL divergence against fp32 (kld_mean, top1_agreement)"
                )
            return measured
        if cfg.precision.name == "int8":
            self.warnings.append(
                "precision=int8: one int8 scale per output channel rounds the weights (lossy); its cost is this "
                "run's KL divergence against fp32 (kld_mean, top1_agreement)"
            )
        candidate = "int8" if cfg.precision.name == "int8" else DTYPE_NAMES[dtype]
        if candidate != "fp32":
            slower = calibration.slower_than_fp32(f"transformers:{candidate}")
            if slower:
                self.warnings.append(
                    f"precision={cfg.precision.name}: {slower}; precision=fp32, or backend=engine, is faster here"
                )
        return dtype

    def info(self) -> BackendInfo:
        """dtype, weight format and bytes, device, attention kernel, source, load time."""
        return self._info

    def loss_model(self):
        """The run's own model, in its own precision."""
        return self.model, self.tokenizer, f"the run's model ({self._info.weight_format})"
