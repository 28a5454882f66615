"""The job spec: one Pydantic model that the launcher validates and the trainer reads.

A spec is a YAML file with a `kind` (prepare | pretrain | finetune). The launcher renders it for a
backend; inside the job, `python -m jobs.train --spec spec.yaml` reads the very same file. Cross-field
rules (batch arithmetic, what a finetune needs, name lengths) are checked here, at validation time,
never at step 0 on the cluster.

This module is imported by the launcher: it must never import torch, transformers or deepspeed.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A Kubernetes object name that every derived name must still fit: the training operator creates a
# Service per replica named `<job>-worker-<index>`, a DNS-1035 label of at most 63 characters, and we
# add `-spec` for the ConfigMap. 40 leaves room for `-worker-` plus five digits and a suffix.
NAME_MAX_LEN = 40
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Kubernetes' own rules for what mbl puts into object names, label keys and values (apimachinery validation).
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # at most 63
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # at most 253
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")  # at most 63; also a label value
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")  # a key of a Secret or ConfigMap, at most 253
INT64_MAX = 2**63 - 1  # Kubernetes, SQLite and torch hold integers in 64 bits
# Characters no value may carry: C0 controls but tab and newline, DEL, and lone surrogates (not UTF-8).
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def dns_1123_label(value: str) -> str | None:
    """Why `value` is no DNS-1123 label (a Kubernetes namespace, a queue), or None."""
    if len(value) > 63 or not DNS_1123_LABEL.fullmatch(value):
        return "must be a DNS-1123 label: at most 63 lower-case letters, digits and '-', starting and ending " \
               "with a letter or digit"
    return None


def dns_1123_subdomain(value: str) -> str | None:
    """Why `value` is no DNS-1123 subdomain (the name of most Kubernetes objects), or None."""
    if len(value) > 253 or not DNS_1123_SUBDOMAIN.fullmatch(value):
        return "must be a DNS-1123 subdomain: at most 253 lower-case letters, digits, '-' and '.', starting and " \
               "ending with a letter or digit"
    return None


def queue_name(value: str) -> str | None:
    """Why `value` is no Kueue LocalQueue name (a DNS-1123 subdomain that is also a label value), or None."""
    if len(value) > 63:
        return "must be at most 63 characters (a queue's name is also a label value of its jobs)"
    return dns_1123_subdomain(value)


def label_key(value: str) -> str | None:
    """Why `value` is no Kubernetes label key (`[prefix/]name`; also a toleration key), or None."""
    prefix, _, name = value.rpartition("/")
    if prefix and dns_1123_subdomain(prefix):
        return "a label key's prefix (before '/') must be a DNS-1123 subdomain such as example.com"
    if len(name) > 63 or not LABEL_NAME.fullmatch(name):
        return "must be a label key: [prefix/]name, the name at most 63 letters, digits, '-', '_' and '.', " \
               "starting and ending with a letter or digit"
    return None


def label_value(value: str) -> str | None:
    """Why `value` is no Kubernetes label value (empty, or like a label key's name), or None."""
    if value and (len(value) > 63 or not LABEL_NAME.fullmatch(value)):
        return "must be a label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and " \
               "ending with a letter or digit"
    return None


def _open_construct(line: str) -> str | None:
    """The shell construct a line leaves open at its end (a quote, `$(`, a backtick, a parenthesis), or None.
    A small scanner of bash's quoting: enough to tell that the next line would be read as part of this one."""
    stack: list[str] = []  # "'", '"', "`", "(" (also `$(`)
    i = 0
    while i < len(line):
        c, top = line[i], stack[-1] if stack else ""
        if top == "'":
            if c == "'":
                stack.pop()
        elif top == "$'":  # ANSI-C quoting: backslash escapes, a quote ends it
            if c == "\\":
                i += 1
            elif c == "'":
                stack.pop()
        elif c == "\\":
            i += 1  # the next character is escaped
        elif top == '"' and c not in '"`$':
            pass
        elif c == "$" and line[i + 1:i + 2] == "'" and top != '"':
            stack.append("$'")
            i += 1
        elif c in "'\"" and top != '"' or c == '"':
            if c == top:
                stack.pop()
            else:
                stack.append(c)
        elif c == "`":
            stack.pop() if top == "`" else stack.append(c)
        elif c == "$" and line[i + 1:i + 2] == "(":
            stack.append("(")
            i += 1
        elif c == "(" and top != '"':
            stack.append("(")
        elif c == ")" and top == "(":
            stack.pop()
        elif c == "#" and top != '"' and (i == 0 or line[i - 1] in " \t;&|(") and "(" not in stack:
            break  # a comment runs to the end of the line
        i += 1
    names = {"'": "a single quote", "$'": "a $'...' quote", '"': "a double quote", "`": "a backtick",
             "(": "a parenthesis or $("}
    return names[stack[-1]] if stack else None


def shell_line(line: str) -> str | None:
    """Why a setup line would break the batch script around it (it is run as written, as shell), or None:
    it must be one complete line, so that it cannot swallow or join the script's lines that follow."""
    if "\n" in line:
        return "is one shell line: no line breaks (give each command as an entry of its own)"
    if (len(line) - len(line.rstrip("\\"))) % 2:
        return "ends with a backslash, which would join it to the script's next line"
    if re.search(r"<<(?!<)", line):
        return "a here-document (<<) would read the script's lines after it; use a file or a here-string (<<<)"
    open_ = _open_construct(line)
    if open_:
        return f"leaves {open_} open, which would run into the script's next lines"
    return None


def _check_values(value: Any, where: str, multiline: bool) -> None:
    """Every string in `value` (keys of mappings too) encodable and free of control characters (and of line
    breaks unless `multiline`), every integer within 64 bits."""
    if isinstance(value, str):
        bad = _BAD_CHARS.search(value)
        if bad:
            what = "a lone surrogate, not Unicode text" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
            raise ValueError(f"{where}contains {bad.group()!r}, {what}; remove it")
        if not multiline and ("\n" in value):
            raise ValueError(f"{where}contains a line break; a value here is one line")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if abs(value) > INT64_MAX:
            raise ValueError(f"{where}{value} does not fit in 64 bits (at most {INT64_MAX})")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, f"key {key!r}: " if not where else where, False)
            _check_values(item, f"{key}: " if isinstance(key, str) else where, multiline)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_values(item, where, multiline)

