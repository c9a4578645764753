"""The text of every token of a vocabulary, once per tokenizer: what stop rules and constraints look up.

`batch_decode` over 49152 single-token lists takes a quarter to a second (a Python object per token);
the fast tokenizer's own decoder gives the same texts from the token strings in a few milliseconds.
"""

from __future__ import annotations

import weakref

_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> list[str]:
    """tokenizer.decode([i]) for every id i, computed once per tokenizer object."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        ids = list(range(len(tokenizer)))
        if backend is not None and backend.decoder is not None:
            decoder = backend.decoder
            texts = [decoder.decode([token]) for token in tokenizer.convert_ids_to_tokens(ids)]
        else:
            texts = tokenizer.batch_decode([[i] for i in ids])
        _TEXTS[tokenizer] = texts
    return texts
