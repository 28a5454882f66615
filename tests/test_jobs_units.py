"""Fast unit tests of the trainer's parts (no training, no torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import data as D
from jobs import evaluate as E
from jobs.checkpoint import MANIFEST_FILE, verify
from launcher import contract
from launcher.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, **data) -> JobSpec:
    return JobSpec.model_validate({
        "kind": "prepare", "name": "unit",
        "data": {"train": [str(REPO / "examples/data/corpus.txt")], "vocab_size": 512, "seq_len": 64, **data},
        "train": {"max_steps": 1, "global_batch_size": 1, "micro_batch_size": 1},
        "checkpoint": {"dir": str(tmp_path), "every_steps": 1},
    })


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "data"
    D.prepare(tiny_spec(out), out, log=lambda m: None)
    return out


def test_prepare_is_deterministic_and_indexed(prepared, tmp_path):
    again = tmp_path / "data"
    D.prepare(tiny_spec(again), again, log=lambda m: None)
    a, b = json.loads((prepared / D.INDEX_FILE).read_text()), json.loads((again / D.INDEX_FILE).read_text())
    assert a == b
    assert a["dtype"] == "uint16" and a["vocab_size"] <= 512
    shard = a["splits"]["train"]["shards"][0]
    assert D.file_sha256(prepared / shard["file"]) == shard["sha256"]
    assert (prepared / contract.COMPLETE_MARKER).exists()
    rows = D.PackedDataset(prepared, "train").rows(np.arange(4))
    cls, sep = a["special_ids"]["[CLS]"], a["special_ids"]["[SEP]"]
    assert (rows == cls).any() and (rows == sep).any()  # document boundaries are marked


def test_user_data_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.expand_inputs([str(tmp_path / "missing.txt")])
    f = tmp_path / "x.jsonl"
    f.write_text('{"body": "hello"}\n')
    with pytest.raises(D.DataError, match="no field 'text'"):
        list(D.read_texts([f], "text"))


def uniforms(ids: torch.Tensor, seed: int = 0, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.arange(first, first + ids.shape[0], dtype=np.int64)
    return D.sample_uniforms(seed, g, ids.shape[1], 0, pair=True)


def test_masking_rates_and_specials():
    special = torch.zeros(1000, dtype=torch.bool)
    special[:5] = True
    ids = torch.randint(5, 1000, (64, 512))
    ids[:, 0] = 1  # a special token that must never be a target
    inputs, labels = D.mask_tokens(ids, *uniforms(ids), 0.3, 4, 1000, special)
    target = labels != -100
    assert not target[:, 0].any()
    assert abs(target[:, 1:].float().mean().item() - 0.3) < 0.01
    masked = (inputs == 4) & target
    kept = (inputs == ids) & target
    assert abs(masked.sum().item() / target.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / target.sum().item() - 0.1) < 0.02  # ~10% unchanged (+ chance random hits)
    assert torch.equal(labels[target], ids[target])
    randomized = target & (inputs != 4) & (inputs != ids)
    assert inputs[randomized].min() >= 0 and inputs[randomized].max() < 1000
    assert inputs[randomized].unique().numel() > 500  # random replacements spread over the vocabulary


def test_uniforms_depend_on_the_sample_not_on_the_batch():
    """Sample g's uniforms are the same whichever batch (rank, micro batch) holds it; streams and seeds differ."""
    a = D.sample_uniforms(3, np.arange(0, 8), 64, 0)
    b = D.sample_uniforms(3, np.array([5, 6, 7]), 64, 0)
    assert torch.equal(a[5:], b)
    assert a.min() >= 0 and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.05
    assert not torch.equal(a, D.sample_uniforms(3, np.arange(0, 8), 64, 1))
    assert not torch.equal(a, D.sample_uniforms(4, np.arange(0, 8), 64, 0))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[:, 0], a[:, 1])
    high, low = D.sample_uniforms(3, np.arange(0, 8), 64, 0, pair=True)
    assert torch.equal(high, a) and abs(low.mean().item() - 0.5) < 0.05
    assert abs(torch.corrcoef(torch.stack([high.flatten(), low.flatten()]))[0, 1].item()) < 0.05
    u = D.sample_uniforms(0, np.arange(20000), 16, 0).flatten()
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - u.numel() / 10).abs().max() < 0.02 * u.numel() / 10  # flat within 2%


