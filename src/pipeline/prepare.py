"""`python -m pipeline.prepare`: what a first run would do before its stages, done at install (`make venv`).

Builds our kernel for this CPU's kind, extracts the embedded model's tokenizer, packs the engine's weights,
calibrates, and computes the default prompt's shared prefix, all into the caches a run reads: the first run
after installing is then as ready as any later one. Safe to run again (it finds everything cached). It also
removes what the cache holds for GGUF files that are gone (a deleted clone's), and packed states older code
left behind.
"""

from __future__ import annotations

import sys
import time

CALIBRATION_ATTEMPTS = 3  # measurements of a calibration that a busy machine kept from being cached


def main(argv: list[str] | None = None) -> None:
    from pipeline.backends import load_backend
    from pipeline.config import load_config
    from pipeline.data import load_items, select
    from pipeline.engine_weights import prune_engine_folder
    from pipeline.models import model_cache_dir, prune_orphans
    from pipeline.prompts import build_prompt

    start = time.perf_counter()
    cfg = load_config(list(argv if argv is not None else sys.argv[1:]))
    # first, so a nearly full disk has room for what this writes
    cache_dir = model_cache_dir(cfg.model)
    removed = prune_orphans(cache_dir) + [
        file for folder in sorted(cache_dir.glob("*/engine")) for file in prune_engine_folder(folder)
    ]
    if removed:
        print(f"removed {len(removed)} stale cache entries from {cache_dir}")
    backend, _ = load_backend(cfg, log=print)
    _calibration_cached(backend, cache_dir)
    items, _ = select(load_items(cfg.dataset.path, cfg.dataset.name), cfg.dataset.num_questions)
    backend.set_shared_prefix([build_prompt(item.question, cfg.prompt, backend.tokenizer) for item in items])
    print(f"prepared {backend.info().name} ({backend.info().weight_format}) in {time.perf_counter() - start:.1f} s")


def _calibration_cached(backend, cache_dir, attempts: int = CALIBRATION_ATTEMPTS) -> bool:
    """Measures the engine's calibration again where a busy machine kept it from being cached, up to `attempts`
    times in all, so that the first run does not spend 20-40 s on it; says so where it still could not.

    A calibration is cached only when the machine was quiet enough to trust it (pipeline.calibrate): at install
    time a package build or another job beside it makes that fail, and every run would then measure again until
    one of them is quiet."""
    from pipeline.calibrate import calibrate

    if backend.info().tags.get("calibration_cached", "true") != "false":
        return True  # cached, or no calibration (another backend)
    for _attempt in range(attempts - 1):
        print("calibration: not cached (the machine was busy, or its times spread widely); measuring again")
        if calibrate(backend.source.config, cache_dir, log=print).cached:
            return True
    print(
        "calibration: still not cached (the machine stayed busy or its times noisy); the first run will measure it "
        "again: run `python -m pipeline.prepare` once the machine is idle"
    )
    return False


if __name__ == "__main__":
    main()
