"""The caching pass's stages, in the order cache_teacher.py calls them: check the inputs (`validate`), identify the
teacher's weights, ingest the text into windows (`ingest`), fit the low-rank basis (`hidden_basis`), run the teacher
over the windows into a CacheWriter (`teacher_pass`).

Every stage is split between processes and none of its output depends on their number: an N-process cache equals
the one-process cache, byte for byte.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kd.cache.basis import BASIS_FILE, BasisFit, HiddenBasis
from kd.cache.format import SPLITS, TEACHER_SCORE_COLUMNS
from kd.cache.manifest import cache_metadata
from kd.cache.plan import CachePlan, cache_bytes, plan_cache
from kd.cache.writer import CacheWriter, ShardJob
from kd.cache_config import CacheConfig
from kd.data.chat import chat_template, check_chat_tokenizer
from kd.data.ingest import IngestSpec, WindowIndex, run_ingest, windows_fingerprint
from kd.data.pack import PIECE_CHARS, segment_positions
from kd.data.sources import config_sources
from kd.dist import agree, broadcast_object, gather_rows
from kd.errors import KDError
from kd.io import disk_error, sha256_file
from kd.models import (
    load_model_config,
    load_tokenizer,
    packing_fallback_reason,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from kd.served import ServedTeacher
from kd.teacher import TeacherModel, TeacherOutputs, TeacherTargets, sequence_generator, teacher_targets
from kd.textscore import chat_targets, target_text_units


@dataclass
class CacheInputs:
    """What `validate` finds before any heavy work: the teacher's config and tokenizer, how text becomes windows,
    and the sources (not yet read; input_bytes is None where their size is unknown, e.g. a streamed dataset)."""

    model_cfg: object
    tokenizer: object
    spec: IngestSpec
    sources: list
    input_bytes: int | None


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


def validate(cfg: CacheConfig) -> CacheInputs:
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
    spec = ingest_spec(cfg, tokenizer, model_cfg.vocab_size)
    return CacheInputs(model_cfg, tokenizer, spec, sources, input_bytes)


def plan(cfg: CacheConfig) -> CachePlan:
    """`kd cache --dry-run`: the checks `validate` makes, then the plan (kd/cache/plan.py). No weights are read, so
    the teacher's identity is not computed; nothing is written to the output directory."""
    inputs = validate(cfg)
    meta = cache_metadata(cfg, "", inputs.model_cfg, inputs.tokenizer, inputs.spec, {"digest": "(dry run)"})
    return plan_cache(meta, inputs.spec, inputs.tokenizer, inputs.sources, Path(cfg.cache.output_dir))


def teacher_source(cfg: CacheConfig, accelerator, inputs: CacheInputs) -> TeacherModel | ServedTeacher:
    """The teacher the pass runs: in process (loaded on first use), or behind a server (teacher.server), asked
    now what it serves and checked against what the cache asks of it (kd.served.ServedTeacher.check)."""
    if cfg.teacher.server is None:
        return TeacherModel(cfg, accelerator.device, accelerator.local_process_index)
    served = ServedTeacher(cfg, inputs.tokenizer, inputs.model_cfg.vocab_size, accelerator.process_index)
    served.check()
    if accelerator.is_main_process:
        print(f"[cache] teacher: {served.served.describe()}", flush=True)
    return served


def teacher_weights(accelerator, cfg: CacheConfig, model_cfg, teacher: TeacherModel | ServedTeacher) -> dict:
    """The teacher is identified by its weights, not its path: hashed once (main process), shared with all. A
    served teacher by what the server says it serves (kd.served.ServedModel.record)."""
    if isinstance(teacher, ServedTeacher):
        return broadcast_object(accelerator, teacher.served.record)
    return broadcast_object(
        accelerator,
        lambda: weights_fingerprint(cfg.teacher.model, cfg.teacher.revision, getattr(model_cfg, "_commit_hash", None)),
    )


