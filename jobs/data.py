"""Corpus -> tokenizer -> packed token shards, and the vectorized MLM (+SOP) batcher that reads them.

Prepared data folder (`<run_dir>/data`, the output of `kind: prepare`):

    index.json            counts, dtype, seq_len, tokenizer sha256, per-shard sha256
    tokenizer/            a Hugging Face tokenizer folder (tokenizer.json + config)
    train-00000.bin ...   packed sequences, row-major (sequences x seq_len), uint16 or uint32
    heldout-00000.bin     the held-out documents, packed the same way
    COMPLETE              written last; a folder without it is prepared again

Reading is O(1) in the position: sample `g` of the stream is row `perm_{g // N}[g % N]`, where `perm_e`
is a seeded permutation of the N sequences for epoch `e`. A resumed job computes its next rows from the
step alone and never replays the loader. Masking (and SOP's swap) is a hash of (seed, sample position, token
position): a resumed job masks exactly as the uninterrupted one would have, on any number of ranks and any
micro batch size, since sample g is the same masked sequence whichever rank reads it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from jobs.errors import DataError
from launcher import contract

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]  # the names ModernBERT's tokenizer uses
INDEX_FILE = "index.json"
TOKENIZER_DIR = "tokenizer"
SHARD_SEQUENCES = 1 << 16  # sequences per shard file


# ---- reading text ---------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files and folders named by `patterns` (globs allowed); DataError when one matches nothing."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matches = [m for m in matches if Path(m).exists()]
        if not matches:
            raise DataError(f"input {pattern!r} does not exist (cwd: {os.getcwd()})",
                            "check data.train / data.validation / data.test; relative paths resolve against the "
                            "directory the job starts in")
        out.extend(Path(m) for m in matches)
    return out


def _column(rows: list[dict], field: str, source: Path) -> list:
    if rows and field not in rows[0]:
        raise DataError(f"{source}: no column {field!r}; columns: {', '.join(sorted(rows[0]))}",
                        "set data.text_field (or data.label_field) to the column holding it")
    return [r[field] for r in rows]


def read_texts(paths: list[Path], text_field: str) -> Iterator[str]:
    """Documents from .txt (one per line), .jsonl/.json, .csv, .parquet files or a `datasets` folder."""
    for path in paths:
        suffix = path.suffix.lower()
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure here is a user-data problem
                raise DataError(f"{path}: not a `datasets` folder saved with save_to_disk ({exc})")
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            if text_field not in ds.column_names:
                raise DataError(f"{path}: no column {text_field!r}; columns: {', '.join(ds.column_names)}",
                                "set data.text_field")
            yield from (t for t in ds[text_field] if t)
        elif suffix == ".txt":
            with path.open(encoding="utf-8") as f:
                yield from (line.strip() for line in f if line.strip())
        elif suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if text_field not in row:
                        raise DataError(f"{path}:{n}: no field {text_field!r}; fields: {', '.join(sorted(row))}",
                                        "set data.text_field to the field holding the text")
                    if row[text_field]:
                        yield row[text_field]
        elif suffix == ".csv":
            import csv

            with path.open(encoding="utf-8", newline="") as f:
                yield from (t for t in _column(list(csv.DictReader(f)), text_field, path) if t)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path}: no column {text_field!r}; columns: {', '.join(table.column_names)}",
                                "set data.text_field")
            yield from (t for t in table.column(text_field).to_pylist() if t)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}",
                            "use .txt, .jsonl, .csv, .parquet or a `datasets` folder")


# ---- tokenizer ------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer with ModernBERT's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),  # offsets without the leading space (QA spans)
        processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)]),
    ])
    return wrap_tokenizer(tok, max_length)


def wrap_tokenizer(tok, max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_max_length=max_length, add_prefix_space=True)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise DataError(f"{folder}: no tokenizer (tokenizer.json) in this folder", "set data.tokenizer to a "
                        "tokenizer folder, or leave it unset to train one")
    return AutoTokenizer.from_pretrained(str(folder))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- packing --------------------------------------------------------------------------------------


def job_cpus() -> int:
    """The CPUs this process was given: its affinity (Slurm's cpuset) capped by a cgroup v2 CPU quota
    (a Kubernetes limit), not the node's core count that thread pools see by default."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def size_tokenizer_threads() -> int:
    """The tokenizers library's Rust thread pool sized to job_cpus() (set before its first parallel call; a
    value the user set wins). Returns the thread count."""
    n = job_cpus()
    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        os.environ.setdefault(var, str(n))
    return int(os.environ["RAYON_NUM_THREADS"])


def _pack(tokenizer, docs: list[str], seq_len: int, dtype: np.dtype, batch: int = 2048) -> np.ndarray:
    """[CLS] doc [SEP] [CLS] doc [SEP] ... cut into rows of seq_len (the ragged tail is dropped)."""
    backend = tokenizer.backend_tokenizer
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), batch):
        # encode_batch runs on the Rust side's thread pool: every CPU of the job (size_tokenizer_threads).
        for enc in backend.encode_batch(docs[start:start + batch], add_special_tokens=False):
            pieces.append(np.asarray([cls, *enc.ids, sep], dtype=dtype))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)