# Slurm's --time formats: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes" and "days-hours:minutes:seconds".
_TIME_FORMATS = [
    (re.compile(r"^(?P<m>\d+)$"), ("m",)),
    (re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"), ("m", "s")),
    (re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"), ("d", "h")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"), ("d", "h", "m", "s")),
]
MAX_TIME_LIMIT = 2**31 - 1  # seconds: about 68 years
TIME_LIMIT_HELP = (
    "a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (for example 90, 04:00:00 or 2-00:00:00)"
)


def parse_time_limit(value: str) -> int:
    """Seconds in a Slurm time string; ValueError if it is not one of Slurm's formats."""
    text = str(value).strip()
    for pattern, _ in _TIME_FORMATS:
        match = pattern.match(text)
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items()}
            seconds = (
                parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
            )
            if seconds <= 0:
                raise ValueError("a time limit must be positive")
            if seconds > MAX_TIME_LIMIT:
                raise ValueError(f"a time limit is at most {MAX_TIME_LIMIT // 86400} days (Slurm and Kubernetes "
                                 f"hold it in 32 bits); for example 365-00:00:00")
            return seconds
    raise ValueError(f"not {TIME_LIMIT_HELP}")


# Model presets. Plain numbers, so that the launcher can show them without importing transformers;
# jobs/model.py turns them into a ModernBertConfig.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        global_attn_every_n_layers=3, local_attention=64, global_rope_theta=160000.0, local_rope_theta=10000.0,
    ),
    "base": dict(
        num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12,
        global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0,
    ),
    "large": dict(
        num_hidden_layers=28, hidden_size=1024, intermediate_size=2624, num_attention_heads=16,
        global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0,
    ),
}
MODERNBERT_VOCAB = 50368


