"""Fine-tuning data: classification, token classification (NER) and extractive QA, read through `datasets`.

Each task turns rows into features (token ids + targets), collates them into padded batches, and turns
model outputs back into the task's metric. Evaluation is sharded over ranks with equal batch counts
(ZeRO-3 needs every rank in every forward) and the outputs are gathered to every rank.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jobs import evaluate
from jobs.data import expand_inputs
from jobs.errors import DataError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(paths: list[str], cache_dir: Path) -> "datasets.Dataset":  # noqa: F821
    import datasets

    files = [str(p) for p in expand_inputs(paths)]
    kinds = {LOADERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"fine-tuning inputs must be all .jsonl, all .csv or all .parquet (got {', '.join(files)})")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train", cache_dir=str(cache_dir))


def need(ds, column: str, what: str, paths: list[str]) -> None:
    if column not in ds.column_names:
        raise DataError(f"{', '.join(paths)}: no column {column!r} ({what}); columns: {', '.join(ds.column_names)}",
                        f"set data.{'label_field' if 'label' in what or 'tag' in what else 'text_field'}")


class Task:
    """Rows -> features -> batches -> metrics for one task type."""

    def __init__(self, spec, tokenizer, splits: dict[str, "datasets.Dataset"]):  # noqa: F821
        self.spec, self.tok, self.d = spec, tokenizer, spec.data
        self.type = spec.task.type
        self.rows = splits
        self.labels = self._labels()
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        self.features = {name: self.featurize(ds, train=name == "train") for name, ds in splits.items()}

    # ---- labels and features ----------------------------------------------------------------------

    def _labels(self) -> list[str]:
        if self.type == "question-answering":
            return []
        if self.spec.task.labels:
            return list(self.spec.task.labels)
        train = self.rows["train"]
        need(train, self.d.label_field, "labels / tags", self.d.train)
        column = list(train[self.d.label_field])
        values = {t for tags in column for t in tags} if self.type == "token-classification" else set(column)
        labels = sorted(str(v) for v in values)
        if self.type == "token-classification" and "O" in labels:
            labels.remove("O")
            labels.insert(0, "O")
        if self.spec.task.num_labels and self.spec.task.num_labels != len(labels):
            raise DataError(f"task.num_labels is {self.spec.task.num_labels} but the training data has "
                            f"{len(labels)} labels ({', '.join(labels)})", "fix task.num_labels or leave it unset")
        return labels

    def _label_id(self, value) -> int:
        key = str(value)
        if key not in self.label2id:
            raise DataError(f"label {key!r} is not among the training labels ({', '.join(self.labels)})",
                            "set task.labels to every label, or fix the data")
        return self.label2id[key]

    def featurize(self, ds, train: bool) -> list[dict]:
        d, ml = self.d, self.d.max_length
        if self.type == "classification":
            need(ds, d.text_field, "text", d.train)
            pair = list(ds[d.text_pair_field]) if d.text_pair_field else None
            enc = self.tok(list(ds[d.text_field]), pair, truncation=True, max_length=ml)
            labels = [self._label_id(v) for v in list(ds[d.label_field])]
            return [{"input_ids": ids, "labels": y, "example": i} for i, (ids, y) in enumerate(zip(enc["input_ids"], labels))]
        if self.type == "token-classification":
            need(ds, d.text_field, "a list of words", d.train)
            enc = self.tok([list(w) for w in ds[d.text_field]], is_split_into_words=True, truncation=True, max_length=ml)
            out = []
            for i, tags in enumerate(list(ds[d.label_field])):
                words = enc.word_ids(i)
                labels, prev = [], None
                for w in words:  # label on the first sub-token of each word
                    labels.append(self._label_id(tags[w]) if w is not None and w != prev else -100)
                    prev = w
                out.append({"input_ids": enc["input_ids"][i], "labels": labels, "example": i, "word_ids": words})
            return out
        for col in ("question", "context", "answers"):
            need(ds, col, "SQuAD-style question answering", d.train)
        enc = self.tok(list(ds["question"]), list(ds["context"]), truncation="only_second", max_length=ml, stride=d.doc_stride,
                       return_overflowing_tokens=True, return_offsets_mapping=True)
        out = []
        for f, ex in enumerate(enc["overflow_to_sample_mapping"]):
            seq = enc.sequence_ids(f)
            offsets = [o if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq)]
            answers = ds[ex]["answers"]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            ctx = [i for i, o in enumerate(offsets) if o is not None]
            s = e = 0  # the answer is not in this window: point at [CLS]
            if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
                s = next(i for i in ctx if offsets[i][1] > start_char)
                e = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
            out.append({"input_ids": enc["input_ids"][f], "start_positions": s, "end_positions": e,
                        "example": ex, "offsets": offsets})
        return out

    # ---- batches ----------------------------------------------------------------------------------

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tok.pad_token_id
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), pad, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.type == "classification":
            batch["labels"] = torch.tensor([f["labels"] for f in feats])
        elif self.type == "token-classification":
            labels = torch.full((len(feats), width), -100, dtype=torch.long)
            for i, f in enumerate(feats):
                labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
            batch["labels"] = labels
        else:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in feats])
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in feats])
        return batch

    # ---- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model, split: str, micro: int, rank: int, world: int, device) -> dict:
        """Metrics of `model` (on `device`) on a split; every rank takes part and gets the same result. Batches
        are built on the host and moved to the device; each batch's outputs come back to the host as numpy."""
        from jobs.device import to_device

        feats = self.features[split]
        per_rank = -(-len(feats) // world)
        mine = list(range(rank, len(feats), world))
        mine += [mine[0] if mine else 0] * (per_rank - len(mine))  # padding, dropped below
        was_training = model.training
        model.eval()
        outputs, loss_n = [], 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, per_rank, micro):
            idx = mine[start:start + micro]
            out = model(**to_device(self.collate([feats[i] for i in idx]), device))
            real = [j for j, i in enumerate(idx) if start + j < len(range(rank, len(feats), world))]
            loss_sum += out.loss.double() * len(real)
            loss_n += len(real)
            if self.type == "question-answering":
                starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
                outputs += [(idx[j], starts[j], ends[j]) for j in real]
            else:
                preds = out.logits.float().argmax(-1).cpu().numpy()
                outputs += [(idx[j], preds[j]) for j in real]
        if was_training:
            model.train()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (outputs, loss_sum.item(), loss_n))
        merged = sorted((o for part in gathered for o in part[0]), key=lambda o: o[0])
        metrics = self.metrics(split, merged)
        metrics["loss"] = sum(p[1] for p in gathered) / max(1, sum(p[2] for p in gathered))
        return metrics

    def metrics(self, split: str, outputs: list) -> dict:
        feats, rows = self.features[split], self.rows[split]
        if self.type == "classification":
            preds = [int(o[1]) for o in outputs]
            gold = [feats[o[0]]["labels"] for o in outputs]
            return evaluate.classification_metrics(preds, gold, len(self.labels))
        if self.type == "token-classification":
            pred_seqs, gold_seqs = [], []
            for i, pred in outputs:
                f, tags = feats[i], rows[feats[i]["example"]][self.d.label_field]
                words = ["O"] * len(tags)
                prev = None
                for pos, w in enumerate(f["word_ids"]):
                    if w is not None and w != prev:
                        words[w] = self.labels[int(pred[pos])]
                    prev = w
                pred_seqs.append(words)
                gold_seqs.append([str(t) for t in tags])
            return evaluate.entity_metrics(pred_seqs, gold_seqs)
        best: dict[int, tuple[float, str]] = {}
        for i, start_logits, end_logits in outputs:
            f = feats[i]
            context = rows[f["example"]]["context"]
            offsets = f["offsets"]
            for s in np.argsort(start_logits)[::-1][:20]:
                for e in np.argsort(end_logits)[::-1][:20]:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s > 30:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if f["example"] not in best or score > best[f["example"]][0]:
                        best[f["example"]] = (score, context[offsets[s][0]:offsets[e][1]])
        preds = {str(ex): text for ex, (_, text) in best.items()}
        refs = {str(ex): rows[ex]["answers"]["text"] for ex in sorted({feats[o[0]]["example"] for o in outputs})}
        return evaluate.qa_metrics(preds, refs)

    def baseline(self, split: str) -> dict:
        """A trivial predictor's metrics: the majority class; all-O tags; the first context word."""
        feats, rows = self.features[split], self.rows[split]
        if self.type == "classification":
            gold = [f["labels"] for f in feats]
            majority = collections.Counter(f["labels"] for f in self.features["train"]).most_common(1)[0][0]
            return evaluate.classification_metrics([majority] * len(gold), gold, len(self.labels))
        if self.type == "token-classification":
            gold = [[str(t) for t in r[self.d.label_field]] for r in rows]
            return evaluate.entity_metrics([["O"] * len(g) for g in gold], gold)
        preds = {str(i): r["context"].split()[0] for i, r in enumerate(rows)}
        return evaluate.qa_metrics(preds, {str(i): r["answers"]["text"] for i, r in enumerate(rows)})
