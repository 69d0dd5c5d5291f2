"""Bad input to cache_teacher.py: one clear message, a non-zero exit, nothing already written is lost."""

from __future__ import annotations

import json
import os
import sys

import pytest
import warm
from conftest import ROOT, cache_overrides

from kd import cache_teacher
from kd.cache import MANIFEST
from kd.errors import KDError


def run_cli(*args):
    return warm.run([sys.executable, str(ROOT / "cache_teacher.py"), *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.seq_len": 256}, "longer than the teacher's context (128"),
        ({"cache.top_k": 100000}, "larger than the teacher's vocabulary"),
        ({"cache.hidden_layers": "[0, 3]"}, "cache.hidden_layers [3] out of range"),
        ({"data.files": "[/nonexistent/*.txt]"}, "data.files: file(s) not found: /nonexistent/*.txt"),
        ({"data.separator_token": "<nope>"}, "separator token '<nope>' is not in the teacher's vocabulary"),
        ({"data.eval_files": "[{train_file}]"}, "is in both data.files and data.eval_files"),
    ],
)
def test_bad_input_is_refused_before_work(tmp_path, make_cache_config, llama_teacher, corpus_dir, override, message):
    override = {
        k: v.format(train_file=corpus_dir / "play0.txt") if isinstance(v, str) else v for k, v in override.items()
    }
    with pytest.raises(KDError, match=None) as e:
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **override))
    assert message in str(e.value)
    assert not (tmp_path / "c").exists()  # refused before the output directory was touched
    cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.text_field": "content", "data.files": "[{jsonl}]"}, "text field 'content' is not in the record"),
        ({"data.files": "[{empty}]"}, "holds no non-empty text"),
        ({"data.files": "[{bad_utf8}]"}, "bad.jsonl, line 2: invalid UTF-8"),
        (
            {"data.eval_files": "[]", "data.eval_fraction": 0.01},
            "no document fell in the eval split: the per-document split (data.eval_fraction=0.01) sent all 5",
        ),
    ],
)
def test_bad_data_found_while_reading_never_blocks_the_corrected_run(
    tmp_path, make_cache_config, llama_teacher, override, message
):
    """Problems only reading can find (streaming: the data is never loaded up front) stop the run with one error,
    before the directory becomes a cache, so the corrected run (another data config) proceeds."""
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "one"}\n{"text": "\xff"}\n')
    paths = {"jsonl": tmp_path / "docs.jsonl", "empty": tmp_path / "empty.txt", "bad_utf8": tmp_path / "bad.jsonl"}
    override = {k: v.format(**paths) if isinstance(v, str) else v for k, v in override.items()}
    with pytest.raises(KDError) as e:
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **override))
    assert message in str(e.value)
    assert not (tmp_path / "c" / MANIFEST).exists() and not (tmp_path / "c" / "cache_config.json").exists()
    cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    assert (tmp_path / "c" / MANIFEST).exists()


def test_records_without_text_are_refused_or_skipped_and_counted(tmp_path, make_cache_config, llama_teacher, capsys):
    """jsonl whose `text` is an integer in half the records: refused naming file and line, with the switch in the
    message; with data.bad_records=skip the other half is cached and the skipped ones counted, printed and kept in
    the manifest. An empty file beside a good one is named."""
    from conftest import make_text

    lines = [json.dumps({"text": make_text(i, 60) if i % 2 else i}) for i in range(20)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "empty.txt").write_text("")
    files = f"[{tmp_path / 'mixed.jsonl'}, {tmp_path / 'empty.txt'}]"
    with pytest.raises(KDError, match=r"mixed.jsonl, line 1: field 'text' holds int '0', not text; .*bad_records=skip"):
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **{"data.files": files}))
    capsys.readouterr()
    out = cache_teacher.main(
        make_cache_config(llama_teacher, tmp_path / "c", **{"data.files": files, "data.bad_records": "skip"})
    )
    printed = capsys.readouterr().out
    assert "10 record(s) without usable text skipped (data.bad_records=skip), e.g. " in printed
    assert "mixed.jsonl, line 1: field 'text' holds int" in printed
    assert f"empty documents skipped, e.g. {tmp_path / 'empty.txt'}" in printed
    ingest = json.loads((out / MANIFEST).read_text())["ingest"]
    assert ingest["bad_records"] == 10 and ingest["empty_documents"] == 1
    assert ingest["documents"] == 10 + 1  # and the held-out play