def test_sop_swaps_half():
    ids = torch.arange(33).repeat(1000, 1)
    out, labels = D.sop_swap(ids, D.sample_uniforms(0, np.arange(1000), 1, 2)[:, 0])
    assert 0.45 < labels.float().mean() < 0.55
    assert torch.equal(out[labels == 0], ids[labels == 0])
    swapped = out[labels == 1][0]
    assert swapped[0] == 0 and swapped[1] == 17 and swapped[17] == 1


def test_seek_is_position_only(prepared):
    """A batch depends only on (step, micro, rank): a fresh batcher at step 7 == one that read 0..7."""
    ds = D.PackedDataset(prepared, "train")
    a = D.MLMBatcher(ds, 4, 1, 2, 2, 0, 0.3)
    for step in range(7):
        a.batch(step, 0), a.batch(step, 1)
    b = D.MLMBatcher(ds, 4, 1, 2, 2, 0, 0.3)
    for key in ("input_ids", "labels"):
        assert torch.equal(a.batch(7, 1)[key], b.batch(7, 1)[key])
    # ranks read disjoint rows
    r0 = set(D.MLMBatcher(ds, 4, 0, 2, 2, 0, 0.3).sample_ids(3, 0)) | set(D.MLMBatcher(ds, 4, 0, 2, 2, 0, 0.3).sample_ids(3, 1))
    r1 = set(b.sample_ids(3, 0)) | set(b.sample_ids(3, 1))
    assert not r0 & r1 and len(r0 | r1) == 16


def test_the_samples_of_a_step_do_not_depend_on_the_layout(prepared):
    """Global batch 16 as 4 ranks x micro 4, 2 ranks x micro 4 x accum 2, 1 rank x micro 8 x accum 2, 1 rank x
    micro 16: each step reads the same samples, masked (and SOP-swapped) the same way, whoever reads them."""
    ds = D.PackedDataset(prepared, "train")

    def step_rows(world: int, micro: int, accum: int, step: int) -> dict[int, tuple]:
        rows = {}
        for rank in range(world):
            b = D.MLMBatcher(ds, micro, rank, world, accum, 0, 0.3, sop=True)
            for m in range(accum):
                batch = b.batch(step, m)
                for i, g in enumerate(b.sample_ids(step, m)):
                    assert int(g) not in rows  # no sample twice in a step
                    rows[int(g)] = tuple(batch[k][i].tolist() for k in ("input_ids", "labels", "sop_labels"))
        return rows

    for step in (0, 5, 200):  # 200: past the end of the first epoch
        layouts = [step_rows(*layout, step) for layout in ((4, 4, 1), (2, 4, 2), (1, 8, 2), (1, 16, 1))]
        assert sorted(layouts[0]) == list(range(step * 16, step * 16 + 16))
        assert all(other == layouts[0] for other in layouts[1:])


