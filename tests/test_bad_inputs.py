"""Inputs that used to run to a wrong result with exit 0, now one clear error before any work: a half-loaded or
non-causal model, non-finite settings, a YAML key given twice, a student config that cannot fit the machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import warm
from conftest import ROOT, TINY, cache_overrides
from safetensors.torch import load_file, save_file
from test_train import make_cfg, overrides

from kd.config import load_config
from kd.errors import KDError
from kd.models import load_causal_lm
from kd.train.model import build_student
from kd.train_config import TrainConfig


@pytest.fixture(scope="module")
def half_loaded_teacher(tmp_path_factory, llama_teacher):
    """The tiny teacher with its second layer's tensors removed from the checkpoint and one stray tensor added."""
    out = tmp_path_factory.mktemp("half_loaded")
    shutil.copytree(llama_teacher, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    kept = {k: v for k, v in weights.items() if ".layers.1." not in k}
    kept["stray.weight"] = torch.zeros(3)
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def encoder_teacher(tmp_path_factory, tokenizer_dir):
    """A BERT (bidirectional) model with an LM head: AutoModelForCausalLM loads it without complaint."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(*args) -> subprocess.CompletedProcess:
    return warm.run([sys.executable, "-m", "kd", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_a_half_loaded_teacher_is_refused_before_any_shard(half_loaded_teacher, corpus_dir, tmp_path):
    out = tmp_path / "cache"
    line = one_error_line(run("cache", *cache_overrides(half_loaded_teacher, corpus_dir, out)))
    assert f"model '{half_loaded_teacher}' did not load whole: 9 tensors missing from the checkpoint" in line
    assert "model.layers.1." in line and "1 tensors in the checkpoint but not in the model, e.g. stray.weight" in line
    assert not list(out.glob("*.h5"))


def test_an_encoder_is_not_a_causal_lm_for_the_cache_the_evaluator_or_the_trainer(
    encoder_teacher, tiny_cache, tmp_path
):
    with pytest.raises(KDError, match=r"\(BertLMHeadModel, model_type bert\) is not a causal language model"):
        load_causal_lm(str(encoder_teacher), None, "fp32", "sdpa")
    line = one_error_line(run("evaluate", encoder_teacher, "--text", ROOT / "README.md"))
    assert "is not a causal language model" in line
    cfg = make_cfg(tiny_cache, tmp_path, **{"student.config": "null", "student.pretrained": str(encoder_teacher)})
    with pytest.raises(KDError, match="is not a causal language model"):
        build_student(cfg, None, 0)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_out_of_range_is_refused_with_the_config(tiny_cache, tmp_path, make_cache_config, llama_teacher, seed):
    """train.seed outside numpy's range was a ValueError traceback at start-up, data.split_seed outside 64 bits an
    OverflowError mid-ingest: both are refused when the config is read."""
    with pytest.raises(KDError, match=rf"train.seed must be in 0..2\*\*32-1, got {seed}"):
        load_config(TrainConfig, None, [*overrides(tiny_cache, tmp_path), f"train.seed={seed}"])
    with pytest.raises(KDError, match=rf"data.split_seed must fit in 64 bits .*, got {seed * 2**64}"):
        make_cache_config(llama_teacher, tmp_path / "c", **{"data.split_seed": seed * 2**64})


@pytest.mark.parametrize("cap", [0, -1])
def test_an_eval_cap_below_one_is_refused_with_the_config(tiny_cache, tmp_path, cap):
    """train.eval_max_sequences is a slice's bound: -1 scored every eval window but the last, 0 none (NaN evals)."""
    with pytest.raises(KDError, match=rf"train.eval_max_sequences must be >= 1 or null \(all\), got {cap}"):
        load_config(TrainConfig, None, [*overrides(tiny_cache, tmp_path), f"train.eval_max_sequences={cap}"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=inf", "train.lr' is inf"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm' is nan"),
        ("loss.temperature=nan", "loss.temperature' is nan"),
        ("student.config.rope_theta=-.inf", "student.config.rope_theta' is -inf"),
        ("loss.terms=[{kind: jsd, weight: .nan}]", "loss.terms[0].weight' is nan"),
    ],
)
def test_non_finite_settings_are_refused(tiny_cache, tmp_path, override, key):
    with pytest.raises(KDError, match=re.escape(f"config key '{key}: every number in a config must be finite")):
        load_config(TrainConfig, None, [*overrides(tiny_cache, tmp_path), override])


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  lr: 1.0e-3\nloss:\n  alpha_kd: 0.5\ntrain:\n  lr: 2.0e-3\n",
            "key 'train' is given twice (lines 1 and 5)",
        ),
        ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "key 'lr' is given twice (lines 2 and 3)"),
    ],
)
def test_a_yaml_key_given_twice_is_refused_naming_the_lines(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(KDError, match=r"config file .*c\.yaml: " + re.escape(message) + "; say it once"):
        load_config(TrainConfig, tmp_path / "c.yaml")


def test_a_student_config_that_cannot_fit_is_refused_with_its_size(tiny_cache, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = make_cfg(tiny_cache, tmp_path, **{"student.config": "{model_type: llama, vocab_size: 300}"})
    with pytest.raises(
        KDError, match=r"builds a 6\.\d\dB-parameter llama \(hidden_size 4096, 32 layers\): training it"
    ):
        build_student(cfg, tok, 0)
    fits = make_cfg(tiny_cache, tmp_path, **{"student.config": str({"model_type": "llama", **TINY, "vocab_size": 300})})
    assert build_student(fits, tok, 0).num_parameters() > 0
    result = run("train", *overrides(tiny_cache, tmp_path, **{"student.config": "{model_type: llama}"}))
    assert "training it needs about" in one_error_line(result)
    assert not (tmp_path / "r").exists()  # nothing written: the corrected run is not blocked


def test_one_training_per_run_directory(tiny_cache, tmp_path):
    """A second training on a run directory being written is refused naming the first (its lock beside the run
    directory); once the first is done, the name is free again (a resume, here)."""
    from kd import train_student
    from kd.io import DirLock

    held = DirLock(tmp_path, "training run", name=".r.lock").acquire()  # a training of run `r` in progress
    with pytest.raises(KDError, match=rf"another training run is writing {tmp_path}/r \(pid \d+ on .*\); wait"):
        train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3}))
    assert not (tmp_path / "r").exists()
    held.release()
    run = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3}))
    assert (run / "final").is_dir() and not (tmp_path / ".r.lock").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "M", "--text", "t.txt", "--batch-size", "0"], "argument --batch-size: 0 is below the minimum, 1"),
        (["evaluate", "M", "--text", "t.txt", "--seq-len", "1"], "argument --seq-len: 1 is below the minimum, 2"),
        (["evaluate", "M", "--cache", "C", "--max-sequences", "-3"], "--max-sequences: -3 is below the minimum, 1"),
        (["export", "C", "OUT", "--rows-per-file", "0"], "argument --rows-per-file: 0 is below the minimum, 1"),
        (["prune", "--cache", "C", "--layers", "zero"], "argument --layers: 'zero' is not an integer"),
    ],
)
def test_out_of_range_numeric_arguments_are_one_line(argv, message, capsys):
    from kd.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_evaluator_refuses_windows_past_the_models_context(llama_teacher):
    line = one_error_line(run("evaluate", llama_teacher, "--text", ROOT / "README.md", "--seq-len", 256))
    assert "context (128 positions) is shorter than the windows (256 tokens): lower --seq-len" in line