def test_a_cache_recorded_by_an_older_kd_is_still_complete(tmp_path, make_cache_config, llama_teacher, capsys):
    """A cache_config.json written before a config key existed equals today's config with that key at its default:
    the re-run finds the cache complete instead of refusing it as made with another config."""
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    recorded = json.loads((out / "cache_config.json").read_text())
    del recorded["config"]["data"]["bad_records"]
    (out / "cache_config.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    assert "is already complete (same config); nothing to do" in capsys.readouterr().out


def test_cli_error_is_one_line_and_exit_2(tmp_path, corpus_dir, llama_teacher):
    result = run_cli(*cache_overrides(llama_teacher, corpus_dir, tmp_path / "c"), "cache.topk=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key(s) cache.topk in section 'cache'; allowed: hidden_basis_tokens, hidden_codec, "
        "hidden_coefficients, hidden_layers, hidden_rank, id_codec, logprob_codec, output_dir, overwrite, sample_n, "
        "sample_seed, sequences_per_shard, shard_bytes, store_text, top_k"
    ]
    assert not (tmp_path / "c").exists()


def test_cli_missing_teacher(tmp_path, corpus_dir):
    result = run_cli(*cache_overrides(tmp_path / "no-model", corpus_dir, tmp_path / "c"))
    assert (
        result.returncode == 2 and f"no model at '{tmp_path / 'no-model'}': that path does not exist" in result.stderr
    )


def test_a_model_path_that_names_nothing_is_said_so_and_a_hub_id_passes(tmp_path, llama_teacher):
    """transformers reads a missing local path as a malformed hub id ("Repo id must use alphanumeric chars"): kd
    says the path does not exist instead, for every spelling that can only be a path; owner/name goes on to the hub."""
    from kd.models import load_causal_lm, load_tokenizer, model_source

    for missing in (str(tmp_path / "nothing"), "./nothing", "../nothing", "~/nothing", "runs/x/final"):
        with pytest.raises(KDError, match=r"no model at '.*nothing|no model at 'runs/x/final'"):
            model_source(missing, "model")
    with pytest.raises(KDError, match=r"no tokenizer at 'runs/x/final': that path does not exist"):
        load_tokenizer("runs/x/final")
    with pytest.raises(KDError, match=r"no model at 'runs/x/final'"):
        load_causal_lm("runs/x/final", None, "fp32", "sdpa")
    assert model_source("HuggingFaceTB/SmolLM2-135M", "model") == "HuggingFaceTB/SmolLM2-135M"
    assert model_source(str(llama_teacher), "model") == str(llama_teacher)


def test_unwritable_output_dir(tmp_path, make_cache_config, llama_teacher):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(KDError, match="cannot write to cache.output_dir"):
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "a-file" / "c"))


def test_rerun_with_other_config_names_the_keys(tmp_path, make_cache_config, llama_teacher):
    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(KDError) as e:
        cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.top_k": 8, "data.seq_len": 16}))
    assert "differing keys: cache.top_k, data.seq_len" in str(e.value) and "cache.overwrite=true" in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # the same config again is a no-op resume; an explicit overwrite replaces the cache
    cache_teacher.main(make_cache_config(llama_teacher, out))
    cache_teacher.main(make_cache_config(llama_teacher, out, **{"cache.top_k": 8, "cache.overwrite": "true"}))
    assert json.loads((out / MANIFEST).read_text())["top_k"] == 8


def test_refuses_a_non_cache_directory(tmp_path, make_cache_config, llama_teacher):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(KDError, match="holds no kd cache; refusing"):
        cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c", **{"cache.overwrite": "true"}))
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_reader_refuses_unfinished_cache(tmp_path, make_cache_config, llama_teacher):
    from kd.cache import TeacherCache

    out = cache_teacher.main(make_cache_config(llama_teacher, tmp_path / "c"))
    (out / MANIFEST).unlink()
    with pytest.raises(KDError, match="has not finished"):
        TeacherCache(out)
    with pytest.raises(KDError, match="no teacher cache at"):
        TeacherCache(tmp_path / "nowhere")


def test_output_read_by_a_command_that_stops_early_ends_quietly(tiny_cache):
    """`python -m kd.cache verify DIR | head`: what reads the output goes away (here before anything is written);
    the command ends with the shell's 141 (SIGPIPE) and nothing on stderr, not a traceback. A broken pipe that is
    not standard output's (a socket) is still an unexpected error."""
    import subprocess

    # output buffered, as users' Python has it (this environment may set PYTHONUNBUFFERED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def closed_early(*args) -> tuple[int, str]:
        p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        p.stdout.close()  # before the command writes anything
        err = p.stderr.read().decode()
        return p.wait(timeout=300), err

    assert closed_early("-m", "kd.cache", "verify", str(tiny_cache)) == (141, "")
    # a command that ends with its own status after writing: the status and its error line stay, nothing else
    # (the output left in the buffer once made it "Exception ignored ... BrokenPipeError" and 120)
    head = "from kd.errors import KDError, run_cli\ndef f():\n    print('ok shard ' * 100)\n"
    assert closed_early("-c", head + "    raise KDError('bad')\nrun_cli(f)") == (2, "error: bad\n")
    assert closed_early("-c", head + "    raise SystemExit(1)\nrun_cli(f)") == (1, "")
    # a broken pipe that is not standard output's (stdout read to the end here): still an unexpected error
    code = head + "    raise BrokenPipeError('a socket')\nrun_cli(f)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert other.returncode == 1 and "BrokenPipeError: a socket" in other.stderr
