"""A teacher placed over several devices in the caching pass (teacher.device_map): the same cache as the whole
teacher on one device. On CPU the parts are memory and disk (transformers offloads a layer to disk and an
Accelerate hook loads it for each forward: the same dispatch that moves activations between GPUs), dense and MoE;
GPU placement's own refusals are checked for what they say."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cache_overrides
from test_cache import read_all, read_raw

from kd import cache_teacher
from kd.cache import MANIFEST
from kd.cache_config import CacheConfig
from kd.config import load_config
from kd.errors import KDError
from kd.teacher import TeacherModel

# layer 1 (of 2) and the final norm on disk, everything else in memory: two parts, inputs entering on the first
SPLIT = (
    "{model.embed_tokens: cpu, model.rotary_emb: cpu, model.layers.0: cpu, model.layers.1: disk, model.norm: disk, "
    "lm_head: cpu}"
)


@pytest.mark.parametrize("teacher", ["llama_teacher", "moe_teacher"])
def test_a_teacher_in_two_parts_gives_the_same_cache_as_the_whole_one(teacher, request, corpus_dir, tmp_path):
    path = request.getfixturevalue(teacher)
    caches = {}
    for name, extra in (("whole", {}), ("parts", {"teacher.device_map": SPLIT})):
        cfg = load_config(CacheConfig, None, cache_overrides(path, corpus_dir, tmp_path / name, **extra))
        caches[name] = cache_teacher.main(cfg)
    for read in (read_raw, read_all):  # stored bytes, and decoded values (sampled targets, hidden states)
        a, b = read(caches["whole"]), read(caches["parts"])
        assert a.keys() == b.keys()
        for split in a:
            assert a[split].keys() == b[split].keys()
            for field in a[split]:
                np.testing.assert_array_equal(a[split][field], b[split][field], err_msg=f"{teacher} {split}/{field}")
    ma, mb = (json.loads((c / MANIFEST).read_text()) for c in caches.values())
    # placement is not content: the same identity, so either run may resume the other
    assert ma["config_hash"] == mb["config_hash"]
    for split in ("train", "eval"):  # the teacher's own score of the text, from the same forward
        assert ma["splits"][split]["teacher_score"] == mb["splits"][split]["teacher_score"]


def test_the_placed_teacher_really_was_split(llama_teacher, corpus_dir, tmp_path):
    """The test above compares something: the placed model has its layer 1 offloaded (no weights in memory)."""
    overrides = cache_overrides(llama_teacher, corpus_dir, tmp_path / "c", **{"teacher.device_map": SPLIT})
    cfg = load_config(CacheConfig, None, overrides)
    teacher = TeacherModel(cfg, "cpu")
    model = teacher()
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert {p.device.type for p in model.model.layers[1].parameters()} == {"meta"}
    assert str(teacher.device) == "cpu"  # where the inputs go: the embeddings' execution device


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"teacher.device_map": "everywhere"}, "is not one of balanced, sequential, auto"),
        ({"teacher.devices_per_process": 2}, "needs a named teacher.device_map"),
        ({"teacher.devices_per_process": 0}, "must be >= 1"),
    ],
)
def test_bad_placements_are_refused(extra, message, llama_teacher, corpus_dir, tmp_path):
    with pytest.raises(KDError, match=message):
        load_config(CacheConfig, None, cache_overrides(llama_teacher, corpus_dir, tmp_path / "c", **extra))


def test_a_named_placement_needs_the_gpus_it_names(llama_teacher):
    from kd.models import placement

    # this machine has no GPU: local rank 1 with 2 GPUs each would need GPUs 2 and 3
    with pytest.raises(KDError, match="needs GPUs 2..3, and this machine has 0"):
        placement("balanced", 2, 1, "/unused")


def test_a_named_teacher_placement_that_spills_off_the_gpus_is_refused():
    from kd.models import check_placed

    check_placed(SimpleNamespace(hf_device_map={"model.layers.0": 0, "lm_head": 1}), "t")  # all on GPUs: fine
    with pytest.raises(KDError, match="placed part of it on cpu and disk"):
        check_placed(
            SimpleNamespace(hf_device_map={"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}), "t"
        )
