"""Run a teacher ONCE over a text corpus and store its top-k log-probs, sampled targets and hidden states in HDF5 shards.

    accelerate launch cache_teacher.py --config configs/shakespeare_smollm2.yaml [dotted.key=value ...]
    python cache_teacher.py --config configs/shakespeare_smollm2.yaml          # one process

Two stages, both streaming (memory does not grow with the corpus) and both split between processes:
1. ingest (kd/data/): documents are read unit by unit, split train/eval per document, tokenized in batches and
   packed into windows, written to DIR/ingest/ (process r takes the r-th unit of each round);
2. teacher pass: cache shard j (sequences [j*S, (j+1)*S) of its split) is computed by process j % N from those
   windows, written under a temporary name and renamed when complete (format: kd/cache.py).
Neither stage's output depends on the number of processes, so an N-process cache equals the one-process cache.
Re-running the same command resumes: finished units and complete shards (sha256 re-checked) are kept. When the
manifest is written the cache is complete and the ingest windows are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kd import __version__
from kd.cache import (
    BASIS_FILE,
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    BasisFit,
    HiddenBasis,
    ShardWriter,
    complete_shard_info,
    sequence_bytes,
    shard_name,
    shard_sequences,
    sidecar_path,
    write_shard_index,
)
from kd.cache.codecs import codec_specs
from kd.cache_config import NON_CONTENT_KEYS, CacheConfig
from kd.config import diff_keys, flatten, parse_cli, to_dict
from kd.data import config_sources
from kd.data.chat import chat_template, check_chat_tokenizer
from kd.data.ingest import CHAT_COUNTS, INGEST_DIR, IngestSpec, WindowIndex, run_ingest, windows_fingerprint
from kd.data.pack import segment_positions
from kd.dist import agree, gather_rows
from kd.errors import KDError, run_cli
from kd.io import LOCK_FILE, DirLock, disk_error, sha256_file, write_json_atomic
from kd.teacher import (
    SAMPLER,
    check_placed,
    execution_device,
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    placement,
    teacher_targets,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from kd.textscore import chat_targets, score_record, target_text_units


def content_config(cfg_dict: dict) -> dict:
    """The config minus keys that do not change what is stored (with what flattening puts under them: an explicit
    teacher.device_map flattens to one key per module)."""
    return {
        k: v
        for k, v in flatten(cfg_dict).items()
        if k not in NON_CONTENT_KEYS and not k.startswith(tuple(n + "." for n in NON_CONTENT_KEYS))
    }


def check_teacher_fits(cfg: CacheConfig, model_cfg) -> None:
    """Fail before loading weights if the request cannot work with this teacher."""
    vocab, layers = model_cfg.vocab_size, model_cfg.num_hidden_layers
    max_pos = getattr(model_cfg, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise KDError(f"data.seq_len={cfg.data.seq_len} is longer than the teacher's context ({max_pos} positions)")
    if cfg.cache.top_k > vocab:
        raise KDError(f"cache.top_k={cfg.cache.top_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if (
        cfg.cache.hidden_codec == "lowrank"
        and cfg.cache.hidden_layers
        and cfg.cache.hidden_rank > model_cfg.hidden_size
    ):
        raise KDError(
            f"cache.hidden_rank={cfg.cache.hidden_rank} is larger than the teacher's hidden size "
            f"({model_cfg.hidden_size}); lower it (at the hidden size, lowrank with fp32 coefficients is exact)"
        )
    bad = [i for i in cfg.cache.hidden_layers if not 0 <= i <= layers]
    if bad:
        raise KDError(
            f"cache.hidden_layers {bad} out of range: this teacher has hidden states 0..{layers} "
            f"(0 = embeddings, {layers} = last layer)"
        )


def weights_change(old: dict | None, new: dict) -> str | None:
    """How the teacher's weights differ between a cache's record and now (None if they do not)."""
    if old is None or old.get("digest") == new["digest"]:
        return None
    if old.get("kind") == new.get("kind") == "local files":
        before, after = ({f["name"]: f for f in r["files"]} for r in (old, new))
        changed = [n for n in sorted(set(before) | set(after)) if before.get(n) != after.get(n)]
        return "weight files changed: " + ", ".join(
            f"{n} ({'sha256 ' + before[n]['sha256'][:12] if n in before else 'absent'} -> "
            f"{'sha256 ' + after[n]['sha256'][:12] if n in after else 'absent'})"
            for n in changed[:3]
        )
    return f"teacher weights {old} -> {new}"


def prepare_output_dir(out: Path, cfg_dict: dict, overwrite: bool, weights: dict | None = None) -> bool:
    """On the main process, holding the directory lock: refuse a directory that holds something else, clear what a
    killed run left; True if it already holds this exact cache (nothing to do). `weights`: the teacher's
    weights_fingerprint now, compared with the one the cache was started with."""
    cfg_file = out / CONFIG_FILE
    if cfg_file.exists():
        try:
            recorded = json.loads(cfg_file.read_text())
            old = recorded["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise KDError(
                f"{cfg_file} is damaged (not the JSON cache_teacher.py writes); remove it, or use "
                "cache.overwrite=true to start this cache again"
            ) from None
        changed = weights_change(recorded.get("teacher_weights"), weights) if weights is not None else None
        if changed and not overwrite:
            raise KDError(
                f"{out} was started with other teacher weights at {cfg_dict['teacher']['model']} "
                f"({changed}); restore those weights, or use cache.overwrite=true (or another "
                "cache.output_dir) to cache this teacher"
            )
        differing = diff_keys(content_config(old), content_config(cfg_dict), CacheConfig) + (
            ["teacher weights"] if changed else []
        )
        if differing and not overwrite:
            raise KDError(
                f"{out} holds a cache made with a different config (differing keys: {', '.join(differing)}). "
                "Use another cache.output_dir, or cache.overwrite=true to replace it"
            )
        if differing:
            for p in out.iterdir():
                if p.suffix in (".h5", ".json", ".npy") or ".tmp-" in p.name:
                    p.unlink()
            shutil.rmtree(out / INGEST_DIR, ignore_errors=True)
        elif (out / MANIFEST).exists():
            shutil.rmtree(out / INGEST_DIR, ignore_errors=True)  # a run killed between manifest and clean-up
            return True
    elif any(p.name not in (LOCK_FILE, INGEST_DIR) for p in out.iterdir()):
        # an unfinished ingest (no cache_config.json yet) is kd's own and may be resumed or replaced; anything
        # else is the user's
        raise KDError(
            f"cache.output_dir {out} is not empty and holds no kd cache; refusing to write into it. "
            "Choose an empty or new directory"
        )
    probe = out / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"0" * 4096)
    except OSError as e:
        raise KDError(f"cannot write to cache.output_dir {out}: {disk_error(e)}") from None
    finally:
        probe.unlink(missing_ok=True)
    for p in [*out.glob("*.tmp-*"), *out.glob(f"{INGEST_DIR}/*.tmp-*")]:  # left by a killed run; never counted
        p.unlink()
    return False


def open_output_dir(out: Path) -> DirLock:
    if out.exists() and not out.is_dir():
        raise KDError(f"cache.output_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KDError(f"cannot write to cache.output_dir {out}: {e}") from None
    return DirLock(out, "cache_teacher.py run").acquire()


def to_numpy(t: torch.Tensor, spec: dict):
    """Teacher outputs leave the device in fp32 (q8 quantises from fp32) or in their plain storage dtype; a lowrank
    codec takes the tensor where it is and projects it there (only its r coefficients per token come back)."""
    if spec["name"] == "lowrank":
        return t
    dtype = torch.float32 if spec["name"] != "plain" or spec["dtype"] == "float32" else torch.float16
    return t.to(dtype).cpu().numpy()


def sequence_generator(seed: int, split: str, index: int, device) -> torch.Generator:
    """The random stream of one sequence's sampled targets: a function of (seed, split, index) only."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def ingest_spec(cfg: CacheConfig, tokenizer, vocab_size: int) -> IngestSpec:
    sep = cfg.data.separator_token or tokenizer.eos_token
    sep_id = tokenizer.get_vocab().get(sep) if sep is not None else None
    if sep_id is None:
        raise KDError(f"separator token {sep!r} is not in the teacher's vocabulary; set data.separator_token")
    return IngestSpec(
        seq_len=cfg.data.seq_len,
        sep_id=sep_id,
        pad_id=sep_id,
        sep_text=sep,
        store_text=cfg.cache.store_text,
        text_field=cfg.data.text_field,
        decode_errors=cfg.data.decode_errors,
        bad_records=cfg.data.bad_records,
        eval_fraction=0.0 if cfg.data.has_eval_source else cfg.data.eval_fraction,
        split_seed=cfg.data.split_seed,
        caps={"train": cfg.data.max_train_sequences, "eval": cfg.data.max_eval_sequences},
        vocab_size=vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        unit_bytes=cfg.data.unit_bytes,
        chat=None
        if cfg.data.format != "chat"
        else {
            "fields": [cfg.data.messages_field, cfg.data.prompt_field, cfg.data.completion_field],
            "loss_mask": cfg.data.loss_mask,
            "packing": cfg.data.packing,
            "template": chat_template(cfg.data.chat_template),
        },
    )


