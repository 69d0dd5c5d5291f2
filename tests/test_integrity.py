"""Nothing corrupt is trained on, nothing mixed is cached (issue 11, first part): per-sequence checksums checked on
every read, shards checked against the manifest on open, the cache's identity, the teacher's weights."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import pytest
import warm
from test_cache import crash_part_way
from test_train import overrides

from kd import cache_teacher
from kd.cache import MANIFEST, TeacherCache, shard_records, write_shard_index
from kd.errors import KDError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, make_cache_config, llama_teacher) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    return cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.top_k": 16}))


def flip_byte_in(path: Path, dataset: str, chunk: int = 1, at: int = 3) -> None:
    """Flip one byte inside chunk `chunk` (= one sequence's data) of `dataset` (or at byte `at` of a contiguous
    dataset), on disk, behind HDF5's back."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_offset() + at if ds.chunks is None else None
        if offset is None:
            info = ds.id.get_chunk_info(chunk)
            offset = info.byte_offset + min(at, info.size - 1)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize(
    "dataset",
    ["topk_logprobs", "topk_logprobs_q8", "topk_ids", "hidden_states", "input_ids", "sample_bytes", "checksums"],
)
def test_a_flipped_byte_in_any_field_stops_the_read_naming_shard_and_sequence(clean_cache, tmp_path, dataset):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    # per-sequence fields: chunk 1 is the shard's sequence 1 (global 9); sampled targets: one byte array in 8 KB
    # chunks, here all in chunk 0, which the shard's first sequence (global 8) already reads
    flip_byte_in(cache / "train-00001.h5", dataset, chunk=0 if dataset == "sample_bytes" else 1)
    split = TeacherCache(cache).split("train")
    for i in range(8):  # shard 0 is untouched
        split[i]
    first_bad = 8 if dataset in ("sample_bytes", "checksums") else 9  # the table: contiguous, byte 3 is row 0's
    with pytest.raises(
        KDError,
        match=rf"shard train-00001.h5 of cache .*, sequence {first_bad} of split train: "
        r"cannot be read .* the cache is damaged: run python -m kd.cache verify",
    ):
        for i in range(8, 16):
            split[i]


def test_a_truncated_or_deleted_shard_is_one_clear_error(clean_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    shard = cache / "train-00001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (cache / "train-00002.h5").unlink()
    split = TeacherCache(cache).split("train")
    split[7]
    with pytest.raises(KDError, match=r"cannot open shard .*train-00001.h5 .* missing or damaged; run python -m kd"):
        split[8]
    with pytest.raises(KDError, match=r"cannot open shard .*train-00002.h5 .* missing or damaged"):
        split[16]
    split[24]  # the others still read


def test_a_damaged_cache_config_is_one_clear_error(clean_cache, tmp_path, make_cache_config, llama_teacher):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    (cache / "cache_config.json").write_text('{"config": ')
    with pytest.raises(KDError, match=r"cache_config.json is damaged .* remove it, or use cache.overwrite=true"):
        cache_teacher.main(make_cache_config(llama_teacher, cache, **{"cache.top_k": 16}))
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in clean_cache.iterdir())  # untouched


@pytest.mark.parametrize("dataset", ["lengths", "sample_offsets"])
def test_a_flipped_byte_in_a_whole_shard_dataset_stops_the_open(clean_cache, tmp_path, dataset):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    flip_byte_in(cache / "train-00001.h5", dataset, chunk=0, at=9)
    split = TeacherCache(cache).split("train")
    split[7]
    with pytest.raises(KDError, match=rf"shard train-00001.h5 of cache .* cannot be read \(dataset {dataset} fails"):
        split[8]


def test_trust_skips_the_checksums_but_not_the_manifest_checks(clean_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    flip_byte_in(cache / "train-00001.h5", "hidden_states", chunk=1)
    trusted = TeacherCache(cache, check=False).split("train")
    trusted[9]  # read without a check: what `train.trust_cache=true` promises the user has verified
    with pytest.raises(KDError, match="fails its checksum"):
        TeacherCache(cache).split("train")[9]
    m = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).write_text(json.dumps(dict(m, top_k=8)))
    with pytest.raises(KDError, match="top_k is 16 in the shard and 8 in the manifest"):
        TeacherCache(cache, check=False).split("train")[0]