def _write_split(out: Path, split: str, rows: np.ndarray) -> dict:
    shards = []
    for i, start in enumerate(range(0, max(len(rows), 1), SHARD_SEQUENCES)):
        part = np.ascontiguousarray(rows[start:start + SHARD_SEQUENCES])
        path = out / f"{split}-{i:05d}.bin"
        with open(path, "wb") as f:
            part.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        shards.append({"file": path.name, "sequences": int(len(part)), "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    return {"sequences": int(len(rows)), "tokens": int(rows.size), "shards": shards}


def prepare(spec, out: Path, log=print) -> dict:
    """Tokenize and pack `spec.data.train` into `out`; returns the index. Deterministic for a seed."""
    d = spec.data
    threads = size_tokenizer_threads()
    out.mkdir(parents=True, exist_ok=True)
    (out / contract.COMPLETE_MARKER).unlink(missing_ok=True)
    docs = list(read_texts(expand_inputs(d.train), d.text_field))
    if not docs:
        raise DataError(f"data.train ({', '.join(d.train)}) holds no text", "check data.text_field and the files")
    rng = random.Random(spec.train.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs = [docs[i] for i in order]
    n_held = max(1, int(round(len(docs) * d.heldout_fraction)))
    held, train = docs[:n_held], docs[n_held:]
    if d.tokenizer:
        tokenizer = load_tokenizer(d.tokenizer)
    else:
        log(f"training a BPE tokenizer (vocab {d.vocab_size}) on {len(train)} documents, {threads} threads")
        tokenizer = train_tokenizer(train, d.vocab_size, d.seq_len)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)
    index = {
        "format": 1, "seq_len": d.seq_len, "dtype": dtype.name, "vocab_size": vocab, "seed": spec.train.seed,
        "tokenizer_sha256": file_sha256(out / TOKENIZER_DIR / "tokenizer.json"),
        "documents": {"train": len(train), "heldout": len(held)},
        "special_ids": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "splits": {},
    }
    for split, split_docs in (("train", train), ("heldout", held)):
        rows = _pack(tokenizer, split_docs, d.seq_len, dtype)
        if split == "heldout" and len(rows) == 0:  # tiny corpora: take a few train rows' worth of documents
            rows = _pack(tokenizer, train[: max(8, len(train) // 50)], d.seq_len, dtype)
        index["splits"][split] = _write_split(out, split, rows)
    if index["splits"]["train"]["sequences"] == 0:
        raise DataError(f"the corpus is shorter than one sequence of data.seq_len={d.seq_len} tokens",
                        "add text or lower data.seq_len")
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX_FILE)
    (out / contract.COMPLETE_MARKER).write_text("ok\n")
    log(f"prepared {out}: {index['splits']['train']['sequences']} train / "
        f"{index['splits']['heldout']['sequences']} held-out sequences of {d.seq_len} tokens ({dtype.name})")
    return index


def is_prepared(folder: Path) -> bool:
    return (folder / contract.COMPLETE_MARKER).exists() and (folder / INDEX_FILE).exists()


def resolve_prepared(path: str | Path) -> Path:
    """A prepare run directory or its data/ folder -> the data folder."""
    path = Path(path)
    for cand in (path, path / contract.DATA_DIR):
        if is_prepared(cand):
            return cand
    raise DataError(f"{path}: not a complete prepared data folder (no {INDEX_FILE} and {contract.COMPLETE_MARKER})",
                    "point data.prepared at the run directory of a finished `kind: prepare` job")


# ---- reading packed data --------------------------------------------------------------------------


class PackedDataset:
    """Memory-mapped packed sequences of one split; rows(indices) gathers any rows in O(len(indices))."""

    def __init__(self, folder: Path, split: str):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / INDEX_FILE).read_text())
        info = self.index["splits"][split]
        self.seq_len = self.index["seq_len"]
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.folder / s["file"], dtype=dtype, mode="r").reshape(-1, self.seq_len)
                       for s in info["shards"] if s["sequences"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n

    def rows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        for i, (s, g) in enumerate(zip(shard, indices)):
            out[i] = self.shards[s][g - self.starts[s]]
        return out


class SampleOrder:
    """Sample g of an endless stream -> a row, through a seeded permutation per epoch (O(1) to seek)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, g: np.ndarray) -> np.ndarray:
        epochs = g // self.n
        out = np.empty_like(g)
        for e in np.unique(epochs):
            if e != self._epoch:
                self._epoch, self._perm = int(e), np.random.default_rng([self.seed, int(e)]).permutation(self.n)
            sel = epochs == e
            out[sel] = self._perm[g[sel] % self.n]
        return out


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic, in place where it can): a counter-based
    hash, vectorized."""
    x = x + _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def sample_uniforms(seed: int, samples: np.ndarray, length: int, stream: int,
                    pair: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Uniform floats in [0, 1) with 24 random bits, shape (len(samples), length): element (i, j) depends only on
    (seed, samples[i], j, stream), never on which rank or micro batch reads sample i. pair=True: two
    independent arrays from the high and the low bits of the same hashes (one hash per element for both)."""
    with np.errstate(over="ignore"):
        row = _mix(_mix(np.uint64(seed) ^ (np.uint64(stream) << np.uint64(56))) ^ samples.astype(np.uint64))
        bits = _mix(row[:, None] + np.arange(length, dtype=np.uint64)[None, :] * _GOLDEN)
    scale = np.float32(1.0 / (1 << 24))
    high = torch.from_numpy((bits >> np.uint64(40)).astype(np.float32) * scale)
    if not pair:
        return high
    return high, torch.from_numpy((bits & np.uint64(0xFFFFFF)).astype(np.float32) * scale)


def mask_tokens(ids: torch.Tensor, r: torch.Tensor, pick: torch.Tensor, mask_prob: float, mask_id: int,
                vocab_size: int, special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM masking of a whole batch at once, from uniforms `r` (which tokens) and `pick` (their random
    replacement), both shaped like `ids`: mask_prob of the non-special tokens become targets; of those 80% ->
    [MASK], 10% -> a random token, 10% unchanged. Labels are -100 everywhere else."""
    r = r.masked_fill(special[ids], 2.0)  # special tokens are never targets
    target = r < mask_prob
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    inputs = ids.masked_fill(r < mask_prob * 0.8, mask_id)
    rand_pos = (r >= mask_prob * 0.8) & (r < mask_prob * 0.9)
    random_ids = (pick * vocab_size).long().clamp_(max=vocab_size - 1)
    return torch.where(rand_pos, random_ids, inputs), labels


def sop_swap(ids: torch.Tensor, coin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence-order prediction: keep token 0, swap the two halves of the rest in the rows whose `coin`
    (a uniform per row) is below 0.5 (label 1 = swapped). Vectorized over the batch."""
    b, L = ids.shape
    h = (L - 1) // 2
    labels = (coin < 0.5).long()
    swapped = ids.clone()
    swapped[:, 1:1 + h], swapped[:, 1 + h:1 + 2 * h] = ids[:, 1 + h:1 + 2 * h], ids[:, 1:1 + h]
    return torch.where(labels[:, None].bool(), swapped, ids), labels


@dataclass
class MLMBatcher:
    """Micro batches of one rank: rows by seeded order, MLM masking (+SOP) seeded by position."""

    data: PackedDataset
    micro: int
    rank: int
    world: int
    accum: int
    seed: int
    mask_prob: float
    sop: bool = False
    shuffle: bool = True

    def __post_init__(self):
        ix = self.data.index
        self.vocab_size = ix["vocab_size"]
        self.mask_id = ix["special_ids"]["[MASK]"]
        self.special = torch.zeros(max(self.vocab_size, 1 << 16 if ix["dtype"] == "uint16" else self.vocab_size),
                                   dtype=torch.bool)
        for name in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
            self.special[ix["special_ids"][name]] = True
        self.order = SampleOrder(len(self.data), self.seed) if self.shuffle else (lambda g: g % len(self.data))

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def sample_ids(self, step: int, micro_idx: int) -> np.ndarray:
        """Stream positions of this rank's rows for (step, micro batch): disjoint across ranks."""
        start = step * self.global_batch + (micro_idx * self.world + self.rank) * self.micro
        return np.arange(start, start + self.micro, dtype=np.int64)

    def batch(self, step: int, micro_idx: int) -> dict[str, torch.Tensor]:
        g = self.sample_ids(step, micro_idx)
        ids = torch.from_numpy(self.data.rows(self.order(g)))
        out: dict[str, torch.Tensor] = {}
        if self.sop:
            ids, out["sop_labels"] = sop_swap(ids, sample_uniforms(self.seed, g, 1, 2)[:, 0])
        L = ids.shape[1]
        out["input_ids"], out["labels"] = mask_tokens(ids, *sample_uniforms(self.seed, g, L, 0, pair=True),
                                                      self.mask_prob, self.mask_id, self.vocab_size, self.special)
        out["attention_mask"] = torch.ones_like(ids)
        return out

    def position(self, step: int) -> dict:
        """What a checkpoint records: the next stream position this rank reads."""
        return {"rank": self.rank, "next_sample": int(self.sample_ids(step, 0)[0]), "epoch": int(
            step * self.global_batch // max(len(self.data), 1))}
