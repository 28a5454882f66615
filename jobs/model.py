"""ModernBERT from a preset (+ overrides) or a checkpoint; the pre-training model and the task heads.

`ModernBertForPreTraining` is ModernBertForMaskedLM plus an optional sentence-order-prediction head
(`config.sop_head=True`). Importing this module registers it with `AutoModelForPreTraining`, which
transformers 5.x leaves empty for ModernBERT, so the guide's `AutoModelForPreTraining.from_config(config)`
works again. Its exported folder (`export_mlm`) drops the SOP head and names ModernBertForMaskedLM as the
architecture, so `AutoModelForMaskedLM.from_pretrained(final)` loads it as a plain MLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (AutoModelForPreTraining, ModernBertConfig, ModernBertForMaskedLM,
                          ModernBertForQuestionAnswering, ModernBertForSequenceClassification,
                          ModernBertForTokenClassification)
from transformers.modeling_outputs import MaskedLMOutput

from jobs.errors import DataError
from launcher import contract
from launcher.spec import PRESETS

SOP_HEAD_PREFIX = "sop_head."


def build_config(preset: str, overrides: dict[str, Any], vocab_size: int, special_ids: dict[str, int],
                 max_positions: int) -> ModernBertConfig:
    """A ModernBertConfig from a launcher preset, the tokenizer's ids and the spec's overrides."""
    values = dict(PRESETS[preset])
    values.update(vocab_size=vocab_size, max_position_embeddings=max(max_positions, 128),
                  pad_token_id=special_ids["[PAD]"], cls_token_id=special_ids["[CLS]"],
                  sep_token_id=special_ids["[SEP]"], bos_token_id=special_ids["[CLS]"],
                  eos_token_id=special_ids["[SEP]"])
    values.update(overrides)
    try:
        return ModernBertConfig(**values)
    except (TypeError, ValueError) as exc:
        raise DataError(f"model.config_overrides: {exc}", "use ModernBertConfig field names") from None


class ModernBertForPreTraining(ModernBertForMaskedLM):
    """MLM head, plus a sentence-order head on the first token when `config.sop_head` is true."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        if getattr(config, "sop_head", False):
            self.sop_head = nn.Linear(config.hidden_size, 2)
            nn.init.normal_(self.sop_head.weight, std=config.initializer_range)
            nn.init.zeros_(self.sop_head.bias)

    def forward(self, input_ids=None, attention_mask=None, labels=None, sop_labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        if labels is not None:  # sparse prediction: only the masked positions go through the decoder
            flat = labels.view(-1)
            keep = flat != -100
            logits = self.decoder(self.head(hidden.reshape(flat.shape[0], -1)[keep]))
            mlm_loss = nn.functional.cross_entropy(logits.float(), flat[keep])
        else:
            logits = self.decoder(self.head(hidden))
            mlm_loss = None
        loss = mlm_loss
        out = MaskedLMOutput(loss=loss, logits=logits)
        if hasattr(self, "sop_head"):
            sop_logits = self.sop_head(hidden[:, 0])
            out["sop_logits"] = sop_logits
            if sop_labels is not None:
                sop_loss = nn.functional.cross_entropy(sop_logits.float(), sop_labels)
                out["sop_loss"] = sop_loss
                out["mlm_loss"] = mlm_loss
                out["loss"] = mlm_loss + sop_loss if mlm_loss is not None else sop_loss
        return out


AutoModelForPreTraining.register(ModernBertConfig, ModernBertForPreTraining, exist_ok=True)

TASK_CLASSES = {
    "classification": ModernBertForSequenceClassification,
    "token-classification": ModernBertForTokenClassification,
    "question-answering": ModernBertForQuestionAnswering,
}


def set_attention(model, spec):
    """model.attention on a built model; a kernel this image lacks is a DataError naming the field."""
    wanted = spec.model.attention
    if model.config._attn_implementation != wanted:
        try:
            model.set_attn_implementation(wanted)
        except (ImportError, ValueError) as exc:
            raise DataError(f"model.attention={wanted}: {str(exc).splitlines()[0]}",
                            "install flash-attn in the image, or set model.attention: sdpa") from None
    return model


def pretrain_model(spec, vocab_size: int, special_ids: dict[str, int]) -> ModernBertForPreTraining:
    """A fresh pre-training model from the preset, or weights from model.init_from."""
    torch.manual_seed(spec.train.seed)
    if spec.model.init_from:
        folder = resolve_init(spec.model.init_from)
        model = ModernBertForPreTraining.from_pretrained(str(folder))
        if spec.data.objective == "mlm+sop" and not hasattr(model, "sop_head"):
            model.config.sop_head = True
            model.sop_head = nn.Linear(model.config.hidden_size, 2)
        return set_attention(model, spec)
    config = build_config(spec.model.preset, spec.model.config_overrides, vocab_size, special_ids, spec.data.seq_len)
    config.sop_head = spec.data.objective == "mlm+sop"
    config.architectures = ["ModernBertForMaskedLM"]
    return set_attention(ModernBertForPreTraining(config), spec)


def resolve_init(path: str | Path) -> Path:
    """model.init_from -> a Hugging Face folder: a run directory's final/, or the folder itself."""
    path = Path(path)
    if (path / contract.SPEC_FILE).exists() or (path / contract.CHECKPOINTS_DIR).exists():
        final = path / contract.FINAL_DIR
        if not (final / "config.json").exists():
            raise DataError(f"model.init_from={path} is a run directory without {contract.FINAL_DIR}/ "
                            "(the pre-training has not finished)",
                            "wait for the run to finish, or point model.init_from at a model folder")
        return final
    if (path / "config.json").exists():
        return path
    if (path / contract.FINAL_DIR / "config.json").exists():
        return path / contract.FINAL_DIR
    raise DataError(f"model.init_from={path}: neither a run directory with {contract.FINAL_DIR}/ nor a model "
                    "folder with config.json", "point it at a finished pre-training run or a Hugging Face folder")


def task_model(spec, init: Path, num_labels: int, id2label: dict[int, str]):
    """A task model with the encoder from `init` and a fresh head."""
    import transformers

    cls = TASK_CLASSES[spec.task.type]
    torch.manual_seed(spec.train.seed)
    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    model = cls.from_pretrained(str(init), num_labels=num_labels, id2label=id2label,
                                label2id={v: k for k, v in id2label.items()})
    transformers.logging.set_verbosity_warning()
    return set_attention(model, spec)


def mlm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a plain ModernBertForMaskedLM has (the SOP head dropped)."""
    return {k: v for k, v in state.items() if not k.startswith(SOP_HEAD_PREFIX)}


def export_mlm(state: dict[str, torch.Tensor], config: ModernBertConfig, out: Path) -> None:
    """Save pre-training weights as a plain ModernBertForMaskedLM folder (config + safetensors)."""
    cfg = ModernBertConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "sop_head"})
    cfg.architectures = ["ModernBertForMaskedLM"]
    model = ModernBertForMaskedLM(cfg)
    missing, unexpected = model.load_state_dict(mlm_state_dict(state), strict=False)
    missing = [m for m in missing if m != "decoder.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(out))
