"""Run a teacher ONCE over a text corpus and store its top-k log-probs, sampled targets and hidden states in HDF5 shards.

    kd cache --config shakespeare_smollm2 [dotted.key=value ...]             # one process
    accelerate launch -m kd cache --config shakespeare_smollm2 [...]          # several (Accelerate's launcher)
    accelerate launch cache_teacher.py --config configs/shakespeare_smollm2.yaml  # the same, from a clone

Two stages, both streaming (memory does not grow with the corpus) and both split between processes:
1. ingest (kd/data/): documents are read unit by unit, split train/eval per document, tokenized in batches and
   packed into windows, written to DIR/ingest/ (process r takes the r-th unit of each round);
2. teacher pass (kd/cache/build.py): cache shard j (sequences [j*S, (j+1)*S) of its split) is computed by process
   j % N from those windows and written by kd.cache.writer.CacheWriter under a temporary name, renamed when complete.
Neither stage's output depends on the number of processes, so an N-process cache equals the one-process cache.
Re-running the same command resumes: finished units and complete shards (sha256 re-checked) are kept. When the
manifest is written the cache is complete and the ingest windows are deleted. The format: kd/cache/__init__.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from kd.cache import build
from kd.cache.manifest import cache_metadata, config_hash
from kd.cache.writer import CacheWriter
from kd.cache_config import CacheConfig
from kd.config import parse_cli, to_dict
from kd.dist import agree
from kd.errors import run_cli


def main(cfg: CacheConfig) -> Path:
    t_start = time.time()
    accelerator = Accelerator()
    cfg_dict = to_dict(cfg)
    say = print if accelerator.is_main_process else (lambda *a, **k: None)

    # 1. Everything cheap, before any heavy work (an error on any process stops every process): the teacher's config
    #    and tokenizer, the sources, a served teacher's server; then the teacher's identity (its weights' digest, or
    #    the served model's) and the cache's description.
    inputs = agree(accelerator, lambda: build.validate(cfg))
    teacher = agree(accelerator, lambda: build.teacher_source(cfg, accelerator, inputs))
    weights = build.teacher_weights(accelerator, cfg, inputs.model_cfg, teacher)
    identity = config_hash(cfg, cfg_dict, weights)
    meta = cache_metadata(cfg, identity, inputs.model_cfg, inputs.tokenizer, inputs.spec, weights)
    writer = CacheWriter(Path(cfg.cache.output_dir), cfg_dict, meta, accelerator)

    # 2. The output directory, locked by the main process for the whole run: a second run on it is refused.
    with writer.claimed(cfg.cache.overwrite, inputs.spec, weights) as complete:
        if complete:
            say(f"[cache] {writer.out} is already complete (same config); nothing to do", flush=True)
            return writer.out

        # 3. Ingest: documents -> per-document split -> packed windows in DIR/ingest/; then the directory becomes
        #    this config's cache (a run refused before leaves nothing that blocks the corrected re-run).
        index, stats = build.ingest(cfg, accelerator, inputs, writer.out)
        writer.record_config(weights)

        # 4. The teacher pass over the windows, shard by shard (the lowrank codec's basis first), by the model in
        #    process or the server.
        basis = build.hidden_basis(cfg, accelerator, index, writer, teacher)
        jobs, tokens_done = build.teacher_pass(cfg, accelerator, index, writer, inputs, teacher, basis)

        # 5. Once every process is done, the main one writes the manifest; the windows live on in the shards.
        accelerator.wait_for_everyone()
        tokens_all = int(accelerator.reduce(torch.tensor([tokens_done], device=accelerator.device), "sum").item())
        if accelerator.is_main_process:
            m = writer.finish(jobs, index.num_sequences, stats)
            elapsed = time.time() - t_start
            n_tokens = sum(sp["num_tokens"] for sp in m["splits"].values())
            say(
                f"[cache] done: {sum(sp['num_sequences'] for sp in m['splits'].values())} sequences, {n_tokens} "
                f"tokens ({tokens_all} computed now), {len(jobs)} shards, {m['bytes_per_token']:.0f} bytes/token, "
                f"{elapsed:.1f} s, {tokens_all / elapsed:.0f} tokens/s -> {writer.out}",
                flush=True,
            )
        accelerator.wait_for_everyone()
    return writer.out


def cli(argv: list[str] | None = None, prog: str = "kd cache") -> Path | None:
    """The command line: `--config FILE|NAME` (a path, or the name of a shipped config) plus dotted overrides;
    `--dry-run` prints the plan (windows, shards, bytes, free disk) and writes nothing."""
    run = parse_cli(CacheConfig, argv, __doc__.split("\n\n")[0], prog)
    if run.dry_run:
        print("\n".join(build.plan(run.cfg).lines()))
        return None
    return main(run.cfg)


if __name__ == "__main__":
    run_cli(lambda: cli(prog="python -m kd.cache_teacher"))
