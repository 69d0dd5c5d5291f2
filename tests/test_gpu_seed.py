"""bench/gpu_seed.py, the GPU check of the original project's shapes (issue 31), cannot rot before a GPU is lent: its
toy-shape run on CPU goes through every part's plumbing with only what the lent machine has (no `datasets`, no
matplotlib: both are blocked here), and the goals it judges on a GPU are judged right."""

from __future__ import annotations

import json
import sys

import pytest
import warm
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_seed  # noqa: E402

# the lent machine's packages: what gpu_seed.py may import (kd's repository code aside)
BLOCKED = ("datasets", "matplotlib", "pytest")


def test_the_tiny_run_measures_every_part_with_the_lent_machines_packages(tmp_path):
    out = tmp_path / "seed.json"
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in BLOCKED)
    code = (
        f"import runpy, sys; {block}; sys.argv = ['bench/gpu_seed.py', '--device', 'cpu', '--tiny', '--out', "
        f"{str(out)!r}]; runpy.run_path('bench/gpu_seed.py', run_name='__main__')"
    )
    proc = warm.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["tiny"] and report["device"].startswith("CPU") and report["versions"]["torch"]
    rows = report["rows"]
    by_part = {part: [r for r in rows if r["part"] == part] for part in ("cache", "step", "head", "backend")}
    # cache: the bare forward and the caching pass, in bf16 and fp16
    assert [(r["name"], r["precision"]) for r in by_part["cache"]] == [
        (name, p) for p in ("bf16", "fp16") for name in ("bare teacher forward", "caching pass (device work)")
    ]
    # step: every variant in fp16 and bf16, every step applied (a note says otherwise)
    assert [(r["name"], r["precision"]) for r in by_part["step"]] == [
        (label, p) for p in ("fp16", "bf16") for label in gpu_seed.STEP_VARIANTS.values()
    ]
    assert all(r["tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in by_part["step"] + by_part["cache"])
    assert not any(r["note"] for r in by_part["step"])
    assert [r["name"].split(",")[0] for r in by_part["head"]] == ["fused LM head", "fused LM head off"]
    assert all(r["peak_mb"] > 0 for r in by_part["head"])
    # backends: said, not silently left out (Accelerate starts them on GPUs only; DeepSpeed may be absent)
    assert [r["name"] for r in by_part["backend"]] == [
        "FSDP2 (1 process)",
        "DeepSpeed ZeRO-2 (1 process)",
        "DeepSpeed ZeRO-3 (1 process)",
    ]
    assert all(r["note"] for r in by_part["backend"])
    # the checks ran and held; goals are judged on a GPU only
    assert [c["passed"] for c in report["checks"]] == [True, True, True], report["checks"]
    assert "applied per window [True, False, True, True]" in report["checks"][0]["detail"]
    assert report["goals"] == []
    table = proc.stdout
    assert table.splitlines()[0].startswith("[gpu_seed] CPU") and table.count("PASS") == 3


def row(part, name, precision, tps=None, peak=None):
    return gpu_seed.Row(part, name, precision, tps, peak)


def judged(rows) -> dict[str, bool]:
    report = gpu_seed.Report("GPU", False, {}, rows)
    gpu_seed.judge_goals(report)
    return {g.name: g.passed for g in report.goals}


def test_the_goals_are_judged_from_the_rows():
    topk, online = gpu_seed.STEP_VARIANTS["topk"], gpu_seed.STEP_VARIANTS["online"]
    good = [
        row("step", topk, "bf16", tps=6000, peak=3000),
        row("step", online, "bf16", tps=1900, peak=9000),
        row("cache", "bare teacher forward", "bf16", tps=100_000),
        row("cache", "caching pass (device work)", "bf16", tps=86_000),
        row("head", "fused", "bf16", peak=1000),
        row("head", "unfused", "bf16", peak=4000),
    ]
    assert judged(good) == {
        "bf16 cached step: peak <= 4 GB and >= 3x the seed's 1900 tokens/s": True,
        "bf16 cached step >= 3x the online-teacher step": True,
        "bf16 caching pass >= 0.85x a bare teacher forward": True,
        "fused head: peak <= 1/4 of the unfused path": True,
    }
    bad = [
        row("step", topk, "bf16", tps=5000, peak=3000),  # < 3 x 1900 tokens/s, < 3x the online step
        row("step", online, "bf16", tps=1900, peak=9000),
        row("cache", "bare teacher forward", "bf16", tps=100_000),
        row("cache", "caching pass (device work)", "bf16", tps=84_000),
        row("head", "fused", "bf16", peak=1001),
        row("head", "unfused", "bf16", peak=4000),
    ]
    assert not any(judged(bad).values())
    over = judged([row("step", topk, "bf16", tps=9000, peak=4097), good[1]])  # fast enough, but over 4 GB
    assert over == {
        "bf16 cached step: peak <= 4 GB and >= 3x the seed's 1900 tokens/s": False,
        "bf16 cached step >= 3x the online-teacher step": True,
    }


def test_cuda_asked_where_there_is_none_is_one_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_seed.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no CUDA device here; run with --device cpu --tiny to check the plumbing"
    )


@pytest.mark.parametrize("shapes", [gpu_seed.FULL, gpu_seed.TINY])
def test_the_shapes_are_the_original_projects(shapes):
    """The full shapes are ASSETS.md's (1.28 B teacher, 134.5 M student: counted on the meta device); the tiny ones
    keep every structural choice (MoE with 3 experts, 1 active; untied teacher head; tied student)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def params(fields, vocab=None):
        fields = dict(fields, **({"vocab_size": vocab} if vocab else {}))
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        return lm, sum(p.numel() for p in lm.parameters())

    teacher, n_teacher = params(shapes.teacher)
    student, n_student = params(shapes.student, shapes.student_vocab)
    assert type(teacher).__name__ == "Qwen3MoeForCausalLM" and type(student).__name__ == "LlamaForCausalLM"
    assert (teacher.config.num_experts, teacher.config.num_experts_per_tok) == (3, 1)
    assert not teacher.config.tie_word_embeddings and student.config.tie_word_embeddings
    assert max(shapes.hidden_layers) == teacher.config.num_hidden_layers
    if shapes is gpu_seed.FULL:
        assert round(n_teacher / 1e6, 1) == 1280.2 and round(n_student / 1e6, 1) == 134.5
        assert shapes.step == (2, 384, 16) and shapes.head_batch == (8, 1024) and shapes.top_k == 256


def test_the_launched_child_runs_its_step(tmp_path):
    """The child that `accelerate launch` starts per back-end, run here without the launcher (Accelerate's plain
    back-end on CPU): its one row comes back through the JSON the parent reads."""
    out = tmp_path / "child.json"
    argv = ["--device", "cpu", "--tiny", "--only", "launched_step", "--launch", "zero2", "--out", str(out)]
    assert gpu_seed.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["name"] == "DeepSpeed ZeRO-2 (1 process, AccelerateBackend): cached top-256 KD + CE"
    assert row["tokens_per_s"] > 0 and row["note"] == ""
