"""Metrics: MLM loss/perplexity, accuracy and macro F1, entity-level F1 (BIO), SQuAD exact match and F1.

Pure functions on plain Python/numpy values, so they are easy to test and to reuse outside training.
"""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def macro_f1(preds, labels, num_labels: int) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    scores = []
    for c in range(num_labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(preds, labels, num_labels: int) -> dict:
    return {"accuracy": accuracy(preds, labels), "f1": macro_f1(preds, labels, num_labels)}


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO sequence; an I- without a matching B- starts a new entity."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag == "O" or tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind):
            if kind is not None:
                spans.add((kind, start, i))
            start, kind = (i, tag[2:]) if tag != "O" else (None, None)
    return spans


def entity_metrics(pred_seqs: list[list[str]], gold_seqs: list[list[str]]) -> dict:
    tp = fp = fn = 0
    for pred, gold in zip(pred_seqs, gold_seqs):
        p, g = entities(pred), entities(gold)
        tp, fp, fn = tp + len(p & g), fp + len(p - g), fn + len(g - p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """SQuAD exact match and token F1 of one prediction against its gold answers (max over answers)."""
    em = f1 = 0.0
    pred_tokens = _normalize(prediction).split()
    for answer in answers:
        gold_tokens = _normalize(answer).split()
        em = max(em, float(pred_tokens == gold_tokens))
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        same = sum(common.values())
        if same:
            p, r = same / len(pred_tokens), same / len(gold_tokens)
            f1 = max(f1, 2 * p * r / (p + r))
    return em, f1


def qa_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    scores = [qa_scores(predictions.get(k, ""), refs) for k, refs in references.items()]
    if not scores:
        return {"exact_match": 0.0, "f1": 0.0}
    return {"exact_match": float(np.mean([s[0] for s in scores])), "f1": float(np.mean([s[1] for s in scores]))}