class Strict(BaseModel):
    """Base of every section: unknown keys are errors, and assignments are validated too. No value carries a
    control character, a line break (but the fields in `multiline_fields`), an infinite or NaN number, or an
    integer beyond 64 bits: values reach shell scripts, #SBATCH lines, Kubernetes objects and the trainer."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=True, allow_inf_nan=False)
    multiline_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*")
    @classmethod
    def _plain_values(cls, value: Any, info: Any) -> Any:
        _check_values(value, "", info.field_name in cls.multiline_fields)
        return value


class Kind(str, Enum):
    prepare = "prepare"
    pretrain = "pretrain"
    finetune = "finetune"


class Precision(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class TaskType(str, Enum):
    classification = "classification"
    token_classification = "token-classification"
    question_answering = "question-answering"


class ModelSpec(Strict):
    preset: Literal["tiny", "base", "large"] = Field("base", description="Architecture size: tiny (tests), base or large.")
    init_from: str | None = Field(
        None,
        description="Start from weights: a pre-training run directory (its final/ or newest checkpoint) or a local "
        "Hugging Face model folder. Required for a finetune.",
    )
    config_overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict, description="ModernBertConfig fields that override the preset (e.g. max_position_embeddings)."
    )

    @field_validator("config_overrides", mode="before")
    @classmethod
    def _typed_overrides(cls, value: Any) -> Any:
        """`--set model.config_overrides.vocab_size=50368` arrives as a string: numbers and booleans become
        numbers and booleans (ModernBertConfig rejects "50368"); other strings stay strings."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, item in value.items():
            if isinstance(item, str):
                low = item.strip().lower()
                if low in ("true", "false"):
                    item = low == "true"
                else:
                    for kind in (int, float):
                        try:
                            item = kind(item)
                            break
                        except ValueError:
                            pass
            out[key] = item
        return out

    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernels: PyTorch's scaled_dot_product_attention, flash-attn 2 (the package must be in "
        "the image; unpads the batch), or the eager reference.",
    )


class DataSpec(Strict):
    train: list[str] = Field(
        default_factory=list,
        description="Training inputs: .txt, .jsonl, .csv, .parquet files, glob patterns, or a local `datasets` folder.",
    )
    validation: list[str] = Field(default_factory=list, description="Validation inputs (finetune).")
    test: list[str] = Field(default_factory=list, description="Test inputs (finetune); metrics reported at the end.")
    prepared: str | None = Field(
        None, description="A prepared data folder (the run directory of a `prepare` job, or its data/ folder)."
    )
    text_field: str = Field("text", description="Column holding the text in jsonl/csv/parquet inputs.")
    text_pair_field: str | None = Field(None, description="Second text column for pair classification.")
    label_field: str = Field("label", description="Column holding the label (classification) or tags (NER).")
    tokenizer: str | None = Field(
        None, description="A local tokenizer folder; unset trains a BPE tokenizer on `train` (prepare/pretrain)."
    )
    vocab_size: int = Field(MODERNBERT_VOCAB, ge=256, le=1_000_000, description="Vocabulary size of a trained tokenizer.")
    seq_len: int = Field(1024, ge=16, le=65536, description="Tokens per packed sequence (pre-training).")
    max_length: int = Field(512, ge=16, le=65536, description="Longest input (fine-tuning); longer text is truncated.")
    doc_stride: int = Field(128, ge=0, description="Overlap between windows of a long QA context.")
    heldout_fraction: float = Field(0.01, gt=0.0, lt=0.5, description="Share of documents held out for evaluation.")
    objective: Literal["mlm", "mlm+sop"] = Field("mlm", description="Pre-training objective.")
    mask_prob: float = Field(0.3, gt=0.0, lt=1.0, description="Share of tokens masked for MLM (80/10/10 rule).")

    @model_validator(mode="after")
    def _stride_fits(self) -> "DataSpec":
        if self.doc_stride >= self.max_length:
            raise ValueError(
                f"data.doc_stride ({self.doc_stride}) must be smaller than data.max_length ({self.max_length})"
            )
        return self


class TaskSpec(Strict):
    type: TaskType = Field(description="Fine-tuning task.")
    num_labels: int | None = Field(None, ge=1, description="Number of labels; unset infers it from the training data.")
    labels: list[str] | None = Field(None, description="Label names in id order; unset collects them from the data.")
    metric: str | None = Field(
        None, description="Metric that picks the best model: accuracy, f1 (macro / entity / QA), exact_match, loss."
    )
    greater_is_better: bool | None = Field(None, description="Unset: true for every metric but loss.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after this many evaluations without a gain.")

    @property
    def best_metric(self) -> str:
        if self.metric:
            return self.metric
        return "accuracy" if self.type == TaskType.classification.value else "f1"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        allowed = {"accuracy", "f1", "exact_match", "loss", "precision", "recall"}
        if value is not None and value not in allowed:
            raise ValueError(f"unknown metric {value!r}; allowed: {', '.join(sorted(allowed))}")
        return value