def test_an_export_stopped_part_way_leaves_nothing_that_loads(tiny_cache, tmp_path, monkeypatch):
    """A full disk at the second Parquet file: one error, no OUT and no partial folder that a loader would take for
    a dataset; the re-run exports whole. An OUT that is a file is one error."""
    import errno

    import pyarrow.parquet as pq

    from kd.cache.export import export

    real, calls = pq.ParquetWriter.write_batch, []

    def full_disk_at_the_second_file(writer, batch, *a, **kw):  # one batch per file of 16 rows here
        calls.append(batch.num_rows)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(writer, batch, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", full_disk_at_the_second_file)
    out = tmp_path / "exported"
    with pytest.raises(KDError, match=r"saving .*exported failed: .*the disk is full"):
        export(tiny_cache, out, rows_per_file=16, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (export(tiny_cache, out, rows_per_file=16, log=lambda *a: None) / "README.md").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(KDError, match="a-file exists and is not a directory"):
        export(tiny_cache, tmp_path / "a-file")


def test_report_refuses_bad_outputs_and_a_damaged_log(tiny_cache, tmp_path):
    from kd import train_student
    from kd.report import plot

    run_dir = train_student.main(make_cfg(tiny_cache, tmp_path, **{"train.max_steps": 3}))
    for out, message in (
        (tmp_path, "must be a file ending in one of"),
        (tmp_path / "curves.xyz", "must be a file ending in one of"),
        (tmp_path / "no" / "such" / "curves.png", "the folder .*no/such does not exist"),
    ):
        with pytest.raises(KDError, match=f"--out .*{message}"):
            plot(run_dir, out)
    assert plot(run_dir, tmp_path / "curves.pdf").stat().st_size > 0
    log = run_dir / "metrics.jsonl"
    log.write_text(log.read_text()[:-40])  # a truncated copy: its last line cut
    lines = log.read_text().count("\n") + 1
    with pytest.raises(KDError, match=rf"metrics.jsonl, line {lines}, is not a JSON record: the file is damaged"):
        plot(run_dir)


def compressed_halves(tmp_path, corpus_dir) -> dict[str, object]:
    """The fixture plays, gzip- and zstd-compressed (two zstd frames), each file cut to half its bytes."""
    import gzip

    import zstandard

    text = b"".join(p.read_bytes() for p in sorted(corpus_dir.glob("*.txt")))
    frames = zstandard.ZstdCompressor().compress(text[: len(text) // 2]) + zstandard.ZstdCompressor().compress(
        text[len(text) // 2 :]
    )
    out = {}
    for name, data in (("plays.txt.gz", gzip.compress(text)), ("plays.txt.zst", frames)):
        (tmp_path / name).write_bytes(data)
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        out[name] = tmp_path / name
    return out


def test_a_compressed_file_that_ends_early_is_one_error_naming_it(
    tmp_path, corpus_dir, llama_teacher, make_cache_config
):
    """gzip raised EOFError (a traceback); zstandard's reader ended silently (fewer documents, or none). Whole
    files, the zstd one of two frames, still read."""
    from kd import cache_teacher

    files = compressed_halves(tmp_path, corpus_dir)
    for name in files:
        cut = tmp_path / f"cut-{name}"
        cfg = make_cache_config(llama_teacher, tmp_path / f"c-{name}", **{"data.files": f"[{cut}]"})
        with pytest.raises(KDError, match=rf"{re.escape(str(cut))} ends early \(.*\): a truncated or damaged"):
            cache_teacher.main(cfg)
        whole = make_cache_config(llama_teacher, tmp_path / f"w-{name}", **{"data.files": f"[{files[name]}]"})
        assert (cache_teacher.main(whole) / "manifest.json").exists()


def test_a_nul_in_text_to_be_stored_is_refused_naming_file_and_line(tmp_path, llama_teacher, make_cache_config):
    """HDF5's strings end at a NUL (it was a ValueError traceback from h5py): with the text stored, a record or a
    .txt line holding one is a bad record named by file and line; without stored text it is cached."""

    from kd import cache_teacher

    words = ["lo\x00rd" if i == 3 else "lord" for i in range(9)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"the king {w} is dead " * 9}) + "\n" for w in words))
    (tmp_path / "b.txt").write_text("the king\nis dead\nlong \x00live the king\n" * 30)
    for name, line in (("a.jsonl", 4), ("b.txt", 3)):
        cfg = make_cache_config(llama_teacher, tmp_path / f"c-{name}", **{"data.files": f"[{tmp_path / name}]"})
        with pytest.raises(KDError, match=rf"{name}, line {line}: the text holds a NUL character .*data.bad_records"):
            cache_teacher.main(cfg)
    extra = {"data.files": f"[{tmp_path / 'a.jsonl'}]", "cache.store_text": "false"}
    assert (
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "no-text", **extra)) / "manifest.json"
    ).exists()