def validate(cfg: CacheConfig):
    """Everything cheap, before any heavy work: teacher config, tokenizer, separator, sources (not yet read)."""
    model_cfg = load_model_config(cfg.teacher.model, cfg.teacher.revision)
    check_teacher_fits(cfg, model_cfg)
    tokenizer = load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    if cfg.cache.store_text and not getattr(tokenizer, "is_fast", False):
        raise KDError(
            f"tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): "
            "cache.store_text needs a `tokenizers`-backed (fast) tokenizer; use one, or set "
            "cache.store_text=false"
        )
    if cfg.data.format == "chat":
        check_chat_tokenizer(tokenizer, chat_template(cfg.data.chat_template))
    sources, input_bytes = config_sources(cfg.data)
    return model_cfg, tokenizer, ingest_spec(cfg, tokenizer, model_cfg.vocab_size), sources, input_bytes


@contextmanager
def claimed_output_dir(accelerator, out: Path, cfg_dict: dict, overwrite: bool, spec: IngestSpec, weights: dict):
    """Lock the output directory (main process) for the whole run and prepare it; yields True on every process if
    it already holds this exact cache (nothing to do)."""
    lock = None

    def claim() -> int:
        nonlocal lock
        if not accelerator.is_main_process:
            return 0
        lock = open_output_dir(out)
        complete = prepare_output_dir(out, cfg_dict, overwrite, weights)
        if not complete:
            (out / INGEST_DIR).mkdir(exist_ok=True)
            ingest_cfg = out / INGEST_DIR / "config.json"
            if ingest_cfg.exists() and json.loads(ingest_cfg.read_text()).get("hash") != spec.content_hash():
                print("[ingest] discarding an unfinished ingest made with another data config", flush=True)
                for p in (out / INGEST_DIR).glob("*.h5"):
                    p.unlink()
            write_json_atomic(ingest_cfg, {"hash": spec.content_hash(), "spec": spec.__dict__})
        return int(complete)

    try:
        state = agree(accelerator, claim)
        yield bool(gather_rows(accelerator, [state])[0, 0])  # the main process's finding, on every process
    finally:
        if lock is not None:
            lock.release()


