"""A tokenizer folder served by the `tokenizers` library alone, without importing transformers.

Importing transformers and building its tokenizer class cost a warm process 0.6-0.7 s before the engine is
ready (0.45 s of imports, 0.24 s of `from_pretrained`; the `tokenizers` file loads in 0.09 s). The engine's
decoding path needs only encoding, decoding, token strings and the special tokens, which transformers' fast
tokenizer class itself hands to the same `tokenizers` object (`TokenizersBackend`: `encode`, `decode`,
`id_to_token`); this class does the same, and only for a folder whose settings are all ones it understands
(`usable`), else the caller loads transformers' class as before.

Chat templates are transformers' own: the first render of a conversation goes through transformers'
`apply_chat_template` and is remembered in a file beside the folder, so that a warm process renders the
same prompts without it, to the byte. Anything else asked of this tokenizer (padding to tensors for the
grader's loss, saving, ...) goes to transformers' class, loaded on first need, with the same padding side
and pad token.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import re
from pathlib import Path

# the tokenizer_config.json keys this class understands; a folder with any other key (add_bos_token,
# split_special_tokens, a normalizer-like option, ...) is served by transformers
KNOWN_KEYS = {
    "backend", "tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length",
    "is_local", "local_files_only", "clean_up_tokenization_spaces", "chat_template",
}  # fmt: skip
SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")
CHAT_FILE = "chat_prompts.json"
MAX_CHATS = 4096  # conversations remembered per tokenizer (about 1.5 KB each for the shipped prompts)
MIRRORED = ("padding_side", "pad_token")  # settings kept the same on transformers' tokenizer once it is loaded
PIECES_KEPT = 4096  # pieces of text between added tokens whose ids are remembered (see LightTokenizer.encode)


def usable(folder: Path) -> bool:
    """Whether this class serves `folder` exactly as transformers' TokenizersBackend would."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend":
        return False
    if set(config) - KNOWN_KEYS or config.get("clean_up_tokenization_spaces"):
        return False
    if any(key in config and not isinstance(config[key], str | None) for key in SPECIALS):
        return False  # a special token written as an AddedToken dict: transformers' class handles those
    return (folder / "tokenizer.json").is_file() and isinstance(_chat_template(folder, config), str | None)


def _chat_template(folder: Path, config: dict):
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    return config.get("chat_template")


def _added_token_splitter(tokenizer) -> tuple[re.Pattern, dict[str, int]] | None:
    """What splits a text where `tokenizers` itself splits it before encoding: its added tokens, leftmost and
    longest first, as their ids. None where pieces would not encode apart to the same ids: a normalizer, which
    sees the whole text, or an added token that takes the spaces beside it (lstrip, rstrip) or matches only
    whole words (single_word)."""
    if tokenizer.normalizer is not None or getattr(tokenizer, "encode_special_tokens", False):
        return None  # (encode_special_tokens: special tokens in the text encoded as text, not split at)
    added = tokenizer.get_added_tokens_decoder()
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None
    ids = {token.content: index for index, token in added.items()}
    return re.compile("|".join(re.escape(c) for c in sorted(ids, key=len, reverse=True))), ids


