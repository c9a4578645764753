"""What the bench runs, as data: each row a config of run.py, the decoding mode it is compared in, and what it is.

Rows are compared like with like: a constrained row with constrained rows, a free row with free rows. Peer
rows run engines a user would pick instead, each as its own docs recommend (llama.cpp batched in one
llama_batch and sequential, OpenVINO GenAI and CTranslate2 int8 with prefix caching), under the same
prompts, token budget, stop text and, where the engine can apply it, the same constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

# decoding modes: the default constraint (the model chooses the units from the lexicon), the question-limited one
# (forms built only from the question's own units: what peers whose grammar cannot take the lexicon apply), free
CONSTRAINED, PINNED, FREE = "constrained", "pinned", "free"
OURS = {CONSTRAINED: "default", PINNED: "default-pinned", FREE: "default-free"}


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    mode: str  # CONSTRAINED or FREE: the rows it is compared with
    what: str  # one line for the report
    ours: bool = False  # the project's own decoding (the default's competitors are the other rows)
    needs: str = ""  # a Python module the row's backend needs; without it the row is skipped, saying so


FREE_OVERRIDES = ("prompt.constrained=false",)
PINNED_OVERRIDES = ("prompt.pin_source=true",)

SPEED_ROWS: tuple[Row, ...] = (
    Row("default", (), CONSTRAINED, "run.py as it ships (backend=auto: the engine; precision=auto)", ours=True),
    Row("default-free", FREE_OVERRIDES, FREE, "the default, the tool form decoded freely", ours=True),
    Row("default-pinned", PINNED_OVERRIDES, PINNED,
        "the previous default strategy: forms built only from the question's own numbers and units", ours=True),
    Row("default-pinned-stepwise", (*PINNED_OVERRIDES, "generation.jump_forward=false"), PINNED,
        "the previous default as it ran before jump-forward (one step per forced token)", ours=True),
    Row("engine-fp32", ("backend=engine", "precision=fp32"), CONSTRAINED, "the engine, fp32 weights", ours=True),
    Row("engine-q8", ("backend=engine", "precision=int8"), CONSTRAINED, "the engine, q8 weights (lossy here)",
        ours=True),
    Row("engine-q4", ("backend=engine", "precision=q4"), CONSTRAINED, "the engine, q4 weights", ours=True),
    Row("engine-gemm-bf16", ("precision.gemm=bf16",), CONSTRAINED,
        "the default with bf16 GEMM past the kernel (no int8 tiles: the default before them)", ours=True),
    Row("engine-gemm-int8", ("precision.gemm=int8",), CONSTRAINED,
        "the default with one-digit int8 tiles past the kernel (llama.cpp's 8-bit activations: lossy)", ours=True),
    Row("transformers-fp32", ("backend=transformers", "precision=fp32"), CONSTRAINED,
        "Hugging Face generate, fp32 (the default before the engine)"),
    Row("transformers-bf16", ("backend=transformers", "precision=bf16"), CONSTRAINED, "Hugging Face generate, bf16"),
    Row("llamacpp", ("backend=llamacpp",), CONSTRAINED, "llama.cpp, all prompts in one llama_batch", needs="llama_cpp"),
    Row("llamacpp-free", ("backend=llamacpp", *FREE_OVERRIDES), FREE, "llama.cpp batched, free", needs="llama_cpp"),
    Row("llamacpp-seq", ("backend=llamacpp", "stages.micro_batch_size=1"), CONSTRAINED,
        "llama.cpp, prompts one after another", needs="llama_cpp"),
    Row("llamacpp-pinned", ("backend=llamacpp", *PINNED_OVERRIDES), PINNED, "llama.cpp batched, question-limited forms",
        needs="llama_cpp"),
    Row("llamacpp-seq-free", ("backend=llamacpp", "stages.micro_batch_size=1", *FREE_OVERRIDES), FREE,
        "llama.cpp sequential, free", needs="llama_cpp"),
    Row("openvino", ("backend=openvino", *PINNED_OVERRIDES), PINNED,
        "OpenVINO GenAI, int8, prefix caching, the question-limited forms as its grammar (the lexicon's is too large)",
        needs="openvino_genai"),
    Row("openvino-free", ("backend=openvino", *FREE_OVERRIDES), FREE, "OpenVINO GenAI, free", needs="openvino_genai"),
    Row("ctranslate2-free", ("backend=ctranslate2", *FREE_OVERRIDES), FREE,
        "CTranslate2, int8, the prefix as static_prompt (no constraint: its API takes no logits processor)",
        needs="ctranslate2"),
)  # fmt: skip

# accuracy on the first 256 questions of each shipped set, batched stage: what each prompt strategy scores, beside
# its null model and its forced share
ACCURACY_QUESTIONS = 256
SETS = {"shipped": (), "holdout": ("dataset=unit_conversion_holdout",)}
STRATEGIES: tuple[Row, ...] = (
    Row("default", (), CONSTRAINED, "the default strategy", ours=True),
    Row("pinned", PINNED_OVERRIDES, PINNED, "the previous default (question-limited forms)", ours=True),
    Row("free", FREE_OVERRIDES, FREE, "the tool form decoded freely", ours=True),
)

ROWS = {row.name: row for row in SPEED_ROWS}