def ingest(cfg: CacheConfig, accelerator, spec: IngestSpec, tokenizer, sources, input_bytes: int | None, out: Path):
    """Documents -> windows on disk, unit by unit (kd/data/ingest.py), with a progress bar and a summary line."""
    from tqdm.auto import tqdm

    capped = cfg.data.max_train_sequences is not None or cfg.data.max_eval_sequences is not None
    bar = tqdm(
        total=None if capped or input_bytes is None else input_bytes / accelerator.num_processes,
        unit="B",
        unit_scale=True,
        desc=f"ingest (rank {accelerator.process_index})",
        disable=not accelerator.is_local_main_process,
        file=sys.stdout,
    )
    seen = {"documents": 0, "tokens": 0, "t0": time.time()}

    def progress(documents: int, tokens: int) -> None:
        seen["documents"] += documents
        seen["tokens"] += tokens
        bar.set_postfix_str(
            f"{seen['documents']:,} documents, {seen['tokens'] / 1e6:.2f}M tokens, "
            f"{seen['tokens'] / max(time.time() - seen['t0'], 1e-9) / 1e6:.2f}M tok/s",
            refresh=False,
        )

    def on_unit(unit) -> None:  # the bar counts input bytes: its ETA holds for local files without a cap
        bar.update(sum(p.end - p.start for p in unit.pieces))

    try:
        index, stats = run_ingest(accelerator, sources, spec, tokenizer, out, progress, on_unit, print)
    finally:
        bar.close()
    if accelerator.is_main_process:
        print(
            f"[ingest] {stats['documents']} documents read ({stats['empty_documents']} empty ones skipped"
            + (f", {stats['bad_records']} records without usable text skipped" if stats["bad_records"] else "")
            + "), "
            f"{stats['tokens']} tokens in {stats['units']} units ({stats['reused']} from an earlier run), "
            f"{index.num_sequences['train']} train / {index.num_sequences['eval']} eval windows, "
            f"{stats['seconds']:.1f} s, {stats['tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s",
            flush=True,
        )
        if spec.chat is not None:
            windows = sum(int(index.starts[s][-1]) for s in SPLITS)  # every window the units hold, before caps
            kept = stats["window_tokens"]
            print(
                f"[ingest] chat: {stats['documents']} conversations in {windows} windows ({cfg.data.packing}, "
                f"padding {1 - kept / max(windows * cfg.data.seq_len, 1):.1%} of positions); "
                f"{stats['truncated']} cut to data.seq_len={cfg.data.seq_len} ({stats['tokens_cut']} tokens lost), "
                f"{stats['dropped']} dropped (nothing in the loss mask left)",
                flush=True,
            )
    for split in SPLITS:
        if index.num_sequences[split] == 0:
            if stats["split_documents"][split] == 0:
                raise KDError(
                    f"the {split} data holds no non-empty text in field '{cfg.data.text_field}' "
                    f"({stats['empty_documents']} empty documents and {stats['bad_records']} records without usable "
                    "text read in all)"
                    + (", and raise data.eval_fraction" if split == "eval" and not cfg.data.has_eval_source else "")
                )
            raise KDError(
                f"the {split} split packs into no windows of {cfg.data.seq_len} tokens; add text, lower "
                "data.seq_len" + (", or raise data.eval_fraction" if split == "eval" else "")
            )
    return index, stats


