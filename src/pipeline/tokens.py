"""The text of every token of a vocabulary, once per tokenizer: what stop rules and constraints look up.

`batch_decode` over 49152 single-token lists takes a quarter to a second (a Python object per token);
the fast tokenizer's own decoder gives the same texts from the token strings in 70 ms (49152 calls). A tokenizer
read from a folder has them kept in the project's cache (`texts/<digest of its files>.json`), read back in 10 ms.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> list[str]:
    """tokenizer.decode([i]) for every id i, computed once per tokenizer object."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        file = _kept(tokenizer)
        texts = _read(file, len(tokenizer)) if file is not None else None
        if texts is None:
            texts = _decoded(tokenizer)
            if file is not None:
                from pipeline import cache

                if cache.write_text(file, json.dumps(texts), quiet=True):  # a full disk: decoded again next time
                    _prune(file.parent)
        _TEXTS[tokenizer] = texts
    return texts


def _decoded(tokenizer) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = list(range(len(tokenizer)))
    if backend is not None and backend.decoder is not None:
        decoder = backend.decoder
        return [decoder.decode([token]) for token in tokenizer.convert_ids_to_tokens(ids)]
    return tokenizer.batch_decode([[i] for i in ids])


# what the kept texts depend on besides the folder's files: how they are computed
_VERSION = hashlib.sha1(_decoded.__code__.co_code).hexdigest()[:8]


def _kept(tokenizer) -> Path | None:
    """Where the texts of a tokenizer read from a folder are kept: named by its tokenizer files' contents and size
    (a changed file is another name); None for a tokenizer with no folder of those files."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "-"))
    try:
        files = [(folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")]
    except OSError:
        return None
    digest = hashlib.sha1(b"\0".join([*files, str(len(tokenizer)).encode(), _VERSION.encode()])).hexdigest()[:16]
    from pipeline.config import default_cache_dir

    return default_cache_dir() / "texts" / f"{digest}.json"  # not in the folder: it may be a user's own


KEEP = 8  # tokenizers whose texts are kept (half a MB each for SmolLM2's), the newest


def _prune(folder: Path) -> None:
    try:
        kept = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # another process pruned at the same time: what is left is still valid


def _read(file: Path, size: int) -> list[str] | None:
    try:
        texts = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(texts, list) and len(texts) == size and all(isinstance(t, str) for t in texts)
    return texts if ok else None