def test_a_step_that_makes_the_weights_non_finite_stops_before_anything_saves_them(tiny_cache, tmp_path):
    """An enormous but finite LR and weight decay, with finite gradients, overflow the weights at an applied step:
    the run stops at that step, naming it; no final/, and no checkpoint of non-finite weights. An LR whose first
    AdamW step size is past fp32 is refused with the config (it was a RuntimeError traceback)."""
    from kd import train_student

    extra = {"train.lr": 3e37, "train.min_lr": 1e37, "train.weight_decay": 100.0, "train.checkpoint_every": 1}
    cfg = make_cfg(tiny_cache, tmp_path, **extra)  # the decay factor 1 - lr * weight_decay overflows fp32
    with pytest.raises(KDError, match=r"step 1 made the weights non-finite \(lr .*\); stopped before anything saved"):
        train_student.main(cfg)
    run_dir = tmp_path / "r"
    assert not (run_dir / "final").exists() and not list(run_dir.glob("checkpoints/step_*"))
    with pytest.raises(KDError, match=r"train.lr=1e\+38 overflows AdamW's fp32 step size"):
        make_cfg(tiny_cache, tmp_path, **{"train.lr": 1e38})


def test_a_split_left_empty_by_the_hash_names_the_real_cause(tmp_path, llama_teacher, make_cache_config):
    """10,000 identical one-character documents (and one huge document) all hash to one side: the eval split is
    empty because of the per-document split, not for want of text, and the error says so."""

    from kd import cache_teacher

    (tmp_path / "same.jsonl").write_text((json.dumps({"text": "a"}) + "\n") * 10000)
    extra = {"data.files": f"[{tmp_path / 'same.jsonl'}]", "data.eval_files": "[]", "data.max_train_sequences": "null"}
    with pytest.raises(
        KDError, match=r"no document fell in the (eval|train) split: .* sent all 10000 documents to the"
    ):
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **extra))