class TrainSpec(Strict):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps in total.")
    global_batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, over all ranks.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per forward pass.")
    lr: float = Field(5e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final learning rate as a share of the peak.")
    schedule: Literal["linear", "cosine", "wsd"] = Field(
        "linear", description="Warmup then: linear decay, cosine decay, or warmup-stable-decay."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(0.1, gt=0.0, le=1.0, description="wsd: share of steps spent decaying at the end.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (never applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas.")
    eps: float = Field(1e-6, gt=0.0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient norm clipping; 0 disables it.")
    precision: Precision = Field(Precision.bf16, description="bf16, fp16 (with loss scaling) or fp32.")
    seed: int = Field(0, ge=0, description="Seed of data order, masking and initialization.")
    log_every_steps: int = Field(10, ge=1, description="Log to metrics.jsonl and TensorBoard every N steps.")
    eval_every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; unset: at every checkpoint.")
    eval_batches: int = Field(20, ge=1, description="Micro batches per rank in a pre-training evaluation.")
    epochs: int | None = Field(None, ge=1, description="Finetune: epochs over the training set (overrides max_steps).")
    compile: bool = Field(
        False, description="torch.compile the encoder (slower start, faster steps)."
    )
    deterministic: bool = Field(
        False,
        description="Deterministic kernels (torch.use_deterministic_algorithms, a fixed cuBLAS workspace), so that "
        "a resumed run matches an uninterrupted one on a GPU too; slower.",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"AdamW betas are each in [0, 1), like (0.9, 0.98); given {list(value)}")
        return value

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) exceeds train.max_steps ({self.max_steps})")
        return self


class DistributedSpec(Strict):
    nodes: int = Field(1, ge=1, le=4096, description="Nodes (Slurm nodes, or Kubernetes pods).")
    gpus_per_node: int = Field(1, ge=1, le=64, description="Processes per node: one per GPU (CPU processes locally).")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    hang_timeout_seconds: int | None = Field(
        None, ge=5, le=7 * 86400,
        description="No training progress for this long: every rank logs its stacks and the attempt is requeued "
        "from the newest checkpoint. Unset: 10 x the median step time, at least 300 s.",
    )
    preflight: bool | None = Field(
        None,
        description="Check every node before the first step (accelerator, an all-reduce, the shared run directory, "
        "room for a checkpoint); a bad node is named and the attempt requeued without it. Unset: multi-node jobs.",
    )
    preflight_allreduce_mb: int | None = Field(
        None, ge=1, le=65536, description="Size of the preflight's all-reduce; unset: 256 MB on GPUs, 16 on CPUs.")
    collective_timeout_seconds: int = Field(
        1800, ge=30, le=7 * 86400,
        description="Timeout of the process group's collectives (NCCL/gloo), and the hang limit before the first "
        "step and during saves and evaluations.",
    )

    @model_validator(mode="after")
    def _hang_before_collectives(self) -> "DistributedSpec":
        if self.hang_timeout_seconds is not None and self.hang_timeout_seconds >= self.collective_timeout_seconds:
            raise ValueError(f"distributed.hang_timeout_seconds ({self.hang_timeout_seconds}) must be smaller than "
                             f"distributed.collective_timeout_seconds ({self.collective_timeout_seconds}), so a hang "
                             "is caught (with stacks) before a collective times out")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class ResourcesSpec(Strict):
    time_limit: str = Field("04:00:00", description=f"Wall time limit, {TIME_LIMIT_HELP}.")
    cpus_per_gpu: int = Field(8, ge=1, le=512, description="CPU cores per GPU.")
    mem_per_node: str = Field("64G", description="Memory per node, Slurm style (e.g. 480G); Kubernetes gets the Gi form.")
    shm_size: str = Field("16G", description="Size of /dev/shm for the data loaders.")
    gpu_type: str | None = Field(None, description="GPU model (e.g. h100); selects partition/node labels from the profile.")

    @field_validator("time_limit", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> str:
        text = str(value)
        parse_time_limit(text)
        return text

    @field_validator("mem_per_node", "shm_size")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not re.fullmatch(r"\d+[KMGT]", value):
            raise ValueError("expected a whole number and a unit K, M, G or T (for example 480G)")
        return value

    @property
    def time_limit_seconds(self) -> int:
        return parse_time_limit(self.time_limit)


class CheckpointSpec(Strict):
    dir: str = Field(
        "runs/{name}",
        description="The run directory on shared storage; `{name}` is replaced with the job name. Relative paths "
        "resolve against the directory `mbl` runs in.",
    )
    every_steps: int = Field(500, ge=1, description="Save every N optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Keep the N newest checkpoints (plus the best one).")
    async_save: bool = Field(
        True,
        description="Periodic saves block training only while the state is copied to host memory; the files "
        "are written, hashed and fsynced in the background and `latest` moves once they are durable. Takes host "
        "memory for one checkpoint shard per rank (pinned on GPUs), kept for the next save. Saves on a stop "
        "signal always block until durable; false: every save does.",
    )
    save_grace_seconds: int = Field(
        300, ge=10, le=7200,
        description="Seconds the ranks get to save a checkpoint after a stop signal before they are killed "
        "(torchrun's shutdown timeout on every backend; Kubernetes' grace period must exceed it).",
    )


class ExportSpec(Strict):
    onnx: bool = Field(False, description="Also export final/ to ONNX, checked against PyTorch with onnxruntime.")
    quantize: Literal["none", "int8"] = Field("none", description="Dynamic int8 quantization of the ONNX model.")


class SlurmSpec(Strict):
    partition: str | None = Field(None, description="Partition; unset takes the profile's for the GPU type.")
    account: str | None = Field(None, description="Account to charge; unset uses the team.")
    qos: str | None = Field(None, description="Quality of service.")
    constraint: str | None = Field(None, description="Node features (--constraint).")
    exclusive: bool = Field(False, description="Whole nodes (--exclusive).")
    max_restarts: int = Field(
        3, ge=0, le=100, description="Requeues after a failure that followed progress (a new checkpoint) before "
        "giving up; preemptions and time-limit requeues do not count, a failure without progress never requeues.")
    max_node_exclusions: int = Field(
        2, ge=0, le=1000, description="Nodes the preflight may find bad and exclude from the next attempt before "
        "the job fails for good.")
    signal_seconds: int = Field(300, ge=10, le=3600, description="Seconds of warning (SIGUSR1) before the time limit.")
    container_runtime: Literal["pyxis", "apptainer", "oci", "none"] | None = Field(
        None, description="How to run the image; unset takes the profile's."
    )
    container_mounts: list[str] = Field(default_factory=list, description="Extra SRC:DST mounts into the container.")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before the job (modules, a venv).")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra #SBATCH options, name -> value.")

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, value: list[str]) -> list[str]:
        return check_setup(value)

    @field_validator("sbatch_args")
    @classmethod
    def _option_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"sbatch option {key!r} is not a long option name (like `mail-type`)")
        return value


