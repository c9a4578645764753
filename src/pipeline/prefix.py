"""The token prefix every prompt shares (system prompt, few-shot examples): computed once, then reused.

Kept apart from `pipeline.generation` so that backends which do not run transformers' `generate` (the engine,
the peers) do not import it: that import alone takes a second.
"""

from __future__ import annotations

# below this many shared tokens, copying a cache costs more than recomputing it
MIN_PREFIX_TOKENS = 16


def shared_prefix_length(encoded: list[list[int]]) -> int:
    """How many leading tokens all token lists share, leaving every list at least one token of its own."""
    length = min(len(ids) for ids in encoded) - 1
    for position in range(max(length, 0)):
        if any(ids[position] != encoded[0][position] for ids in encoded):
            return position
    return max(length, 0)
