"""The one place that states every configuration field: its type, default, allowed values and doc.

Hydra composes YAML on top of these defaults (see ``load.py``, which registers ``Config()`` as the base
node), so a YAML file can only *change* a value, never introduce a field the schema does not know.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED = "embedded"  # sentinel for model.name_or_path / data.source: the offline default
# training.micro_batch_size=auto off CUDA, and what an auto micro-batch counts as in the global batch.
DEFAULT_MICRO_BATCH = 4


class _Strict(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "meta-llama/Llama-3.2-1B-Instruct",
        description="Hub id, local directory in transformers format, or 'embedded' for the offline tiny Llama.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the frozen base weights; 'auto' follows the chosen precision."
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel; 'auto' picks FlashAttention2 if installed and supported, else SDPA."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub. Off for safety.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (non-reentrant) to save memory."
    )
    # ---- quantized bases
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="Load the frozen base quantized by bitsandbytes (pip install 'llama-lora[quant]'): nf4/fp4 = "
        "4-bit QLoRA (double quantization on, compute dtype following the precision), int8 = LLM.int8(). "
        "Every Linear but lm_head is quantized; embeddings and norms are not. CUDA and CPU, not MPS; the lean "
        "step steps aside (PEFT's bitsandbytes layers train); FSDP/DeepSpeed are refused. merge writes a "
        "dequantized model and reports both differences (docs/quantization.md).",
    )


class ColumnsConfig(_Strict):
    instruction: str = Field("instruction", description="Column holding the instruction.")
    input: str = Field("input", description="Column holding the optional input/context.")
    output: str = Field("output", description="Column holding the target response.")


class DataConfig(_Strict):
    source: str = Field(
        "tatsu-lab/alpaca",
        description="Hub dataset id, local .json/.jsonl/.parquet file, local directory of such files, or 'embedded'.",
    )
    train_split: str = Field("train[:1%]", description="Split (with optional slicing) used for training.")
    eval_split: str | None = Field(
        None,
        description="Held-out split for evaluation; None uses the data set's 'validation' split "
        "if it has one, else holds out eval_fraction of train_split.",
    )
    test_split: str | None = Field(
        None, description="Split for the eval/baseline commands; None uses the evaluation split."
    )
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of train_split held out when there is no eval split."
    )
    max_eval_examples: int = Field(200, ge=1, description="Cap on evaluation examples (keeps eval quick).")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Column names in the data set.")
    prompt_format: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="'chat' uses the tokenizer's chat template, 'alpaca' the Alpaca prompt; "
        "'auto' picks chat when the tokenizer has a template.",
    )
    system_prompt: str | None = Field(None, description="Optional system message for chat formatting.")
    chat_template_date: str = Field(
        "26 Jul 2024",
        description="The date written into prompts by chat templates that read one (Llama 3.x: 'Today Date: ...'); "
        "fixed at training and saved in the run's prompt.json so infer, eval and serve reuse it on any later day. "
        "The default is Llama 3's own template default.",
    )
    max_seq_length: int = Field(512, ge=8, le=131072, description="Examples longer than this are truncated.")
    packing: bool = Field(
        True,
        description="Padding-free batches: concatenate a micro-batch's examples into one row with "
        "per-example position_ids (no attention across examples).",
    )
    group_by_length: bool = Field(
        False,
        description="When packing is off: batch examples of similar length together (sorted inside windows "
        "of a seeded shuffle) so little padding is computed. Order still depends only on (seed, epoch).",
    )
    num_proc: int = Field(1, ge=1, description="Processes for tokenization.")


# A run's folder name, and the `.NAME.lock` / `.NAME.tmp-PID` entries made beside it, must fit the file
# system's 255-byte limit on a name.
MAX_NAME_BYTES = 230


def plain_name(v: str | None) -> str | None:
    """A run or experiment name: one plain folder name that leaves room for the entries made beside it."""
    if v is not None and (not v or "/" in v or v in {".", ".."}):
        raise ValueError("must be a plain directory name (no '/')")
    if v is not None and len(v.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"is {len(v.encode())} bytes long; at most {MAX_NAME_BYTES} (file systems allow 255 "
                         "per name, and its lock and temporary files add to it)")
    return v


class PeftConfig(_Strict):
    method: Literal["lora", "dora"] = Field("lora", description="Adapter type: LoRA or DoRA (weight-decomposed).")
    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0.0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout probability on the adapter input. 0 by default, as in PEFT and Unsloth: dropout "
        "makes a step slower (a mask per adapted layer, no merged step; see benchmarks/README.md).",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    lean: bool | Literal["auto"] = Field(
        "auto",
        description="Train through llama-lora's lean LoRA/DoRA step (shared A matmul for q/k/v and "
        "gate/up, DoRA norm from low-rank products without materialising B@A). Same parameters and saved PEFT "
        "files; false uses PEFT's own forward. auto: lean everywhere except LoRA on a GPU, where PEFT's forward "
        "measured faster (kernel launches bound the step there; see benchmarks/README.md).",
    )
    lean_merged: bool | Literal["auto"] = Field(
        "auto",
        description="In the lean step, compute each adapted layer against W + s*B*A, formed once per optimizer "
        "step: the adapter's add into the output and its share of the input gradient leave every micro-batch "
        "(see benchmarks/README.md). Costs one copy of the adapted weights in memory "
        "(the planner counts it); applies only in fp32 without dropout (in bf16, W + s*B*A would round the "
        "update away). auto: on CPU.",
    )
    lean_kernel: bool | Literal["auto"] = Field(
        "auto",
        description="In the merged step on CPU, compute the backward's rank-r products (g*B with the B gradient "
        "in one pass over g, and the A gradient) with llama-lora's C kernel (csrc/lowrank.c, compiled "
        "once with the system's gcc into the cache directory) instead of BLAS, which runs such narrow products "
        "well below its big-matmul rate (see benchmarks/README.md). "
        "auto: where gcc builds it, BLAS otherwise; true: fail if it cannot be built; false: BLAS.",
    )
    # ---- peft.init
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="Adapter initialisation (PEFT's init_lora_weights): default (A Kaiming-uniform, B zero), "
        "gaussian (A Gaussian scaled by the rank), pissa (A, B from the top r singular vectors of each weight, "
        "which keeps the residual; PEFT's fast SVD, pissa_niter_16), olora (A, B from a QR of each "
        "weight, which keeps the rest), loftq (adapter that absorbs a 4-bit base's rounding error; needs "
        "model.quantization=nf4 or fp4). pissa and olora change the base weights: the saved adapter is converted "
        "to a plain LoRA of rank 2r that loads on the original base (see docs/configuration.md).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_names(cls, v):
        # Accept a comma-separated string (peft.target_modules='q_proj,v_proj', quoted for Hydra) as well as a list.
        if isinstance(v, str) and v != "all-linear":
            return [name.strip() for name in v.split(",") if name.strip()]
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


class TrainingConfig(_Strict):
    seed: int = Field(42, description="Seed for model init, data order and dropout.")
    num_epochs: float = Field(1.0, gt=0.0, description="Epochs over the training split (ignored if max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 derives it from num_epochs.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Examples per forward pass per device. 'auto': on CUDA the memory planner's choice (the "
        f"largest that fits, keeping the global batch), {DEFAULT_MICRO_BATCH} elsewhere; a number is used as given.",
    )
    gradient_accumulation_steps: int = Field(
        4, ge=1, description="Micro-batches per optimizer step; the global batch is micro_batch_size x this (an "
        f"'auto' micro-batch counts as {DEFAULT_MICRO_BATCH} there).",
    )
    auto_batch_size: bool = Field(
        False,
        description="Pick the largest micro-batch the memory planner says fits (training.memory_budget_gb, "
        "else the device's memory) on any device, also over an explicit micro_batch_size, and make up the "
        "configured global batch (micro_batch_size x gradient_accumulation_steps) with gradient accumulation.",
    )
    memory_budget_gb: float | None = Field(
        None, gt=0.0,
        description="Memory budget in GiB for the planner (validate, auto_batch_size); None = the device's "
        "memory (CUDA total, or system RAM on CPU/MPS).",
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent in linear warm-up.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    eval_every: int = Field(50, ge=0, description="Evaluate every N optimizer steps; 0 evaluates only at the end.")
    save_every: int = Field(100, ge=0, description="Checkpoint every N optimizer steps; 0 only at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    log_every: int = Field(10, ge=1, description="Log train loss every N optimizer steps.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers; wandb honours WANDB_MODE=offline."
    )
    wandb_project: str = Field("llama-lora", description="Weights & Biases project name.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="'auto' continues an unfinished run of the same name from its newest checkpoint."
    )
    resume_despite_changes: bool = Field(
        False, description="Continue from the checkpoint even when the settings or data that define the run "
        "changed since it started (otherwise such a resume is refused, naming the changes).",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="'auto': CUDA, then MPS, then CPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 where supported, fp16 with loss scaling on older CUDA, fp32 on CPU/MPS."
    )
    debug_nan_at_step: int | None = Field(
        None, ge=1, description="Testing knob: make the loss NaN at this step to exercise the non-finite guard."
    )
    # ---- chunked loss
    loss_chunk_size: int | None = Field(
        None, ge=0,
        description="Response positions per chunk of the loss over the vocabulary (lm_head + cross-entropy run "
        "chunk by chunk, so a micro-batch's full fp32 logits never exist; same loss and gradients). "
        "None: auto, chunks of 512 from a 32k vocabulary on, unchunked below; 0: unchunked; N: N positions "
        "per chunk (see docs/performance.md).",
    )

    @property
    def base_micro_batch_size(self) -> int:
        """The micro-batch the global batch is counted in: micro_batch_size, 'auto' as DEFAULT_MICRO_BATCH."""
        return DEFAULT_MICRO_BATCH if self.micro_batch_size == "auto" else self.micro_batch_size

    def planner_sizes_batch(self, device: str) -> bool:
        """Whether the memory planner picks the micro-batch on `device`: auto_batch_size, or an 'auto'
        micro-batch on CUDA (fill the GPU by default; an explicit micro-batch is honoured)."""
        return self.auto_batch_size or (self.micro_batch_size == "auto" and device == "cuda")


class EvalConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1, description="Generation length for exact-match and samples.")
    batch_size: int = Field(16, ge=1, description="Examples per batch for loss and generation.")
    num_samples: int = Field(3, ge=0, description="Sample generations shown in the report.")


class InferConfig(_Strict):
    run_dir: str | None = Field(
        None, description="Run directory (adapter) or merged model for infer, eval, merge and baseline "
        "(CLI shorthand: run_dir=...); None = latest finished run under output_dir.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    do_sample: bool | None = Field(
        None, description="Sample instead of greedy decoding; None = as the model's generation_config says "
        "(Llama-3.2-Instruct samples; the embedded model decodes greedily). eval always decodes greedily.",
    )
    temperature: float | None = Field(
        None, gt=0.0, description="Sampling temperature; None = the model's generation_config's (else 1.0)."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling mass; None = the model's generation_config's (else 1.0)."
    )
    batch_size: int = Field(8, ge=1, description="Prompts per batch with --input-file.")


class SearchRange(_Strict):
    low: int | float = Field(description="Smallest value searched.")
    high: int | float = Field(description="Largest value searched.")
    log: bool = Field(False, description="Sample on a log scale (learning rates, ranks).")
    step: int | float | None = Field(None, gt=0, description="Grid step inside [low, high]; None = continuous (floats).")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a range is either log-scale or stepped, not both")
        return self

    @property
    def is_int(self) -> bool:
        """Both ends written as integers (e.g. peft.r: {low: 4, high: 32}) -> integer values."""
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)


class SearchConfig(_Strict):
    n_trials: int = Field(
        0, ge=0, description="Runs the Optuna search may spend; 0 = no search (run the `runs` / -m sweep grid)."
    )
    space: dict[str, list[str | int | float | bool] | SearchRange] = Field(
        default_factory=dict,
        description="Config key -> candidate values: a list (categorical, e.g. peft.r: [4, 8, 16]) or a range "
        "{low, high, log, step} (integers when both ends are integers).",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: TPE (Bayesian) or random.")
    seed: int = Field(0, description="Seed of the sampler, so a search is reproducible.")

    @model_validator(mode="after")
    def _space_when_on(self):
        if self.n_trials and not self.space:
            raise ValueError("experiment.search.n_trials > 0 needs a search space (experiment.search.space)")
        for key, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"experiment.search.space.{key} lists no values")
        return self


class ExperimentConfig(_Strict):
    name: str | None = Field(
        None, description="Folder under output_dir holding the experiment's runs and summary; None = the preset name."
    )
    evaluate: bool = Field(
        True, description="Run `eval` on each finished run: exact match per task family where the data has "
        "checkable answers (a `task` column, as the embedded data), test loss otherwise.",
    )
    metric: Literal["auto", "eval_loss", "exact_match"] = Field(
        "auto", description="Metric compared, plotted and optimised: eval_loss (lower is better) or exact_match "
        "(higher is better); 'auto' = exact_match when evaluated runs have it, else eval_loss.",
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="Optuna search instead of a fixed grid.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        return plain_name(v)


class Config(_Strict):
    preset: str = Field("default", description="Name of the experiment preset; used in default run names.")
    run_name: str | None = Field(None, description="Run directory name under output_dir; None = '<preset>-<time>'.")
    output_dir: str = Field("outputs", description="Parent directory of run directories.")
    overwrite: bool = Field(False, description="Allow replacing a finished run directory of the same name.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model to adapt.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data set and formatting.")
    peft: PeftConfig = Field(default_factory=PeftConfig, description="LoRA/DoRA adapter settings.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation and run control.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and generation settings for eval/baseline.")
    infer: InferConfig = Field(default_factory=InferConfig, description="Generation settings for infer.")
    runs: dict[str, list[str]] = Field(
        default_factory=dict,
        description="For 'experiment': named runs, each a list of Hydra overrides applied on top of this config.",
    )
    experiment: ExperimentConfig = Field(
        default_factory=ExperimentConfig, description="For 'experiment': folder, evaluation, compared metric, search."
    )

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v):
        return plain_name(v)

    @model_validator(mode="after")
    def _cross_field(self):
        if self.data.group_by_length and self.data.packing:
            raise ValueError(
                "data.group_by_length=true has no effect with data.packing=true (the default): packed rows have no "
                "padding to save. Set data.packing=false to group examples by length, or leave "
                "data.group_by_length out")
        if self.training.debug_nan_at_step is not None and self.training.max_steps > 0:
            if self.training.debug_nan_at_step > self.training.max_steps:
                raise ValueError("training.debug_nan_at_step is past training.max_steps")
        # peft.init: checks across model/peft.
        quantization = self.model.quantization
        if self.peft.init == "loftq" and quantization not in ("nf4", "fp4"):
            raise ValueError(
                "peft.init=loftq initialises the adapter against a 4-bit base's rounding error, so it needs one: "
                f"set model.quantization=nf4 (or fp4; it is {quantization}), or use peft.init=pissa / default "
                "on a full-precision base")
        if self.peft.init in ("pissa", "olora") and self.peft.method == "dora":
            raise ValueError(
                f"peft.init={self.peft.init} with peft.method=dora is not supported: the saved adapter must be "
                "converted to a plain LoRA for the original base, and PEFT's conversion keeps no DoRA magnitude. "
                "Use peft.method=lora with it, or peft.init=default / gaussian for DoRA")
        if self.peft.init in ("pissa", "olora") and quantization != "none":
            raise ValueError(
                f"peft.init={self.peft.init} on a quantized base (model.quantization={quantization}) is not "
                "supported: it rewrites the base weights, which a quantized base cannot hold exactly, so the saved "
                "adapter would not reproduce the trained model. Use peft.init=loftq for a quantized base")
        return self


# ---- serve: `llama-lora serve` settings, given as flags (--queue-size 8 ...), not Hydra
# overrides: they belong to the server process, never to a saved run's config.yaml.
class ServeConfig(_Strict):
    max_batch: int = Field(8, ge=1, le=256, description="Most queued requests of one model generated together.")
    batch_wait_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="How long the worker waits for more requests to fill a batch."
    )
    queue_size: int = Field(64, ge=1, description="Requests waiting for the model; beyond it a request gets 429.")
    max_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt (in tokens) a request may send.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (HTTP 413 beyond).")
    request_timeout_s: float = Field(
        120.0, gt=0.0, description="A request not answered within this many seconds is stopped (HTTP 504)."
    )
    drain_timeout_s: float = Field(
        60.0, ge=0.0, description="On SIGTERM, how long in-flight requests may take to finish before exit."
    )


# ---- Which settings define a trained run: the one statement read by resume (checkpoint.changes_since_start),
# experiment's reuse of a finished run, and the use commands' overrides (runs.SAVED_RUN_FIELDS). A key names a
# field or a whole section ("eval" covers eval.*). Everything not listed (model.*, peft.*, data.*, the
# schedule, optimizer and seed) defines the run's trajectory.
NAMES_THE_RUN = ("preset", "run_name", "output_dir", "overwrite")  # where the run is, not what it computes
OTHER_COMMANDS = ("eval", "infer", "runs", "experiment")  # other commands' settings (eval.batch_size too)
HOW_IT_IS_WATCHED = (  # how it is logged, saved, resumed or evaluated
    "data.test_split", "data.num_proc",  # the eval command's split; tokenization processes
    "training.log_every", "training.eval_every", "training.save_every", "training.keep_checkpoints",
    "training.report_to", "training.wandb_project", "training.resume", "training.resume_despite_changes",
    "training.debug_nan_at_step",  # a testing knob
)
# Where it runs, and the split of the global batch into micro-batches: memory, not math (the loss is
# normalised over the global batch, whose examples the sampler picks from (seed, global batch) alone; a
# resume compares the global batch and the precision that ran instead, checkpoint.training_inputs).
HOW_IT_IS_LAID_OUT = (
    "training.device", "training.precision", "training.micro_batch_size", "training.gradient_accumulation_steps",
    "training.auto_batch_size", "training.memory_budget_gb", "model.gradient_checkpointing",
    "training.loss_chunk_size",  # the same loss and gradients, computed in chunks (loss.py)
)
RESUME_MAY_CHANGE = NAMES_THE_RUN + OTHER_COMMANDS + HOW_IT_IS_WATCHED + HOW_IT_IS_LAID_OUT
REUSE_MAY_CHANGE = NAMES_THE_RUN + OTHER_COMMANDS  # experiment: a finished run stands for these settings
# What infer, eval, baseline, merge and export may set on a saved run besides their own section: how the
# model runs there (device, precision, sampling seed, weight dtype, attention), never what was trained.
USE_MAY_CHANGE = ("training.device", "training.precision", "training.seed", "model.dtype",
                  "model.attn_implementation", "model.trust_remote_code", "output_dir", "infer.run_dir")