def test_metrics():
    assert E.entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    m = E.entity_metrics([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    assert m["precision"] == 0.5 and m["recall"] == 0.5
    assert E.qa_scores("the Paris", ["paris"]) == (1.0, 1.0)
    assert E.qa_scores("new york city", ["new york"])[1] == pytest.approx(0.8)
    assert E.macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_schedules():
    from jobs.runtime import lr_lambda

    def spec(schedule):
        s = tiny_spec(Path("/tmp/x"))
        return s.model_copy(update={"train": s.train.model_copy(update={"schedule": schedule, "warmup_steps": 10,
                                                                       "max_steps": 100})})

    lin, cos, wsd = (lr_lambda(spec(s), 100) for s in ("linear", "cosine", "wsd"))
    assert lin(0) == pytest.approx(0.1) and lin(9) == 1.0 and lin(55) == pytest.approx(0.5)
    assert cos(55) == pytest.approx(0.5) and cos(30) > lin(30)
    assert wsd(50) == 1.0 and wsd(89) == 1.0 and wsd(95) == pytest.approx(0.5)


def test_checkpoint_verify_detects_corruption(tmp_path):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    manifest = {"files": {"a.bin": {"bytes": 3, "sha256": D.file_sha256(folder / "a.bin")}}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert verify(folder) == "no COMPLETE marker"
    (folder / contract.COMPLETE_MARKER).write_text("ok")
    assert verify(folder) is None
    (folder / "a.bin").write_bytes(b"abd")
    assert "sha256" in verify(folder)
    (folder / "a.bin").unlink()
    assert "missing" in verify(folder)


def test_pretraining_model_registered_and_exports_plain_mlm(tmp_path):
    import jobs  # noqa: F401 - registers ModernBertForPreTraining
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, ModernBertConfig, ModernBertForMaskedLM

    from jobs.model import ModernBertForPreTraining, export_mlm

    config = ModernBertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, pad_token_id=3, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2)
    config.sop_head = True
    model = AutoModelForPreTraining.from_config(config)
    assert isinstance(model, ModernBertForPreTraining) and hasattr(model, "sop_head")
    ids = torch.randint(5, 300, (2, 16))
    labels = ids.clone()
    labels[:, ::2] = -100
    out = model(input_ids=ids, labels=labels, sop_labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss) and out.sop_loss > 0
    export_mlm(model.state_dict(), model.config, tmp_path)
    plain = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(plain) is ModernBertForMaskedLM
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_export_of_an_unfinished_run_is_a_clean_usage_error(tmp_path):
    """jobs.export's failures belong to the error family: a message with the fix and exit 2, no SystemExit text."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "jobs.export", str(tmp_path), "--onnx"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "has not finished" in proc.stderr and "fix: wait for the job" in proc.stderr
    assert "Traceback" not in proc.stderr


def _tiny_model(**model):
    from jobs.model import pretrain_model

    spec = JobSpec.model_validate({"kind": "pretrain", "name": "t", "model": {"preset": "tiny", **model},
                                   "data": {"train": ["x.txt"], "seq_len": 64}})
    ids = {name: i for i, name in enumerate(D.SPECIAL_TOKENS)}
    return spec, pretrain_model(spec, 300, ids)


def test_model_attention_is_applied_and_a_missing_kernel_names_the_field():
    from jobs.errors import DataError

    spec, model = _tiny_model(attention="eager")
    assert model.config._attn_implementation == "eager"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="model.attention=flash_attention_2"):
            _tiny_model(attention="flash_attention_2")
    # the kernels are not part of what a run's numbers depend on: a resumed run may switch them
    assert spec.training_fingerprint() == spec.model_copy(update={"model": spec.model.model_copy(
        update={"attention": "sdpa"})}).training_fingerprint()


def test_compile_is_in_place_so_checkpoint_names_do_not_change():
    from jobs.runtime import compile_encoder

    _, model = _tiny_model()
    before = list(model.state_dict())
    compile_encoder(model)
    assert list(model.state_dict()) == before  # no `_orig_mod.` prefix: checkpoints and exports load as before
    assert model.model._compiled_call_impl is not None and getattr(model, "_compiled_call_impl", None) is None


def test_tokenizer_threads_follow_the_cpus_the_job_was_given(monkeypatch):
    """A Slurm job given 3 CPUs of a 128-core node tokenizes with 3 threads, not 128; the user's setting wins."""
    for var in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        monkeypatch.setenv(var, "0")  # recorded, so the value set below is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setattr(D.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert D.job_cpus() <= 3 and D.size_tokenizer_threads() == D.job_cpus()
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    assert D.size_tokenizer_threads() == 1
