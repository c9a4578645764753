"""Typed configuration of the pipeline: one dataclass per config group.

These are plain dataclasses. `run.py` registers them as Hydra structured
configs so that a typo or a wrong type fails at start; converting the composed
config to these objects (``OmegaConf.to_object``) runs ``__post_init__``, which
checks ranges and choices. From Python, ``load_config(["precision=bf16"])``
builds the same Config that ``python run.py precision=bf16`` runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def default_cache_dir() -> Path:
    """Where the project caches (models, calibrations, kernels): $PIPELINE_CACHE_DIR, else
    $XDG_CACHE_HOME/llm-pipeline. Here, not in pipeline.models, so run.py's checks need no torch."""
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "llm-pipeline"


MODEL_SOURCES = ("embedded", "hub", "local", "tiny")
ACTIVATIONS = ("auto", "fp32", "int8")
GEMM_DTYPES = ("auto", "fp32", "bf16", "int8x2", "int8")
PREFIX_ATTENTION = ("auto", "fp32", "bf16")
PRECISIONS = ("fp32", "bf16", "fp16", "half", "auto", "int8", "q4")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
BACKENDS = ("auto", "engine", "transformers", "llamacpp", "openvino", "ctranslate2")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
ATTENTIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
DEVICES = ("auto", "cpu", "cuda", "mps")
PROMPT_STYLES = ("raw", "instruct", "cot", "tool")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PipelineError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_positive(key: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise PipelineError(f"{key}={value} must be a positive number; set {key}=<n> with n > 0")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "embedded"
    # hub repo id (source=hub), or a directory / .gguf file (source=local)
    repo_id: str | None = None
    path: str | None = None
    # where the dequantized embedded model is cached; null: $PIPELINE_CACHE_DIR or ~/.cache/llm-pipeline
    cache_dir: str | None = None
    trust_remote_code: bool = False
    # the null model (model=random): this model's architecture and tokenizer with random weights, seeded by
    # runtime.seed; an accuracy next to its accuracy shows what the prompt and constraint decide without a model
    random_weights: bool = False
    # sizes of the random `tiny` model
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate_size: int = 128

    def __post_init__(self) -> None:
        _check_choice("model.source", self.source, MODEL_SOURCES)
        if self.source == "hub" and not self.repo_id:
            raise PipelineError("model.source=hub needs model.repo_id=<org/name>")
        if self.source == "local" and not self.path:
            raise PipelineError("model=local needs model.path=/path/to/model_dir_or_file.gguf")
        for key in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_intermediate_size"):
            _check_positive(f"model.{key}", getattr(self, key))


@dataclass
class PrecisionConfig:
    name: str = "auto"
    # backend=engine with q4/int8 weights: the activations one decoding row multiplies them with. fp32
    # (exact: the same numbers as fp32 transformers up to summation order), int8 (quantized per 32 values
    # at each matrix, as llama.cpp does: faster single-stream decoding, not bit-exact), or auto: int8
    # where the calibration measured it at least 15% faster on this machine
    activations: str = "auto"
    # backend=engine: the products over more rows than our kernel's limit (prefills, batched steps). fp32
    # (exact), bf16 (native on AVX512-BF16/AMX CPUs: faster, rounds activations and weights to bf16), int8x2
    # (q4 weights on AVX512 CPUs: the weights as stored, activations in two int8 digits per 32 values, 15 bits:
    # closer to fp32 than bf16), int8 (one digit, 8 bits, as llama.cpp: fastest, lossy), or auto: int8x2 up to
    # the most rows where the calibration measured it no slower than GEMM, and above that bf16 where measured
    # at least 10% faster than fp32; the cost of each is in the run's KLD
    gemm: str = "auto"
    # backend=engine: attention over the shared prefix for batched prefills and steps (24+ rows).
    # fp32 (register tiles), bf16 (AMX CPUs: tiles with fp32 sums; rounds queries, the prefix's keys and
    # values and the probabilities to bf16), or auto: bf16 on AMX CPUs where the products of many rows are bf16
    # (gemm above), else fp32; the cost is in the run's KLD
    prefix_attention: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("precision", self.name, PRECISIONS)
        _check_choice("precision.activations", self.activations, ACTIVATIONS)
        _check_choice("precision.gemm", self.gemm, GEMM_DTYPES)
        _check_choice("precision.prefix_attention", self.prefix_attention, PREFIX_ATTENTION)


@dataclass
class AttentionConfig:
    implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _check_choice("attention", self.implementation, ATTENTIONS)


# what generation uses where neither conf/generation nor the prompt asks for something else
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_STOP_STRING = "</answer>"


@dataclass
class GenerationConfig:
    # null: the prompt's request (prompt.max_new_tokens), else DEFAULT_MAX_NEW_TOKENS; a number here wins
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    use_cache: bool = True
    # stop a sequence as soon as it has produced this text (besides EOS); "" never stops early;
    # null: the prompt's request (prompt.stop_string), else DEFAULT_STOP_STRING
    stop_string: str | None = None
    # KV cache layout: dynamic (grows per step) or static (preallocated; runtime.compile implies it)
    cache_implementation: str = "dynamic"
    # compute the KV cache of the prefix all prompts share (system prompt, examples) once and reuse it
    prefix_cache: bool = True
    # backend=engine, constrained decoding: where the constraint allows a single next token, or a run of them,
    # they enter the KV cache in one multi-token step (SGLang's jump-forward). null: on where the calibration
    # measures a step of 8 rows cheaper than 8 steps of one
    jump_forward: bool | None = None

    def __post_init__(self) -> None:
        _check_positive("generation.max_new_tokens", self.max_new_tokens, allow_none=True)
        _check_positive("generation.num_beams", self.num_beams)
        _check_positive("generation.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise PipelineError(f"generation.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise PipelineError(f"generation.top_k={self.top_k} must be >= 0 (0 disables it)")
        _check_choice("generation.cache_implementation", self.cache_implementation, CACHE_IMPLEMENTATIONS)

    def resolved(self, prompt: PromptConfig | None = None) -> GenerationConfig:
        """These settings with the unset ones (null) filled: the prompt's request, else the built-in default.

        A value set here (in conf/generation, an experiment, or on the command line) always wins.
        """
        max_new_tokens, stop = self.max_new_tokens, self.stop_string
        if max_new_tokens is None:
            max_new_tokens = (prompt.max_new_tokens if prompt else None) or DEFAULT_MAX_NEW_TOKENS
        if stop is None:
            stop = prompt.stop_string if prompt and prompt.stop_string is not None else DEFAULT_STOP_STRING
        return dataclasses.replace(self, max_new_tokens=max_new_tokens, stop_string=stop)


@dataclass
class RuntimeConfig:
    device: str = "auto"
    # CPU threads for torch; null keeps torch's default (all cores)
    num_threads: int | None = None
    inference_mode: bool = True
    cudnn_benchmark: bool = True
    warmup: bool = True
    seed: int = 0
    # torch.compile of the decode step (off, default, reduce-overhead, max-autotune); implies a static cache
    compile: str = "off"

    def __post_init__(self) -> None:
        _check_choice("runtime.device", self.device, DEVICES)
        _check_choice("runtime.compile", self.compile, COMPILE_MODES)
        _check_positive("runtime.num_threads", self.num_threads, allow_none=True)


@dataclass
class DatasetConfig:
    # a JSON file of your own; null: the shipped set `name`
    path: str | None = None
    # a shipped set (src/pipeline/data/NAME.json): unit_conversion, unit_conversion_holdout
    name: str = "unit_conversion"
    num_questions: int = 32
    # relative tolerance of the original grader: |round(a,3)-round(c,3)| < tol * |round(c,3)|
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        _check_positive("dataset.num_questions", self.num_questions)
        if self.tolerance < 0:
            raise PipelineError(f"dataset.tolerance={self.tolerance} must be >= 0")


@dataclass
class PromptConfig:
    style: str = "instruct"
    system: str = ""
    instruction: str = ""
    # worked examples for few-shot prompting: a list of [question, answer text] pairs
    examples: list[Any] = field(default_factory=list)
    # text the assistant's reply starts with (e.g. "<answer>"): appended to the prompt and
    # put back in front of the output before scoring
    response_prefix: str = ""
    # what this prompt asks of generation where generation leaves it unset (null: no request)
    max_new_tokens: int | None = None
    stop_string: str | None = None
    # style=tool: decode only forms `NUMBER SOURCE -> TARGET`: one of the question's complete quantities, a
    # spelling of its own unit where the question writes one, then any unit of the lexicon (pipeline.constraint)
    constrained: bool = False
    # with constrained: true is the question-limited constraint instead, forms built only from the question's own
    # unit strings (most questions then have one form, which random weights write as well as the model)
    pin_source: bool = False

    def __post_init__(self) -> None:
        _check_choice("prompt.style", self.style, PROMPT_STYLES)
        _check_positive("prompt.max_new_tokens", self.max_new_tokens, allow_none=True)
        if self.constrained and self.style != "tool":
            raise PipelineError(
                f"prompt.constrained=true applies to prompt=tool only (this is prompt={self.style}); "
                "drop prompt.constrained or use prompt=tool"
            )
        for i, example in enumerate(self.examples):
            if not (isinstance(example, (list, tuple)) and len(example) == 2):
                raise PipelineError(f"prompt.examples[{i}] must be a [question, answer] pair")


@dataclass
class StagesConfig:
    single: bool = True
    batched: bool = True
    micro_batch_size: int = 32
    # group prompts of similar length into the same micro-batch (less padding); results keep the data set's order
    sort_by_length: bool = False
    # the original grader's limits
    single_budget_s: float = 40.0
    batched_budget_s: float = 15.0
    # the course grader's quality loss, points and case time after each stage (pipeline.grader)
    grader_loss: bool = True
    # the loss is the course's, over a stage's first N questions (the course grades 32); null: all of them, in
    # chunks of N so that memory does not grow with the number of questions
    grader_questions: int | None = 32
    # fidelity against the fp32 reference (KL divergence, top-1 agreement) over each stage's first N sequences
    # (pipeline.fidelity); null: all of them
    fidelity: bool = True
    fidelity_questions: int | None = 32
    # the null model's accuracy (random weights, same config, cached per config and data set) beside each accuracy
    null_model: bool = True
    null_questions: int | None = 256  # the null model's questions: the run's first N (null: all of them)
    # load (and warm up) a fresh model before each stage, counted in that stage, as the course builds one per case
    fresh_model_per_stage: bool = False

    def __post_init__(self) -> None:
        _check_positive("stages.micro_batch_size", self.micro_batch_size)
        _check_positive("stages.single_budget_s", self.single_budget_s)
        _check_positive("stages.batched_budget_s", self.batched_budget_s)
        _check_positive("stages.grader_questions", self.grader_questions, allow_none=True)
        _check_positive("stages.fidelity_questions", self.fidelity_questions, allow_none=True)
        _check_positive("stages.null_questions", self.null_questions, allow_none=True)
        if not (self.single or self.batched):
            raise PipelineError("both stages are off; set stages.single=true or stages.batched=true")


@dataclass
class TrackingConfig:
    enabled: bool = True
    # null: sqlite:///<launch directory>/mlflow.db
    uri: str | None = None
    experiment: str = "unit-conversion"
    run_name: str | None = None
    # the run a sweep's comparison measures against, as key=value pairs (null: the sweep's first job)
    baseline: str | None = None
    # MLflow's system metrics (CPU, memory, GPU) sampled during each run, every this many seconds
    system_metrics: bool = True
    system_metrics_interval_s: float = 2.0

    def __post_init__(self) -> None:
        _check_positive("tracking.system_metrics_interval_s", self.system_metrics_interval_s)


@dataclass
class BackendConfig:
    # auto (the engine where it can run the config, else transformers), engine (our own decode loop),
    # transformers (Hugging Face generate), llamacpp (llama-cpp-python on the GGUF file, the outside reference)
    name: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("backend", self.name, BACKENDS)


@dataclass
class Config:
    """The whole run. Its defaults are the schema's; `load_config()` gives the defaults of conf/, as run.py does."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: bool = False

    def __post_init__(self) -> None:
        # the prompt's token budget and stop text apply where generation leaves them unset, once, here: every
        # backend reads cfg.generation as it is. Change the prompt by building a new Config (dataclasses.replace
        # of a built one keeps the generation settings it resolved).
        self.generation = self.generation.resolved(self.prompt)


CONF_DIR_ENV = "PIPELINE_CONF_DIR"  # the project's conf/ folder, where the package is not run from a checkout


def conf_dir() -> Path:
    """The project's conf/ folder: $PIPELINE_CONF_DIR, else the one beside src/ in this checkout."""
    folder = Path(os.environ.get(CONF_DIR_ENV) or Path(__file__).resolve().parents[2] / "conf")
    if not (folder / "config.yaml").is_file():
        raise PipelineError(f"no config.yaml in {folder}; set {CONF_DIR_ENV}=/path/to/the/project/conf")
    return folder


def load_config(overrides: list[str] | tuple[str, ...] = (), folder: Path | None = None) -> Config:
    """The Config `python run.py OVERRIDES...` runs, composed from conf/ with Hydra's compose API.

    A bad override is one PipelineError: an unknown option with the valid ones, or the bad key and why.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    folder = folder or conf_dir()
    ConfigStore.instance().store(name="config_schema", node=Config)  # the schema conf/config.yaml names first
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as err:
        raise PipelineError(compose_error(err, list(overrides), folder)) from None
    return OmegaConf.to_object(cfg)  # runs each group's checks


def compose_error(err: Exception, overrides: list[str], folder: Path) -> str:
    """One line for a failed compose: the unknown option with the valid ones, or the bad key and why."""
    from omegaconf.errors import OmegaConfBaseException

    for override in overrides:
        group, _, value = override.lstrip("+~").partition("=")
        options = sorted(f.stem for f in (folder / group).glob("*.yaml")) if "/" not in group else []
        if options and value not in (*options, "null"):
            return f"{group}={value} is not an option; choose one of: {', '.join(options)}"
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    reason = (str(cause or err).strip().splitlines() or [type(err).__name__])[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {reason}" if key else reason