def check_setup(lines: list[str]) -> list[str]:
    """Setup lines (spec and cluster profile) run as written: each must be one complete shell line."""
    for i, line in enumerate(lines):
        why = shell_line(line)
        if why:
            raise ValueError(f"setup line {i + 1} {why}")
    return lines


def _k8s_rule(value: str | None, rule: Any) -> str | None:
    why = rule(value) if value is not None else None
    if why:
        raise ValueError(why)
    return value


class Toleration(Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return _k8s_rule(value, label_key)

    @field_validator("value")
    @classmethod
    def _value(cls, value: str | None) -> str | None:
        return _k8s_rule(value, label_value)


def check_node_selector(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        why = label_key(key) or label_value(item)
        if why:
            raise ValueError(f"{key!r}: {item!r}: {why}")
    return value


class K8sSpec(Strict):
    api: Literal["pytorchjob", "trainjob"] = Field("pytorchjob", description="kubeflow.org/v1 PyTorchJob or Trainer's TrainJob.")
    namespace: str = Field("mbl", description="Namespace of the job.")
    queue: str | None = Field(None, description="Kueue LocalQueue; the job is created suspended and admitted by Kueue.")
    priority_class: str | None = Field(None, description="PriorityClass of the pods.")
    service_account: str = Field("mbl-trainer", description="ServiceAccount of the pods.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for pulling the image.")
    pvc: str = Field("mbl-shared", description="ReadWriteMany PersistentVolumeClaim holding run directories.")
    mount_path: str = Field("/shared", description="Where the PVC is mounted in the container.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations.")
    max_restarts: int = Field(
        3, ge=0, le=100, description="Restarts after a failure that followed progress (counted by jobs.launch); "
        "also the PyTorchJob's backoffLimit.")
    ttl_seconds_after_finished: int = Field(7 * 86400, ge=0, description="Delete finished jobs after this long.")
    termination_grace_seconds: int = Field(600, ge=30, description="Time to save a checkpoint on eviction.")

    @field_validator("namespace", "service_account", "pvc")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not DNS_1035.match(value) or len(value) > 63:
            raise ValueError("must be a DNS label: lower-case letters, digits and '-', starting with a letter")
        return value

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:  # a LocalQueue's name, and a label value
        return _k8s_rule(value, queue_name)

    @field_validator("priority_class")
    @classmethod
    def _object_name(cls, value: str | None) -> str | None:
        return _k8s_rule(value, dns_1123_subdomain)

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            why = dns_1123_subdomain(name)
            if why:
                raise ValueError(f"{name!r} {why}")
        return value

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return check_node_selector(value)

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path in the container, like /shared")
        return value


class SecretRef(Strict):
    """A secret is referenced, never inlined: a Kubernetes Secret key, or a file on the cluster."""

    secret: str | None = Field(None, description="Kubernetes Secret name.")
    key: str | None = Field(None, description="Key inside the Secret.")
    file: str | None = Field(None, description="Slurm/local: a file on the cluster whose content is the value.")

    @field_validator("secret")
    @classmethod
    def _secret_name(cls, value: str | None) -> str | None:
        return _k8s_rule(value, dns_1123_subdomain)

    @field_validator("key")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 253 or not CONFIG_KEY.fullmatch(value)):
            raise ValueError("must be a Secret key: at most 253 letters, digits, '-', '_' and '.'")
        return value

    @model_validator(mode="after")
    def _some_source(self) -> "SecretRef":
        if not self.file and not (self.secret and self.key):
            raise ValueError("a secret needs `secret` and `key` (Kubernetes) and/or `file` (Slurm, local)")
        return self


_WANDB_NAME = re.compile(r"[^/\\#?%:]{1,128}")  # what W&B accepts as a project or entity name
# Variables that hold a tracker's credentials: they come from `secrets`, never from `env` (rendered in the clear).
TRACKER_SECRET_VARS = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


class MlflowSpec(Strict):
    """MLflow: one run per run directory, in an experiment; metrics with their step, the spec as params."""

    uri: str | None = Field(
        None, description="Tracking URI: an http(s) server, `databricks`, a `file:///` store or a plain path (a "
        "local file store, offline; a relative path is taken inside the run directory). Unset: MLFLOW_TRACKING_URI "
        "of the job's environment, else a file store in `<run_dir>/mlruns`. Credentials (MLFLOW_TRACKING_TOKEN, "
        "MLFLOW_TRACKING_USERNAME/PASSWORD) come from `secrets`.")
    experiment: str = Field("mbl", min_length=1, max_length=500, description="Experiment name; created when missing.")
    run_name: str | None = Field(None, min_length=1, max_length=250, description="Display name; unset: the job name.")


class WandbSpec(Strict):
    """Weights & Biases: one run per run directory (its id kept in the run directory), resumed by every attempt."""

    project: str = Field("mbl", description="Project name.")
    entity: str | None = Field(None, description="Team or user; unset: the API key's default entity.")
    mode: Literal["online", "offline"] | None = Field(
        None, description="offline writes runs under `dir` only (`wandb sync` uploads them later). Unset: "
        "WANDB_MODE of the job's environment, else online.")
    dir: str | None = Field(
        None, description="Where W&B writes its files (`<dir>/wandb/offline-run-*` when offline); a relative path is "
        "taken inside the run directory. Unset: the run directory.")
    api_key_secret: str | None = Field(
        None, description="The name of the entry of `secrets` that holds the API key (its environment variable, such "
        "as WANDB_API_KEY), never the key itself. Unset: W&B's own lookup (WANDB_API_KEY, ~/.netrc); offline needs "
        "none.")
    run_name: str | None = Field(None, min_length=1, max_length=128, description="Display name; unset: the job name.")

    @field_validator("project", "entity")
    @classmethod
    def _wandb_name(cls, value: str | None) -> str | None:
        if value is not None and not _WANDB_NAME.fullmatch(value):
            raise ValueError("must be 1 to 128 characters, none of / \\ # ? % :")
        return value

    @field_validator("api_key_secret")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an entry of `secrets` (an environment variable name)")
        return value


class TrackingSpec(Strict):
    """Experiment tracking beside metrics.jsonl and TensorBoard, on rank 0 (jobs/tracking.py; the image needs the
    `tracking` extra). Each tracker has one run per run directory: its id derives from the job name, the training
    fingerprint and a token made once in the run directory (tracking.json), never from a cluster job id, so every
    attempt and resume appends to the same run at the steps of metrics.jsonl, and no step is sent twice. A tracker
    that fails warns in the log and is tried again later; training goes on, and the rows it missed are sent
    from metrics.jsonl once it answers."""

    mlflow: MlflowSpec | None = Field(None, description="MLflow tracking; `mlflow: {}` turns it on with the defaults.")
    wandb: WandbSpec | None = Field(None, description="Weights & Biases tracking; `wandb: {}` turns it on.")


class JobSpec(Strict):
    """A ModernBERT job: prepare data, pre-train, or fine-tune."""

    multiline_fields: ClassVar[frozenset[str]] = frozenset({"env"})  # quoted wherever they go

    kind: Kind = Field(description="prepare | pretrain | finetune.")
    name: str = Field(description=f"Job name: a DNS-1035 label of at most {NAME_MAX_LEN} characters.")
    team: str = Field("default", description="Team that owns the job: its Slurm account and GPU quota.")
    image: str | None = Field(None, description="Trainer container image; required by container runtimes and Kubernetes.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    task: TaskSpec | None = Field(None, description="Fine-tuning task; required for a finetune.")
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    k8s: K8sSpec = Field(default_factory=K8sSpec)
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the job (no secrets).")
    secrets: dict[str, SecretRef] = Field(default_factory=dict, description="Environment variables from secrets.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name", "team")
    @classmethod
    def _dns_1035(cls, value: str) -> str:
        if not DNS_1035.match(value):
            raise ValueError(
                "must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and not "
                "ending with '-' (for example mbert-base-pretrain)"
            )
        if len(value) > NAME_MAX_LEN:
            raise ValueError(
                f"is {len(value)} characters; at most {NAME_MAX_LEN} so that derived names "
                f"(`<name>-worker-<n>`, `<name>-spec`) stay valid Kubernetes names"
            )
        return value

    @field_validator("env", "secrets")
    @classmethod
    def _env_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not an environment variable name (letters, digits, '_')")
        return value

    @model_validator(mode="after")
    def _tracker_secrets(self) -> "JobSpec":
        """A tracker's credentials come from `secrets` (referenced), never from `env` (rendered in the clear)."""
        errors = [f"a tracker's credential in env.{name} is written into rendered scripts and objects in the "
                  f"clear; move it to secrets.{name}" for name in TRACKER_SECRET_VARS if name in self.env]
        wandb = self.tracking.wandb
        if wandb is not None and wandb.api_key_secret and wandb.api_key_secret not in self.secrets:
            errors.append("tracking.wandb.api_key_secret names no entry of `secrets`; add secrets.<that name> "
                          "(a file or a Kubernetes Secret holding the key) or unset it")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @model_validator(mode="after")
    def _cross_field(self) -> "JobSpec":
        errors: list[str] = []
        t, d = self.train, self.distributed
        per_step = t.micro_batch_size * d.world_size
        if t.global_batch_size % per_step:
            lower = max(per_step, t.global_batch_size - t.global_batch_size % per_step)
            errors.append(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x world size ({d.nodes} nodes x {d.gpus_per_node} GPUs = {d.world_size}) "
                f"= {per_step}; try {lower} or {lower + per_step}"
            )
        if self.checkpoint.every_steps > t.max_steps:
            errors.append(
                f"checkpoint.every_steps ({self.checkpoint.every_steps}) is larger than train.max_steps "
                f"({t.max_steps}); no checkpoint would be written before the end"
            )
        if self.kind == Kind.finetune.value:
            if not self.model.init_from:
                errors.append("a finetune needs model.init_from: a pre-training run directory or a model folder")
            if self.task is None:
                errors.append("a finetune needs a task: set task.type to one of " + ", ".join(x.value for x in TaskType))
            if not self.data.train:
                errors.append("a finetune needs data.train: jsonl, csv or parquet files")
        elif self.task is not None:
            errors.append(f"task is only used by a finetune; remove it from this {self.kind} job")
        if self.kind == Kind.prepare.value and not self.data.train:
            errors.append("a prepare job needs data.train: the text files to tokenize")
        if self.kind == Kind.pretrain.value and not self.data.train and not self.data.prepared:
            errors.append("a pretrain needs data.prepared (a prepared data folder) or data.train (text files)")
        grace = self.checkpoint.save_grace_seconds + 30
        if self.k8s.termination_grace_seconds < grace:
            errors.append(
                f"k8s.termination_grace_seconds ({self.k8s.termination_grace_seconds}) must exceed "
                f"checkpoint.save_grace_seconds ({self.checkpoint.save_grace_seconds}) by at least 30 s, or Kubernetes "
                f"kills a pod that is still saving; set it to {grace} or more"
            )
        if self.export.quantize != "none" and not self.export.onnx:
            errors.append("export.quantize needs export.onnx: true (the quantized model is an ONNX model)")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    # ---- derived values -------------------------------------------------------------------------

    @property
    def grad_accum(self) -> int:
        """Gradient accumulation steps: global batch / (micro batch x world size)."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.distributed.world_size)

    @property
    def run_dir(self) -> str:
        return self.checkpoint.dir.replace("{name}", self.name)

    @property
    def total_gpus(self) -> int:
        return self.distributed.world_size

    def resolved(self, base: Path | None = None) -> "JobSpec":
        """A copy whose paths are absolute: the run directory, and the data, tokenizer and init_from paths
        (launcher/paths.py); relative ones resolve against `base` (the submit directory) or the CWD."""
        from launcher.paths import resolve_paths

        base = base or Path.cwd()
        run_dir = Path(self.run_dir)
        if not run_dir.is_absolute():
            run_dir = (base / run_dir).resolve()
        data = resolve_paths(self.model_dump(mode="json"), base)
        data["checkpoint"]["dir"] = str(run_dir)
        return JobSpec.model_validate(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def training_fingerprint(self) -> str:
        """Hash of what decides the numbers a run produces; two specs with the same one may share a run dir.

        Where and how the job runs (cluster sections, resources, image, env, where and how often it saves,
        the step budget, logging, the kernels that compute the same math) is left out: changing those is a legitimate reason to resume, and a run
        directory may move.
        """
        data = self.model_dump(mode="json")
        for key in ("slurm", "k8s", "resources", "image", "env", "secrets", "team", "export", "checkpoint",
                    "tracking"):
            data.pop(key, None)
        # The layout (nodes, GPUs per node, micro batch) is left out too: with the same global batch every step
        # reads the same samples, masked the same way (jobs/data.py), and the trainer converts the partitioned
        # state of a checkpoint written by another world size (jobs/checkpoint.py).
        for key in ("max_steps", "log_every_steps", "eval_every_steps", "eval_batches", "deterministic", "compile",
                    "micro_batch_size"):
            data["train"].pop(key, None)
        data["model"].pop("attention", None)
        for key in ("hang_timeout_seconds", "collective_timeout_seconds", "preflight", "preflight_allreduce_mb",
                    "nodes", "gpus_per_node"):
            data["distributed"].pop(key, None)  # the same weights whichever kernels compute them
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (Draft 2020-12), for editors' YAML completion."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/mbl-project/mbl/schemas/jobspec.json"
    schema.setdefault("properties", {})["extends"] = {
        "type": "string",
        "description": "Another spec file this one builds on (deep merge; this file wins).",
    }
    return schema