def cache_metadata(cfg: CacheConfig, config_hash: str, model_cfg, tokenizer, spec: IngestSpec, weights: dict) -> dict:
    """What every shard's kd_meta and the manifest carry: the content's description, nothing about this run."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kd_version": __version__,
        "config_hash": config_hash,
        "teacher": {
            "name_or_path": cfg.teacher.model,
            "revision": cfg.teacher.revision,
            "commit_hash": getattr(model_cfg, "_commit_hash", None),
            "model_type": model_cfg.model_type,
            "vocab_size": model_cfg.vocab_size,
            "hidden_size": model_cfg.hidden_size,
            "num_hidden_layers": model_cfg.num_hidden_layers,
            "dtype": cfg.teacher.dtype,
            "weights": weights,
        },
        "tokenizer": {
            "fingerprint": spec.tokenizer_fingerprint,
            "class": type(tokenizer).__name__,
            "size": len(tokenizer),
            "separator_id": spec.sep_id,
            "separator": spec.sep_text,
        },
        "top_k": cfg.cache.top_k,
        "hidden_layers": cfg.cache.hidden_layers,
        "seq_len": cfg.data.seq_len,
        "codecs": codec_specs(
            model_cfg.vocab_size,
            cfg.cache.id_codec,
            cfg.cache.logprob_codec,
            cfg.cache.hidden_codec,
            cfg.cache.sample_n,
            cfg.cache.hidden_rank,
            cfg.cache.hidden_coefficients,
            chat=spec.chat is not None,
        ),
        "position_targets": "next token (t+1)",
        "sample_n": cfg.cache.sample_n,
        "sampler": SAMPLER if cfg.cache.sample_n else None,
        "store_text": cfg.cache.store_text,
        "dataset": {
            "files": cfg.data.files,
            "eval_files": cfg.data.eval_files,
            "dataset": cfg.data.dataset,
            "dataset_config": cfg.data.dataset_config,
            "dataset_split": cfg.data.dataset_split,
            "eval_dataset_split": cfg.data.eval_dataset_split,
            "text_field": cfg.data.text_field,
            "split_rule": (
                "held-out source: every main document is a training document"
                if cfg.data.has_eval_source
                else f"per document: eval iff blake2b(text, key=split_seed={cfg.data.split_seed}) / 2^64 "
                f"< eval_fraction={cfg.data.eval_fraction}"
            ),
            "unit_bytes": cfg.data.unit_bytes,
        },
    }
    if spec.chat is not None:  # what the loss_mask and segments fields mean (kd/data/chat.py, kd/data/pack.py)
        template = spec.chat["template"]
        meta["chat"] = {
            "fields": spec.chat["fields"],
            "loss_mask": spec.chat["loss_mask"],
            "packing": spec.chat["packing"],
            "template": "the tokenizer's own" if template is None else "data.chat_template",
            # the Jinja text itself (a few KB): a student without a template of its own may render with it
            "template_text": template or tokenizer.chat_template,
            "attention": "causal within each conversation (segments), position ids restart per conversation",
        }
    # shard boundaries: a fixed count, or as many sequences as fit cache.shard_bytes (from the config alone)
    meta["sequences_per_shard"] = cfg.cache.sequences_per_shard or shard_sequences(meta, cfg.cache.shard_bytes)
    return meta


def warn_if_disk_too_small(accelerator, out: Path, meta: dict, my_sequences: int, my_shards: int) -> None:
    """Pre-flight, before the teacher runs: the shards still to write (all processes') against the free space of
    the output disk. A warning, not a refusal: the estimate is approximate, and a full disk stops the run cleanly
    (complete shards kept; a re-run after freeing space resumes)."""
    sequences, shards = (int(v) for v in gather_rows(accelerator, [my_sequences, my_shards]).sum(axis=0))
    if not accelerator.is_main_process or not sequences:
        return
    # + HDF5's own structures, ~64 KiB per shard at most (measured: 46 KiB for 8 sequences of 32 tokens)
    est, high = (sequences * b + shards * (64 << 10) for b in sequence_bytes(meta))
    free = shutil.disk_usage(out).free
    if high > free:
        print(
            f"[cache] warning: the {sequences} sequences still to cache need about {est / 2**30:.2f} GiB (up to "
            f"{high / 2**30:.2f} GiB), and {out} has {free / 2**30:.2f} GiB free: "
            + ("it will not fit" if est > free else "it may not fit")
            + ". Free space or choose another cache.output_dir; if the disk fills, the run stops with an error, "
            "complete shards are kept and a re-run resumes",
            file=sys.stderr,
            flush=True,
        )


class TeacherModel:
    """The teacher, loaded on first use and then kept: the basis fit and the teacher pass share one load, and a
    process with nothing to compute never loads it."""

    def __init__(self, cfg: CacheConfig, device, local_rank: int = 0):
        self.cfg, self.device, self.local_rank, self.model = cfg, device, local_rank, None
        self._offload = None

    def __call__(self):
        if self.model is None:
            t = self.cfg.teacher
            if t.device_map is None:
                self.model = load_causal_lm(t.model, t.revision, t.dtype, t.attn_implementation).to(self.device)
            else:  # one replica over several devices (TeacherConfig.device_map); inputs go where its embeddings are
                self._offload = tempfile.TemporaryDirectory(prefix="kd-teacher-offload-")
                where = placement(t.device_map, t.devices_per_process, self.local_rank, self._offload.name)
                self.model = load_causal_lm(t.model, t.revision, t.dtype, t.attn_implementation, **where)
                if isinstance(t.device_map, str):
                    check_placed(self.model, t.model)
                self.device = execution_device(self.model.get_input_embeddings())
            self.model.eval()
        return self.model


def fit_hidden_basis(cfg: CacheConfig, index: WindowIndex, teacher: TeacherModel, config_hash: str) -> HiddenBasis:
    """The lowrank codec's basis from the first cache.hidden_basis_tokens train tokens (kd/cache/basis.py)."""
    layers = cfg.cache.hidden_layers
    # whole windows in order until hidden_basis_tokens are reached; a window holds at least one token, so the first
    # hidden_basis_tokens windows always suffice
    lengths = index.read("train", 0, min(index.num_sequences["train"], cfg.cache.hidden_basis_tokens), ["lengths"])
    n = int(np.searchsorted(np.cumsum(lengths["lengths"]), cfg.cache.hidden_basis_tokens) + 1)
    n = min(n, index.num_sequences["train"])
    model = teacher()
    fit = BasisFit(len(layers), model.config.hidden_size, teacher.device)
    body = model.base_model if model.base_model is not model else model  # hidden states only: no LM head
    with torch.no_grad():
        for s in range(0, n, cfg.teacher.batch_size):
            fields = ["input_ids", "lengths"] + (["segments"] if cfg.data.format == "chat" else [])
            w = index.read("train", s, min(s + cfg.teacher.batch_size, n), fields)
            ids = torch.from_numpy(w["input_ids"].astype(np.int64)).to(teacher.device)
            pos = None
            if "segments" in w:  # conversations attend only to themselves (kd/data/pack.py segment_positions)
                pos = segment_positions(torch.from_numpy(w["segments"].astype(np.int64))).to(teacher.device)
            states = body(input_ids=ids, position_ids=pos, output_hidden_states=True, use_cache=False).hidden_states
            fit.add(
                torch.stack([states[i].to(teacher.device) for i in layers], dim=1),
                torch.from_numpy(w["lengths"].astype(np.int64)),
            )
    return fit.finish(cfg.cache.hidden_rank, {"config_hash": config_hash, "layers": layers, "sequences": n})


def hidden_basis(cfg: CacheConfig, accelerator, index: WindowIndex, meta: dict, out: Path, teacher: TeacherModel):
    """For a lowrank hidden-state codec: fit the basis (main process) unless a resumed run already wrote it for
    this config, share it with every process, and record its sha256 and kept variance in the codec spec (so in
    every shard and the manifest). None for the other codecs."""
    spec = meta["codecs"]["hidden_states"]
    if spec["name"] != "lowrank" or not cfg.cache.hidden_layers:
        return None
    path = out / BASIS_FILE

    def fit() -> None:
        if not accelerator.is_main_process:
            return
        try:
            if HiddenBasis.load(path).meta.get("config_hash") == meta["config_hash"]:
                return  # written by the run this one resumes: its shards were encoded with it
        except KDError:
            pass  # missing or unreadable: fit it
        t0 = time.time()
        basis = fit_hidden_basis(cfg, index, teacher, meta["config_hash"])
        try:
            basis.write(path)
        except OSError as e:
            raise KDError(f"cannot write {path}: {disk_error(e)}") from None
        print(
            f"[cache] low-rank basis: rank {basis.rank} per layer on {basis.meta['tokens']} tokens, variance kept "
            f"{', '.join(f'{v:.3f}' for v in basis.variance_kept())} (layers {cfg.cache.hidden_layers}), "
            f"{time.time() - t0:.1f} s",
            flush=True,
        )

    agree(accelerator, fit)
    accelerator.wait_for_everyone()
    basis = HiddenBasis.load(path)
    spec.update(basis_sha256=sha256_file(path), variance_kept=basis.variance_kept())
    return basis


def teacher_pass(
    cfg: CacheConfig,
    accelerator,
    index: WindowIndex,
    meta: dict,
    model_cfg,
    out: Path,
    tokenizer,
    sep_id: int,
    teacher: TeacherModel,
    basis: HiddenBasis | None = None,
):
    """Shard j of each split (sequences [j*S, (j+1)*S)) on process j % N; returns (all shard jobs, tokens computed).
    A complete shard is kept only if it was computed from exactly these windows (its input fingerprint) and, with
    the lowrank codec, with this basis. Each shard's sidecar also gets the teacher's own score on its windows
    (kd/textscore.py)."""
    from tqdm.auto import tqdm

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    S, T, codecs = meta["sequences_per_shard"], cfg.data.seq_len, meta["codecs"]
    jobs = [
        (split, j, start, min(start + S, index.num_sequences[split]))
        for split in SPLITS
        for j, start in enumerate(range(0, index.num_sequences[split], S))
    ]
    my_jobs = jobs[rank::world]
    todo = []
    for split, j, a, b in my_jobs:
        info = complete_shard_info(out / shard_name(split, j), meta["config_hash"])
        if info is not None:  # windows are read back only to check a shard that could be kept
            w = index.read(split, a, b, ["input_ids", "lengths"])
            same_basis = info.get("basis_sha256") == meta["codecs"]["hidden_states"].get("basis_sha256")
            if same_basis and info.get("input_sha256") == windows_fingerprint(w["input_ids"], w["lengths"]):
                continue
        todo.append((split, j, a, b))
    if accelerator.is_main_process:
        print(
            f"[cache] {len(jobs)} shards on {world} process(es); rank 0 has {len(my_jobs)}, "
            f"{len(my_jobs) - len(todo)} of them already complete",
            flush=True,
        )
    warn_if_disk_too_small(accelerator, out, meta, sum(b - a for _, _, a, b in todo), len(todo))
    if not todo:  # the model is only loaded if this rank has work
        return jobs, 0
    chat = cfg.data.format == "chat"
    window_fields = ["input_ids", "lengths", "doc_starts"] + (["text", "token_spans"] if cfg.cache.store_text else [])
    window_fields += ["loss_mask", "segments"] if chat else []
    model = teacher()
    device = teacher.device  # where the teacher takes its inputs (its embeddings' device when placed in parts)
    if chat and cfg.data.packing != "one_per_window":
        from kd.train.model import packing_fallback_reason

        reason = packing_fallback_reason(model)
        if reason is not None:
            raise KDError(
                f"data.packing={cfg.data.packing} puts several conversations in a window, and this teacher cannot keep "
                f"them apart: {reason}. Use teacher.attn_implementation=sdpa or eager, or data.packing=one_per_window"
            )
    bar = tqdm(
        total=sum(int(index.read(s, a, b, ["lengths"])["lengths"].sum()) for s, _, a, b in todo),
        unit="tok",
        unit_scale=True,
        desc=f"teacher (rank {rank})",
        disable=not accelerator.is_local_main_process,
        file=sys.stdout,
    )
    tokens_done = 0
    for split, j, a, b in todo:
        w = index.read(split, a, b, window_fields)
        writer = ShardWriter(
            out / shard_name(split, j),
            dict(meta, split=split, shard_index=j, first_sequence=a),
            b - a,
            T,
            cfg.cache.top_k,
            len(cfg.cache.hidden_layers),
            model_cfg.hidden_size,
            codecs,
            cfg.cache.sample_n,
            cfg.cache.store_text,
            basis,
        )
        score = np.zeros(4)  # the teacher's nats, scored tokens, their characters and bytes
        for s in range(0, b - a, cfg.teacher.batch_size):
            e = min(s + cfg.teacher.batch_size, b - a)
            ids = torch.from_numpy(w["input_ids"][s:e].astype(np.int64)).to(device)
            lengths = torch.from_numpy(w["lengths"][s:e].astype(np.int64))
            mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(device)
            gens = [sequence_generator(cfg.cache.sample_seed, split, i, device) for i in range(a + s, a + e)]
            scores, pos = {}, None
            if chat:
                pos = segment_positions(torch.from_numpy(w["segments"][s:e].astype(np.int64))).to(device)
            lp, top_ids, hidden, samples = teacher_targets(
                model,
                ids,
                mask,
                cfg.cache.top_k,
                cfg.cache.hidden_layers,
                sample_n=cfg.cache.sample_n,
                sample_generators=gens,
                scores=scores,
                position_ids=pos,
            )
            if chat:  # the targets eval/ce averages over: position t scores token t+1 (kd.textscore.chat_targets)
                targets = chat_targets(w["loss_mask"][s:e], w["segments"][s:e])
                scored = torch.zeros(e - s, T, dtype=torch.bool)
                scored[:, :-1] = torch.from_numpy(targets[:, 1:])
                units = target_text_units(tokenizer, w["input_ids"][s:e], w["lengths"][s:e], None, targets).sum(0)
            else:
                scored = torch.arange(T)[None, :] < (lengths[:, None] - 1)  # the targets eval/ce averages over
                units = target_text_units(tokenizer, w["input_ids"][s:e], w["lengths"][s:e], sep_id).sum(0)
            score += [-float(scores["target_logprobs"].cpu().double()[scored].sum()), int(scored.sum()), *units]
            writer.append(
                w["input_ids"][s:e],
                w["lengths"][s:e],
                np.arange(a + s, a + e),
                top_ids.cpu().numpy(),
                to_numpy(lp, codecs["topk_logprobs"]),
                None if hidden is None else to_numpy(hidden, codecs["hidden_states"]),
                None if samples is None else (samples[0].cpu().numpy(), samples[1].cpu().numpy()),
                (w["text"][s:e], w["token_spans"][s:e]) if cfg.cache.store_text else None,
                (w["loss_mask"][s:e], w["segments"][s:e]) if chat else None,
            )
            tokens_done += int(lengths.sum())
            bar.update(int(lengths.sum()))
        writer.commit(
            {
                "input_sha256": windows_fingerprint(w["input_ids"], w["lengths"]),
                **({"basis_sha256": codecs["hidden_states"]["basis_sha256"]} if basis is not None else {}),
                "num_documents": int(w["doc_starts"].sum()),
                "teacher_score": {
                    "nats": float(score[0]),
                    **dict(zip(("tokens", "chars", "bytes"), map(int, score[1:]))),
                },
            }
        )
    bar.close()
    return jobs, tokens_done


def write_manifest(out: Path, jobs: list, meta: dict, cfg_dict: dict, index: WindowIndex, stats: dict) -> dict:
    """Collect the sidecars into manifest.json (main process): the cache exists from here on."""
    splits, records = {}, {}
    for split in SPLITS:
        shards = [json.loads(sidecar_path(out / shard_name(split, j)).read_text()) for s, j, _, _ in jobs if s == split]
        records[split] = shards
        for info in shards:
            info.pop("config_hash")
        splits[split] = {
            "num_sequences": index.num_sequences[split],
            "num_tokens": sum(sh["num_tokens"] for sh in shards),
            "num_documents": sum(sh["num_documents"] for sh in shards),
            # sha256 over the shards' input fingerprints, in order: the windows the teacher saw
            "fingerprint": hashlib.sha256("".join(sh["input_sha256"] for sh in shards).encode()).hexdigest(),
            # the per-shard records go to a binary index beside the manifest: at 100,000 shards, JSON records
            # would make the manifest ~37 MB and its parse the slowest part of opening a cache
            "shard_index": write_shard_index(out, split, shards),
        }
        if all("teacher_score" in sh for sh in shards):  # shards written by an older kd carry none
            total = {k: sum(sh["teacher_score"][k] for sh in shards) for k in ("nats", "tokens", "chars", "bytes")}
            splits[split]["teacher_score"] = score_record(
                total["nats"], total["tokens"], total["chars"], total["bytes"]
            )
    total_bytes = sum(sh["bytes"] for sp in records.values() for sh in sp)
    total_tokens = sum(sp["num_tokens"] for sp in splits.values())
    meta = dict(
        meta,
        dataset=dict(
            meta["dataset"],
            fingerprint=hashlib.sha256("".join(splits[s]["fingerprint"] for s in SPLITS).encode()).hexdigest(),
        ),
    )
    # `ingest` and `created_unix` describe this run, not the content: with more processes, or after a resume,
    # more input may have been read past a cap
    manifest = dict(
        meta,
        config=cfg_dict,
        splits=splits,
        bytes=total_bytes,
        bytes_per_token=total_bytes / total_tokens,
        created_unix=time.time(),
        ingest={
            k: stats[k]
            for k in ("documents", "empty_documents", "bad_records", "units", "reused", "tokens", "seconds")
            + (CHAT_COUNTS if "chat" in meta else ())
        },
    )
    # config_hash stays: the cache's identity, which every shard's kd_meta repeats and the reader checks
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def main(cfg: CacheConfig) -> Path:
    from accelerate import Accelerator

    t_start = time.time()
    accelerator = Accelerator()
    out = Path(cfg.cache.output_dir)
    cfg_dict = to_dict(cfg)

    # 1. Validate everything cheap before any heavy work (an error on any process stops every process).
    model_cfg, tokenizer, spec, sources, input_bytes = agree(accelerator, lambda: validate(cfg))
    # The teacher is identified by its weights, not its path: hashed once (main process), shared with all.
    weights = [
        weights_fingerprint(cfg.teacher.model, cfg.teacher.revision, getattr(model_cfg, "_commit_hash", None))
        if accelerator.is_main_process
        else None
    ]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(weights)
    weights = weights[0]
    # The shard format is part of the identity: a resume by a kd that writes another format redoes the shards.
    content = dict(content_config(cfg_dict), teacher_weights=weights["digest"], shard_format=FORMAT_VERSION)
    if cfg.cache.sample_n:  # shards drawn by another sampling scheme are redone, never mixed in on resume
        content["sampler"] = SAMPLER
    config_hash = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    # 2. The output directory, locked by the main process for the whole run: a second run on it is refused.
    with claimed_output_dir(accelerator, out, cfg_dict, cfg.cache.overwrite, spec, weights) as complete:
        if complete:
            if accelerator.is_main_process:
                print(f"[cache] {out} is already complete (same config); nothing to do", flush=True)
            return out

        # 3. Ingest: documents -> per-document split -> packed windows in DIR/ingest/.
        index, stats = ingest(cfg, accelerator, spec, tokenizer, sources, input_bytes, out)
        # Only now, with the input ingested, does the directory become this config's cache: a run refused above
        # leaves nothing that would block the corrected re-run.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and not (out / CONFIG_FILE).exists():
            write_json_atomic(
                out / CONFIG_FILE,
                {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg_dict, "teacher_weights": weights},
            )

        # 4. The teacher pass over the windows, shard by shard.
        meta = cache_metadata(cfg, config_hash, model_cfg, tokenizer, spec, weights)
        teacher = TeacherModel(cfg, accelerator.device, accelerator.local_process_index)
        basis = hidden_basis(cfg, accelerator, index, meta, out, teacher)
        jobs, tokens_done = teacher_pass(
            cfg, accelerator, index, meta, model_cfg, out, tokenizer, spec.sep_id, teacher, basis
        )

        # 5. Once every process is done, the main one writes the manifest; the windows live on in the shards.
        accelerator.wait_for_everyone()
        tokens_all = int(accelerator.reduce(torch.tensor([tokens_done], device=accelerator.device), "sum").item())
        if accelerator.is_main_process:
            m = write_manifest(out, jobs, meta, cfg_dict, index, stats)
            shutil.rmtree(out / INGEST_DIR, ignore_errors=True)
            elapsed = time.time() - t_start
            n_tokens = sum(sp["num_tokens"] for sp in m["splits"].values())
            print(
                f"[cache] done: {sum(sp['num_sequences'] for sp in m['splits'].values())} sequences, {n_tokens} "
                f"tokens ({tokens_all} computed now), {sum(sp['shard_index']['num_shards'] for sp in m['splits'].values())} shards, "
                f"{m['bytes_per_token']:.0f} bytes/token, {elapsed:.1f} s, {tokens_all / elapsed:.0f} tokens/s -> {out}",
                flush=True,
            )
        accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(CacheConfig, None, __doc__.split("\n\n")[0])))
