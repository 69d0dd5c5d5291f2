"""Run a teacher ONCE over a text dataset and store its top-k log-probs and hidden states in HDF5 shards.

    accelerate launch cache_teacher.py --config configs/shakespeare_smollm2.yaml [dotted.key=value ...]
    python cache_teacher.py --config configs/shakespeare_smollm2.yaml          # one process

The cache directory is then read by every train_student.py run, so the teacher never shares memory with the
student. Format: see kd/cache.py. With N processes each rank writes a deterministic, disjoint set of whole
shards (shard j goes to rank j % N), so the union is identical to a one-process cache. Re-running the same
command resumes: complete shards (checked by sha256) are kept, the rest are redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kd import __version__, data
from kd.cache import (CONFIG_FILE, FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, complete_shard_info,
                      shard_name, sidecar_path, write_json_atomic)
from kd.codecs import codec_specs
from kd.cache_config import NON_CONTENT_KEYS, CacheConfig
from kd.config import diff_keys, flatten, parse_cli, to_dict
from kd.errors import KDError, run_cli
from kd.teacher import load_causal_lm, load_model_config, load_tokenizer, teacher_targets, tokenizer_fingerprint


def content_config(cfg_dict: dict) -> dict:
    """The config minus keys that do not change what is stored."""
    return {k: v for k, v in flatten(cfg_dict).items() if k not in NON_CONTENT_KEYS}


def check_teacher_fits(cfg: CacheConfig, model_cfg) -> None:
    """Fail before loading weights if the request cannot work with this teacher."""
    vocab, layers = model_cfg.vocab_size, model_cfg.num_hidden_layers
    max_pos = getattr(model_cfg, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise KDError(f"data.seq_len={cfg.data.seq_len} is longer than the teacher's context ({max_pos} positions)")
    if cfg.cache.top_k > vocab:
        raise KDError(f"cache.top_k={cfg.cache.top_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    bad = [i for i in cfg.cache.hidden_layers if not 0 <= i <= layers]
    if bad:
        raise KDError(f"cache.hidden_layers {bad} out of range: this teacher has hidden states 0..{layers} "
                      f"(0 = embeddings, {layers} = last layer)")


def prepare_output_dir(out: Path, cfg_dict: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse a directory that holds something else; on the main process, create it and clear stale temp files."""
    if out.exists() and not out.is_dir():
        raise KDError(f"cache.output_dir {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        cfg_file = out / CONFIG_FILE
        if not cfg_file.exists():
            raise KDError(f"cache.output_dir {out} is not empty and holds no kd cache; refusing to write into it. "
                          "Choose an empty or new directory")
        old = json.loads(cfg_file.read_text())["config"]
        differing = diff_keys(content_config(old), content_config(cfg_dict))
        if differing and not overwrite:
            raise KDError(f"{out} holds a cache made with a different config (differing keys: {', '.join(differing)}). "
                          "Use another cache.output_dir, or cache.overwrite=true to replace it")
        if differing and is_main:
            for p in out.iterdir():
                if p.suffix in (".h5", ".json") or ".tmp-" in p.name:
                    p.unlink()
    if not is_main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise KDError(f"cannot write to cache.output_dir {out}: {e}") from None
    for p in out.glob("*.tmp-*"):  # left by a killed run; never counted as shards
        p.unlink()


def to_numpy(t: torch.Tensor, spec: dict) -> np.ndarray:
    dtype = torch.float32 if spec["name"] != "plain" or spec["dtype"] == "float32" else torch.float16
    return t.to(dtype).cpu().numpy()


def sequence_generator(seed: int, split: str, index: int, device) -> torch.Generator:
    """The random stream of one sequence's sampled targets: a function of (seed, split, index) only."""
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def main(cfg: CacheConfig) -> Path:
    from accelerate import Accelerator

    t_start = time.time()
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.cache.output_dir)
    cfg_dict = to_dict(cfg)
    config_hash = hashlib.sha256(json.dumps(content_config(cfg_dict), sort_keys=True).encode()).hexdigest()

    # 1. Validate everything cheap before any heavy work: teacher config, tokenizer, output directory, data.
    model_cfg = load_model_config(cfg.teacher.model, cfg.teacher.revision)
    check_teacher_fits(cfg, model_cfg)
    tokenizer = load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    prepare_output_dir(out, cfg_dict, cfg.cache.overwrite, accelerator.is_main_process)

    # 2. Documents -> document-level train/eval split -> packed windows. Every rank does this identically.
    sep = cfg.data.separator_token or tokenizer.eos_token
    sep_id = tokenizer.get_vocab().get(sep) if sep is not None else None
    if sep_id is None:
        raise KDError(f"separator token {sep!r} is not in the teacher's vocabulary; set data.separator_token")
    texts = data.load_documents(cfg.data.files, cfg.data.dataset, cfg.data.dataset_config, cfg.data.dataset_split,
                                cfg.data.text_field)
    train_docs, eval_docs = data.split_documents(len(texts), cfg.data.eval_documents, cfg.data.eval_fraction,
                                                 cfg.data.split_seed)
    packed = {}
    for split, docs, cap in (("train", train_docs, cfg.data.max_train_sequences), ("eval", eval_docs, cfg.data.max_eval_sequences)):
        docs_text = [texts[i] for i in docs]
        tokens, offsets = data.tokenize(tokenizer, docs_text, offsets=cfg.cache.store_text)
        packed[split] = data.pack(tokens, docs, cfg.data.seq_len, sep_id, sep_id, cap, offsets, docs_text, sep)
        if len(packed[split].lengths) == 0:
            raise KDError(f"the {split} split packs into no windows of {cfg.data.seq_len} tokens; add text or lower data.seq_len")
        if packed[split].input_ids.max() >= model_cfg.vocab_size:
            raise KDError(f"the tokenizer produced ids >= the teacher's vocab_size ({model_cfg.vocab_size}): "
                          "tokenizer and model do not belong together")

    # Only now, with every input checked, does the directory become this config's cache: a run refused above
    # leaves nothing that would block the corrected re-run.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(out / CONFIG_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg_dict})

    # 3. Metadata every shard and the manifest carry.
    field_codecs = codec_specs(model_cfg.vocab_size, cfg.cache.id_codec, cfg.cache.logprob_codec,
                               cfg.cache.hidden_codec, cfg.cache.sample_n)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kd_version": __version__, "config_hash": config_hash,
        "teacher": {"name_or_path": cfg.teacher.model, "revision": cfg.teacher.revision,
                    "commit_hash": getattr(model_cfg, "_commit_hash", None), "model_type": model_cfg.model_type,
                    "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.hidden_size,
                    "num_hidden_layers": model_cfg.num_hidden_layers, "dtype": cfg.teacher.dtype},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "class": type(tokenizer).__name__,
                      "size": len(tokenizer), "separator_id": sep_id, "separator": sep},
        "top_k": cfg.cache.top_k, "hidden_layers": cfg.cache.hidden_layers, "seq_len": cfg.data.seq_len,
        "codecs": field_codecs, "position_targets": "next token (t+1)",
        "sample_n": cfg.cache.sample_n, "store_text": cfg.cache.store_text,
        "dataset": {"files": cfg.data.files, "dataset": cfg.data.dataset, "dataset_config": cfg.data.dataset_config,
                    "dataset_split": cfg.data.dataset_split, "text_field": cfg.data.text_field,
                    "num_documents": len(texts),
                    "fingerprint": hashlib.sha256("".join(packed[s].fingerprint() for s in SPLITS).encode()).hexdigest()},
    }

    # 4. Shard plan: shard boundaries depend only on the config, never on the number of processes.
    S = cfg.cache.sequences_per_shard
    jobs = [(split, j, start, min(start + S, len(packed[split].lengths)))
            for split in SPLITS for j, start in enumerate(range(0, len(packed[split].lengths), S))]
    my_jobs = jobs[rank::world]
    todo = [job for job in my_jobs if complete_shard_info(out / shard_name(job[0], job[1]), config_hash) is None]
    todo_tokens = sum(int(packed[s].lengths[a:b].sum()) for s, _, a, b in todo)
    if accelerator.is_main_process:
        print(f"[cache] {len(jobs)} shards on {world} process(es); rank 0 has {len(my_jobs)}, "
              f"{len(my_jobs) - len(todo)} of them already complete", flush=True)

    # 5. The teacher pass. The model is only loaded if this rank has work.
    tokens_done = 0
    if todo:
        from tqdm.auto import tqdm

        model = load_causal_lm(cfg.teacher.model, cfg.teacher.revision, cfg.teacher.dtype,
                               cfg.teacher.attn_implementation).to(accelerator.device).eval()
        bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"caching (rank {rank})",
                   disable=not accelerator.is_local_main_process, file=sys.stdout)
        for split, j, a, b in todo:
            p = packed[split]
            writer = ShardWriter(out / shard_name(split, j), dict(meta, split=split, shard_index=j, first_sequence=a),
                                 b - a, cfg.data.seq_len, cfg.cache.top_k, len(cfg.cache.hidden_layers),
                                 model_cfg.hidden_size, field_codecs, cfg.cache.sample_n, cfg.cache.store_text)
            for s in range(a, b, cfg.teacher.batch_size):
                e = min(s + cfg.teacher.batch_size, b)
                ids = torch.from_numpy(p.input_ids[s:e]).to(accelerator.device)
                lengths = torch.from_numpy(p.lengths[s:e])
                mask = (torch.arange(cfg.data.seq_len)[None, :] < lengths[:, None]).long().to(accelerator.device)
                gens = [sequence_generator(cfg.cache.sample_seed, split, i, accelerator.device) for i in range(s, e)]
                lp, top_ids, hidden, samples = teacher_targets(model, ids, mask, cfg.cache.top_k, cfg.cache.hidden_layers,
                                                               sample_n=cfg.cache.sample_n, sample_generators=gens)
                # values leave the device in fp32 (q8 quantises from fp32) or in their plain storage dtype
                writer.append(p.input_ids[s:e], p.lengths[s:e], np.arange(s, e), top_ids.cpu().numpy(),
                              to_numpy(lp, field_codecs["topk_logprobs"]),
                              None if hidden is None else to_numpy(hidden, field_codecs["hidden_states"]),
                              None if samples is None else (samples[0].cpu().numpy(), samples[1].cpu().numpy()),
                              (p.texts[s:e], p.spans[s:e]) if cfg.cache.store_text else None)
                n_tok = int(lengths.sum())
                tokens_done += n_tok
                bar.update(n_tok)
            writer.commit()
        bar.close()

    # 6. Once every rank is done, rank 0 collects the sidecars into the manifest: the cache exists from here on.
    accelerator.wait_for_everyone()
    tokens_all = int(accelerator.reduce(torch.tensor([tokens_done], device=accelerator.device), "sum").item())
    if accelerator.is_main_process:
        splits = {}
        for split in SPLITS:
            shards = [json.loads(sidecar_path(out / shard_name(split, j)).read_text())
                      for s, j, _, _ in jobs if s == split]
            for info in shards:
                info.pop("config_hash")
            splits[split] = {"num_sequences": len(packed[split].lengths), "num_tokens": packed[split].num_tokens,
                             "documents": packed[split].documents, "fingerprint": packed[split].fingerprint(),
                             "shards": shards}
        total_bytes = sum(sh["bytes"] for sp in splits.values() for sh in sp["shards"])
        total_tokens = sum(sp["num_tokens"] for sp in splits.values())
        manifest = dict(meta, config=cfg_dict, splits=splits, bytes=total_bytes, bytes_per_token=total_bytes / total_tokens,
                        created_unix=time.time())
        manifest.pop("config_hash")
        write_json_atomic(out / MANIFEST, manifest)
        elapsed = time.time() - t_start
        n_seq = sum(sp["num_sequences"] for sp in splits.values())
        print(f"[cache] done: {n_seq} sequences, {total_tokens} tokens ({tokens_all} computed now), "
              f"{total_bytes / total_tokens:.0f} bytes/token, {elapsed:.1f} s, {tokens_all / elapsed:.0f} tokens/s "
              f"-> {out}", flush=True)
    accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(CacheConfig, None, __doc__.split("\n\n")[0])))