def test_format_4_caches_are_read_and_their_fletcher32_checked(clean_cache, tmp_path):
    """Format 4 (a fletcher32 checksum per HDF5 chunk, no `checksums` table) is still read, its checksums checked
    by HDF5: the same shards rewritten that way read the same values, and a flipped byte stops the read."""
    cache = tmp_path / "v4"
    cache.mkdir()
    m = json.loads((clean_cache / MANIFEST).read_text())
    for p in clean_cache.glob("*-shards.npy"):
        shutil.copy(p, cache / p.name)
    for rec in [s for split in m["splits"] for s in shard_records(clean_cache, m, split)]:
        with h5py.File(clean_cache / rec["file"], "r") as fi, h5py.File(cache / rec["file"], "w") as fo:
            meta = json.loads(fi.attrs["kd_meta"])
            fo.attrs["kd_meta"] = json.dumps(dict(meta, format_version=4))
            for name, ds in fi.items():
                if name != "checksums":
                    kw = {"chunks": ds.chunks, "maxshape": ds.maxshape, "fletcher32": True} if ds.chunks else {}
                    fo.create_dataset(name, data=ds[()], dtype=ds.dtype, **kw)
    (cache / MANIFEST).write_text(json.dumps(dict(m, format_version=4)))
    old, new = TeacherCache(cache).split("train"), TeacherCache(clean_cache).split("train")
    for i in (0, 9, 39):
        for k, v in new[i].items():
            assert (old[i][k] == v).all(), k
    # a sequence not read above: HDF5 shares a file still open in this process, chunk cache included
    flip_byte_in(cache / "train-00001.h5", "hidden_states", chunk=2)
    with pytest.raises(KDError, match="sequence 10 of split train: cannot be read"):
        TeacherCache(cache).split("train")[10]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m, c: m.update(top_k=8), "top_k is 16 in the shard and 8 in the manifest"),
        (lambda m, c: m.update(seq_len=64), "seq_len is 32 in the shard and 64 in the manifest"),
        (lambda m, c: m.update(sample_n=4), "sample_n is 8 in the shard and 4 in the manifest"),
        (
            lambda m, c: m["teacher"].update(vocab_size=100),
            "teacher.vocab_size is .* in the shard and 100 in the manifest",
        ),
        (
            lambda m, c: m["teacher"].update(hidden_size=64),
            "teacher.hidden_size is .* in the shard and 64 in the manifest",
        ),
        (lambda m, c: m.update(config_hash="0" * 64), "it belongs to another cache"),
        (lambda m, c: m["splits"]["train"].update(num_sequences=41), "says 41 sequences but its shards hold 40"),
        (
            lambda m, c: m["splits"]["train"].update(
                shard_index=write_shard_index(
                    c, "train", [r for r in shard_records(c, m, "train") if r["first_sequence"] != 16]
                )
            ),
            "do not cover sequences 16..23",
        ),
        (lambda m, c: (c / "train-shards.npy").write_bytes((c / "eval-shards.npy").read_bytes()), "sha256 differs"),
        (lambda m, c: (c / "train-shards.npy").unlink(), "cannot read the shard index"),
    ],
)
def test_manifest_edits_are_caught_with_one_clear_message(clean_cache, tmp_path, edit, match):
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    m = json.loads((cache / MANIFEST).read_text())
    edit(m, cache)
    (cache / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(KDError, match=match):
        split = TeacherCache(cache).split("train")
        split[0]


def test_a_cache_overwritten_under_a_reader_is_never_mixed(tmp_path, make_cache_config, llama_teacher):
    out = tmp_path / "c"
    cache_teacher.main(make_cache_config(llama_teacher, out))
    split = TeacherCache(out).split("train")
    split[0]  # shard 0 open: this reader pinned the manifest it started with
    cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.top_k": 8, "cache.overwrite": "true"}))
    with pytest.raises(KDError, match="belongs to another cache .*: the cache was overwritten under this reader"):
        split[9]


def test_training_on_a_damaged_shard_exits_2_with_one_line(clean_cache, tmp_path):
    """Through a DataLoader worker: the worker's traceback is not the message; nothing is trained on."""
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    flip_byte_in(cache / "train-00002.h5", "topk_ids", chunk=0)
    args = [
        sys.executable,
        str(ROOT / "train_student.py"),
        *overrides(cache, tmp_path / "runs", **{"train.num_workers": 1, "train.max_steps": 20}),
    ]
    result = warm.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "shard train-00002.h5" in errors[0] and "Traceback" not in result.stderr
    assert "sequence 16 of split train" in errors[0]


def test_train_trust_cache_skips_the_checksums(clean_cache, tmp_path):
    """The switch reaches the reader: a flipped log-prob code (decodable, so only a checksum can see it) stops a
    normal run and is read, unchecked, by a run that trusts the cache."""
    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    flip_byte_in(cache / "train-00000.h5", "topk_logprobs", chunk=0)
    from test_train import make_cfg

    from kd import train_student

    # in this process (the exit status of such an error: test_training_on_a_damaged_shard_exits_2_with_one_line)
    with pytest.raises(KDError, match="checksum"):  # 10 steps: all 40 sequences
        train_student.main(make_cfg(cache, tmp_path / "runs-checked", **{"train.trust_cache": False}))
    assert (
        train_student.main(make_cfg(cache, tmp_path / "runs-trusted", **{"train.trust_cache": True})) / "final"
    ).is_dir()


def test_teacher_weights_changed_at_the_same_path_are_refused_on_resume(
    tmp_path, make_cache_config, llama_teacher, monkeypatch
):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    shutil.copytree(llama_teacher, teacher)
    out = tmp_path / "c"
    crash_part_way(monkeypatch, make_cache_config(teacher, out))
    finished = (out / "train-00000.h5").stat().st_mtime_ns
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with __import__("torch").no_grad():
        next(model.parameters()).add_(0.01)  # other weights, same path, same config
    model.save_pretrained(teacher)
    with pytest.raises(
        KDError,
        match=r"was started with other teacher weights at .*teacher \(weight files changed: "
        r"model.safetensors \(sha256 \w{12} -> sha256 \w{12}\)\); restore those weights",
    ):
        cache_teacher.main(make_cache_config(teacher, out))
    assert (out / "train-00000.h5").stat().st_mtime_ns == finished  # nothing it finished was touched
    done = cache_teacher.main(make_cache_config(teacher, out, **{"cache.overwrite": "true"}))
    m = json.loads((done / MANIFEST).read_text())
    assert m["teacher"]["weights"]["files"][0]["name"] == "model.safetensors"
    assert (out / "train-00000.h5").stat().st_mtime_ns != finished  # recomputed with the new weights


def test_resuming_a_run_whose_cache_was_overwritten_is_refused(tmp_path, make_cache_config, llama_teacher):
    from test_train import make_cfg

    from kd import train_student

    out = tmp_path / "c"
    cache_teacher.main(make_cache_config(llama_teacher, out))
    cfg = make_cfg(out, tmp_path / "runs", **{"train.max_steps": 4, "train.checkpoint_every": 2})
    train_student.main(cfg)
    cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.top_k": 8, "cache.overwrite": "true"}))
    cfg.train.resume = True
    with pytest.raises(KDError, match=r"cannot resume .*: the cache at .* changed since this run started"):
        train_student.main(cfg)


def test_a_moved_cache_and_a_moved_run_directory_resume(tmp_path, make_cache_config, llama_teacher):
    """A run killed after its step-3 checkpoint, then its cache copied elsewhere (the original deleted) and its
    runs folder renamed: resumed from the new paths, it logs exactly what an uninterrupted run logs. The cache is
    recognised by its identity (its config hash), not its path."""
    from conftest import killing_runner
    from test_train import assert_same_metrics, make_cfg

    from kd import train_student

    cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    extra = {"train.max_steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3}
    reference = train_student.main(make_cfg(tmp_path / "c", tmp_path / "ref", **extra))
    runner = tmp_path / "runner.py"
    runner.write_text(killing_runner("train_student.py", "kd.train.state", "MetricsLog", "write", 7))  # at step 4
    args = overrides(tmp_path / "c", tmp_path / "runs", **extra)
    killed = warm.run([sys.executable, str(runner), "train_student.py", *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "runs" / "r" / "checkpoints" / "latest.json").exists()
    shutil.copytree(tmp_path / "c", tmp_path / "moved-cache")
    shutil.rmtree(tmp_path / "c")
    (tmp_path / "runs").rename(tmp_path / "moved-runs")
    cfg = make_cfg(tmp_path / "moved-cache", tmp_path / "moved-runs", **extra, **{"train.resume": "true"})
    assert_same_metrics(reference, train_student.main(cfg))