def ingest(cfg: CacheConfig, accelerator, inputs: CacheInputs, out: Path) -> tuple[WindowIndex, dict]:
    """Documents -> windows on disk, unit by unit (kd/data/ingest.py), with a progress bar and a summary line;
    a split that packs into no window is an error naming what to change."""
    capped = cfg.data.max_train_sequences is not None or cfg.data.max_eval_sequences is not None
    bar = tqdm(
        total=None if capped or inputs.input_bytes is None else inputs.input_bytes / accelerator.num_processes,
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
        index, stats = run_ingest(
            accelerator, inputs.sources, inputs.spec, inputs.tokenizer, out, progress, on_unit, print
        )
    finally:
        bar.close()
    if accelerator.is_main_process:
        print(
            f"[ingest] {stats['documents']} documents read ({stats['empty_documents']} empty ones skipped"
            + (f", {stats['bad_records']} records without usable text skipped" if stats["bad_records"] else "")
            + (
                f", {stats['long_documents']} longer than {PIECE_CHARS:,} characters tokenized in pieces"
                if stats["long_documents"]
                else ""
            )
            + "), "
            f"{stats['tokens']} tokens in {stats['units']} units ({stats['reused']} from an earlier run), "
            f"{index.num_sequences['train']} train / {index.num_sequences['eval']} eval windows, "
            f"{stats['seconds']:.1f} s, {stats['tokens'] / max(stats['seconds'], 1e-9):.0f} tokens/s",
            flush=True,
        )
        if inputs.spec.chat is not None:
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
            other = stats["split_documents"]["train" if split == "eval" else "eval"]
            if stats["split_documents"][split] == 0 and other and not cfg.data.has_eval_source:
                # the text is there, but the per-document hash sent all of it to the other side
                raise KDError(
                    f"no document fell in the {split} split: the per-document split (data.eval_fraction="
                    f"{cfg.data.eval_fraction}) sent all {other} documents to the other one. Documents are split "
                    "whole and identical documents always land on the same side, so a corpus of few distinct "
                    "documents can leave a split empty: give a held-out source (data.eval_files or "
                    "data.eval_dataset_split), more distinct documents, or another data.eval_fraction"
                )
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


def warn_if_disk_too_small(accelerator, out: Path, meta: dict, my_sequences: int, my_shards: int) -> None:
    """Pre-flight, before the teacher runs: the shards still to write (all processes') against the free space of
    the output disk. A warning, not a refusal: the estimate is approximate, and a full disk stops the run cleanly
    (complete shards kept; a re-run after freeing space resumes)."""
    sequences, shards = (int(v) for v in gather_rows(accelerator, [my_sequences, my_shards]).sum(axis=0))
    if not accelerator.is_main_process or not sequences:
        return
    est, high = cache_bytes(meta, sequences, shards)  # the dry run's estimate (kd.cache.plan)
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


def hidden_basis(cfg: CacheConfig, accelerator, index: WindowIndex, writer: CacheWriter, teacher: TeacherModel):
    """For a lowrank hidden-state codec: fit the basis (main process) unless a resumed run already wrote it for
    this config, share it with every process, and record its sha256 and kept variance in the codec spec (so in
    every shard and the manifest). None for the other codecs."""
    meta = writer.meta
    spec = meta["codecs"]["hidden_states"]
    if spec["name"] != "lowrank" or not cfg.cache.hidden_layers:
        return None
    path = writer.out / BASIS_FILE

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


def to_numpy(t: torch.Tensor, spec: dict):
    """Teacher outputs leave the device in fp32 (q8 quantises from fp32) or in their plain storage dtype; a lowrank
    codec takes the tensor where it is and projects it there (only its r coefficients per token come back)."""
    if spec["name"] == "lowrank":
        return t
    dtype = torch.float32 if spec["name"] != "plain" or spec["dtype"] == "float32" else torch.float16
    return t.to(dtype).cpu().numpy()


def on_host(x) -> np.ndarray:
    """A teacher's output as a numpy array: an in-process teacher's tensors leave its device, a server's arrays are
    already here."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class InProcessTeacher:
    """The in-process teacher's targets over windows, in the shape of kd.served.ServedTeacher.run: the other source
    of a caching pass."""

    cfg: CacheConfig
    model: torch.nn.Module
    device: torch.device  # where the teacher takes its inputs (its embeddings' device when placed in parts)

    def run(self, work, chat: bool):
        """`work`: (job, windows w, s, e) items -> (item, TeacherTargets of windows [s, e)) in order."""
        for item in work:
            yield item, self.forward(*item, chat)

    def forward(self, job: ShardJob, w: dict, s: int, e: int, chat: bool) -> TeacherTargets:
        """One forward over windows [s, e) (kd.teacher.teacher_targets); each window's draws from its own
        generator, so they depend on the window alone."""
        cfg, device, T = self.cfg, self.device, self.cfg.data.seq_len
        ids = torch.from_numpy(w["input_ids"][s:e].astype(np.int64)).to(device)
        lengths = torch.from_numpy(w["lengths"][s:e].astype(np.int64))
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(device)
        gens = [
            sequence_generator(cfg.cache.sample_seed, job.split, i, device) for i in range(job.first + s, job.first + e)
        ]
        scores, pos = {}, None
        if chat:
            pos = segment_positions(torch.from_numpy(w["segments"][s:e].astype(np.int64))).to(device)
        lp, top_ids, hidden, samples = teacher_targets(
            self.model,
            ids,
            mask,
            cfg.cache.top_k,
            cfg.cache.hidden_layers,
            sample_n=cfg.cache.sample_n,
            sample_generators=gens,
            scores=scores,
            position_ids=pos,
        )
        return TeacherTargets(lp, top_ids, scores["target_logprobs"], hidden, samples)


@dataclass
class CacheOutputs:
    """What a batch of the teacher's targets gives the cache (TeacherOutputs), whichever source computed them, the
    teacher's own score on each window among them ([nats, scored tokens, their characters, their bytes],
    kd/textscore.py)."""

    cfg: CacheConfig
    codecs: dict  # the cache's codec record: how each output leaves the device (to_numpy)
    tokenizer: object
    sep_id: int

    def __call__(self, job: ShardJob, w: dict, s: int, e: int, got: TeacherTargets) -> TeacherOutputs:
        cfg, T, chat = self.cfg, self.cfg.data.seq_len, self.cfg.data.format == "chat"
        lengths = w["lengths"][s:e].astype(np.int64)
        if chat:  # the targets eval/ce averages over: position t scores token t+1 (kd.textscore.chat_targets)
            targets = chat_targets(w["loss_mask"][s:e], w["segments"][s:e])
            scored = np.zeros((e - s, T), dtype=bool)
            scored[:, :-1] = targets[:, 1:]
            units = target_text_units(self.tokenizer, w["input_ids"][s:e], w["lengths"][s:e], None, targets)
        else:
            scored = np.arange(T)[None, :] < (lengths[:, None] - 1)  # the targets eval/ce averages over
            units = target_text_units(self.tokenizer, w["input_ids"][s:e], w["lengths"][s:e], self.sep_id)
        nats = -np.where(scored, on_host(got.target_logprobs).astype(np.float64), 0.0).sum(1)
        return TeacherOutputs(
            input_ids=w["input_ids"][s:e],
            lengths=w["lengths"][s:e],
            sequence_index=np.arange(job.first + s, job.first + e),
            topk_ids=on_host(got.topk_ids),
            topk_logprobs=to_numpy(torch.as_tensor(got.topk_logprobs), self.codecs["topk_logprobs"]),
            hidden_states=None
            if got.hidden_states is None
            else to_numpy(got.hidden_states, self.codecs["hidden_states"]),
            sample_ids=None if got.samples is None else got.samples[0].cpu().numpy(),
            sample_counts=None if got.samples is None else got.samples[1].cpu().numpy(),
            text=w["text"][s:e] if cfg.cache.store_text else None,
            token_spans=w["token_spans"][s:e] if cfg.cache.store_text else None,
            loss_mask=w["loss_mask"][s:e] if chat else None,
            segments=w["segments"][s:e] if chat else None,
            teacher_score=np.column_stack([nats, scored.sum(1), units]).astype(np.float64),
        )


def teacher_pass(
    cfg: CacheConfig,
    accelerator,
    index: WindowIndex,
    writer: CacheWriter,
    inputs: CacheInputs,
    teacher: TeacherModel | ServedTeacher,
    basis: HiddenBasis | None = None,
) -> tuple[list[ShardJob], int]:
    """Shard j of each split (sequences [j*S, (j+1)*S)) on process j % N; returns (all shard jobs, tokens computed
    by this process). A complete shard from an earlier run is kept (CacheWriter.is_complete). Each shard's sidecar
    also gets the teacher's own score on its windows (kd/textscore.py)."""
    jobs = writer.jobs(index.num_sequences)
    my_jobs = writer.my_jobs(jobs)

    def fingerprint(job: ShardJob):  # windows are read back only to check a shard that could be kept
        def windows() -> str:
            w = index.read(job.split, job.first, job.end, ["input_ids", "lengths"])
            return windows_fingerprint(w["input_ids"], w["lengths"])

        return windows

    todo = [job for job in my_jobs if not writer.is_complete(job, fingerprint(job))]
    if accelerator.is_main_process:
        print(
            f"[cache] {len(jobs)} shards on {accelerator.num_processes} process(es); rank 0 has {len(my_jobs)}, "
            f"{len(my_jobs) - len(todo)} of them already complete",
            flush=True,
        )
    warn_if_disk_too_small(accelerator, writer.out, writer.meta, sum(j.num_sequences for j in todo), len(todo))
    if not todo:  # the model is only loaded if this rank has work
        return jobs, 0
    chat, codecs = cfg.data.format == "chat", writer.meta["codecs"]
    window_fields = ["input_ids", "lengths", "doc_starts"] + (["text", "token_spans"] if cfg.cache.store_text else [])
    window_fields += ["loss_mask", "segments"] if chat else []
    if isinstance(teacher, ServedTeacher):  # the server attends within each conversation (kd/served.py)
        source = teacher
    else:
        model = teacher()
        if chat and cfg.data.packing != "one_per_window":
            reason = packing_fallback_reason(model)
            if reason is not None:
                raise KDError(
                    f"data.packing={cfg.data.packing} puts several conversations in a window, and this teacher cannot "
                    f"keep them apart: {reason}. Use teacher.attn_implementation=sdpa or eager, or "
                    "data.packing=one_per_window"
                )
        source = InProcessTeacher(cfg, model, teacher.device)
    to_cache = CacheOutputs(cfg, codecs, inputs.tokenizer, inputs.spec.sep_id)
    bar = tqdm(
        total=sum(int(index.read(j.split, j.first, j.end, ["lengths"])["lengths"].sum()) for j in todo),
        unit="tok",
        unit_scale=True,
        desc=f"teacher (rank {accelerator.process_index})",
        disable=not accelerator.is_local_main_process,
        file=sys.stdout,
    )
    tokens_done = 0

    def work():  # every batch of windows of this process's shards, in order; a shard's windows read when reached
        for job in todo:
            w = index.read(job.split, job.first, job.end, window_fields)
            for s in range(0, job.num_sequences, cfg.teacher.batch_size):
                yield job, w, s, min(s + cfg.teacher.batch_size, job.num_sequences)

    # the open shard; the teacher's nats, scored tokens, their characters and bytes over its windows so far
    shard, score = None, np.zeros(len(TEACHER_SCORE_COLUMNS))
    # a served teacher has several requests in flight (kd.served.ServedTeacher.run), across shards too: the next
    # shard's first requests go out while the last ones of this shard are answered
    for (job, w, s, e), targets in source.run(work(), chat):
        outputs = to_cache(job, w, s, e, targets)
        if s == 0:
            shard, score = writer.shard(job, basis), np.zeros(len(TEACHER_SCORE_COLUMNS))
        score += outputs.teacher_score.sum(0)
        shard.append(outputs)
        tokens_done += int(outputs.lengths.sum())
        bar.update(int(outputs.lengths.sum()))
        if e == job.num_sequences:
            shard.commit(
                {
                    "input_sha256": windows_fingerprint(w["input_ids"], w["lengths"]),
                    **({"basis_sha256": codecs["hidden_states"]["basis_sha256"]} if basis is not None else {}),
                    "num_documents": int(w["doc_starts"].sum()),
                    # nats a float, the counts whole numbers
                    "teacher_score": dict(zip(TEACHER_SCORE_COLUMNS, [float(score[0]), *map(int, score[1:])])),
                }
            )
    bar.close()
    return jobs, tokens_done