class LightTokenizer:
    """The subset of a transformers fast tokenizer the engine uses, on `tokenizers` alone (see the module)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.__dict__.update(_folder=folder, _hf=None, _chats=None, _dirty=False)
        self.backend_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.__dict__.update(_splitter=_added_token_splitter(self.backend_tokenizer), _pieces={})
        self.name_or_path = str(folder)
        self.chat_template = _chat_template(folder, config)
        self.model_max_length = config.get("model_max_length")
        self.padding_side = "right"
        for key in SPECIALS:
            setattr(self, key, config.get(key))

    # ------------------------------------------------------------------ what transformers' class does the same

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.backend_tokenizer.token_to_id(self.unk_token)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            index = self.backend_tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if skip_special_tokens:
            return self._transformers().convert_ids_to_tokens(ids, skip_special_tokens=True)
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(index)) for index in ids]

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """The ids of `text`. Without special tokens added, piece by piece between the added tokens it holds, each
        piece's ids remembered: `tokenizers` splits at added tokens first and encodes the pieces apart, so the ids
        are the same, and a prompt's system text and worked examples are not encoded again for every question
        (0.5 ms of 1433 characters per prompt, 16.6 ms a stage of 32, AMX Xeon)."""
        if kwargs:
            return self._transformers().encode(text, add_special_tokens=add_special_tokens, **kwargs)
        if add_special_tokens or self._splitter is None:
            return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        pattern, added = self._splitter
        ids: list[int] = []
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                ids += self._piece(text[at : match.start()])
            ids.append(added[match.group()])
            at = match.end()
        if at < len(text) or not text:
            ids += self._piece(text[at:])
        return ids

    def _piece(self, piece: str) -> list[int]:
        pieces = self._pieces
        ids = pieces.get(piece)
        if ids is None:
            ids = self.backend_tokenizer.encode(piece, add_special_tokens=False).ids
            if len(pieces) >= PIECES_KEPT:
                del pieces[next(iter(pieces))]  # the oldest
            pieces[piece] = ids
        return ids

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        """{"input_ids": ids} of a text or list of texts; with any other option (padding, tensors) transformers'."""
        if kwargs or not isinstance(text, str | list):
            return self._transformers()(text, add_special_tokens=add_special_tokens, **kwargs)
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        if not add_special_tokens and self._splitter is not None:
            return {"input_ids": [self.encode(t, False) for t in text]}
        encodings = self.backend_tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if kwargs:
            return self._transformers().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.backend_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(ids, skip_special_tokens, **kwargs) for ids in sequences]

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True, **kwargs):
        """transformers' rendering of `conversation`, remembered per tokenizer folder (see the module)."""
        if tokenize or kwargs or self.chat_template is None:
            return self._transformers().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize, **kwargs
            )
        key = hashlib.sha1(json.dumps([conversation, add_generation_prompt], sort_keys=True).encode()).hexdigest()
        chats = self._remembered()
        text = chats.get(key)
        if text is None:
            text = self._transformers().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            chats[key] = text
            if not self._dirty:
                atexit.register(self._save_chats)
            self.__dict__["_dirty"] = True
        return text

    # ------------------------------------------------------------------ remembered renders

    def _chat_file(self) -> Path:
        digest = hashlib.sha1(
            json.dumps([self.chat_template, {key: getattr(self, key) for key in SPECIALS}]).encode()
        ).hexdigest()[:16]
        return self._folder.parent / "chat" / f"{digest}.json"

    def _remembered(self) -> dict[str, str]:
        if self._chats is None:
            try:
                chats = json.loads(self._chat_file().read_text())
            except (OSError, ValueError):
                chats = {}
            self.__dict__["_chats"] = chats if isinstance(chats, dict) else {}
        return self._chats

    def _save_chats(self) -> None:
        """Written when the process ends, merged with what another process wrote since; the newest kept."""
        from pipeline import cache

        file = self._chat_file()
        try:
            merged = json.loads(file.read_text())
        except (OSError, ValueError):
            merged = {}
        if not isinstance(merged, dict):
            merged = {}
        merged.update(self._chats or {})
        kept = dict(list(merged.items())[-MAX_CHATS:])
        cache.write_text(file, json.dumps(kept), quiet=True)
        self.__dict__["_dirty"] = False

    # ------------------------------------------------------------------ everything else: transformers' class

    def _transformers(self):
        if self._hf is None:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            hf = TokenizersBackend.from_pretrained(str(self._folder))
            for name in MIRRORED:
                setattr(hf, name, getattr(self, name))
            self.__dict__["_hf"] = hf
        return self._hf

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_hf", "_folder", "_chats", "_dirty", "_splitter", "_pieces"):
            raise AttributeError(name)
        return getattr(self._transformers(), name)

    def __setattr__(self, name: str, value) -> None:
        self.__dict__[name] = value
        if name in MIRRORED and self.__dict__.get("_hf") is not None:
            setattr(self._hf, name, value)

    def __repr__(self) -> str:
        return f"LightTokenizer({self.name_or_path!r}, vocab {len(self)})"