def test_a_resume_compares_paths_as_the_files_they_name(tmp_path, monkeypatch):
    """Path keys (student.pretrained, train.extra_eval_files, ...) are recorded resolved, and a resume compares
    them resolved: the same folder typed relative from another working directory, or through a symlink, resumes;
    another folder is refused naming both resolved paths. A run recorded before paths were kept resolved is
    compared by resolving its typed values."""

    from kd.config import resolved_paths, to_dict
    from kd.train.checkpoint import prepare_run_dir

    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "eval.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "models")
    (tmp_path / "elsewhere").mkdir()

    def cfg(pretrained: str, extra: str) -> dict:
        args = [f"student.pretrained={pretrained}", f"train.extra_eval_files=[{extra}]"]
        return to_dict(load_config(TrainConfig, None, args))

    monkeypatch.chdir(tmp_path)
    started = cfg("models/student", "eval.txt")
    paths = resolved_paths(started, TrainConfig)
    assert paths["student.pretrained"] == str((tmp_path / "models" / "student").resolve())
    assert paths["train.extra_eval_files"] == [str((tmp_path / "eval.txt").resolve())]
    # a recorded run, resumed from another folder; a run recorded as typed only, resumed from its own folder
    for record, cwd in (({"config": started, "paths": paths}, "elsewhere"), ({"config": started}, ".")):
        run = tmp_path / "runs" / ("new" if "paths" in record else "old")
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(record))
        monkeypatch.chdir(tmp_path / cwd)
        assert prepare_run_dir(run, cfg(str(tmp_path / "link" / "student"), str(tmp_path / "eval.txt")), True) is None
        with pytest.raises(
            KDError, match=r"student.pretrained \(student.pretrained: /.*/models/student then, /.*/models/other now\)"
        ):
            prepare_run_dir(run, cfg(str(tmp_path / "models" / "other"), str(tmp_path / "eval.txt")), True)
        monkeypatch.chdir(tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")  # typed relative to another folder
    assert prepare_run_dir(tmp_path / "runs" / "new", cfg("../link/student", "../eval.txt"), True) is None
