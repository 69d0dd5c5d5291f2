"""The low-rank hidden-state codec's basis: per stored layer, the mean and the top-r principal directions of the
teacher's own states, fitted once at the start of the caching pass and kept in the cache directory.

Why principal directions: the feature losses (kd/losses/features.py) compare whole state vectors, and the best
rank-r approximation of a set of vectors in the least-squares sense is their projection on the top-r eigenvectors
of their covariance (Eckart-Young). A transformer's states are far from isotropic (a few outlier dimensions and a
fast-decaying spectrum), so a rank of a tenth of the width keeps most of their variance; how much is measured and
recorded (`variance_kept`). The fit reads the first `cache.hidden_basis_tokens` tokens of the train split in order
on the main process only, so the basis, and so the cache, does not depend on the number of processes.

File DIR/hidden_basis.h5 (written before any shard, atomically; its sha256 is in every shard's codec spec, so a
shard encoded with another basis never passes as this cache's):
    mean        [L, H] fp32     per-layer mean state
    components  [L, H, r] fp32  orthonormal columns, by descending variance (sign: largest-magnitude entry > 0)
    eigenvalues [L, H] fp64     the covariance's whole spectrum, descending (variance kept = sum of the first r / sum)
    attrs kd_meta (JSON)        format, config_hash, layers, rank, tokens fitted on
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.errors import KDError
from kd.io import h5_image, h5_in_memory, sha256_file, write_bytes_durable

BASIS_FILE = "hidden_basis.h5"
BASIS_FORMAT = "kd-hidden-basis"


@dataclass
class HiddenBasis:
    mean: np.ndarray  # [L, H] float32
    components: np.ndarray  # [L, H, r] float32
    eigenvalues: np.ndarray  # [L, H] float64
    meta: dict

    def __post_init__(self):
        self.components_t = np.ascontiguousarray(self.components.transpose(0, 2, 1))  # [L, r, H], for decoding

    @property
    def rank(self) -> int:
        return self.components.shape[-1]

    def variance_kept(self) -> list[float]:
        ev = np.clip(self.eigenvalues, 0, None)
        return [round(float(e[: self.rank].sum() / max(e.sum(), 1e-30)), 6) for e in ev]

    def write(self, path: Path) -> str:
        """Write atomically (built in memory, one durable write, rename); returns the file's sha256."""
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")  # removed by a resumed run, like a shard's
        f = h5_in_memory(str(tmp))
        f.create_dataset("mean", data=self.mean.astype(np.float32))
        f.create_dataset("components", data=self.components.astype(np.float32))
        f.create_dataset("eigenvalues", data=self.eigenvalues.astype(np.float64))
        f.attrs["kd_meta"] = json.dumps(self.meta, sort_keys=True)
        write_bytes_durable(tmp, h5_image(f))
        tmp.replace(path)
        return sha256_file(path)

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> HiddenBasis:
        """Read a basis file; with `sha256`, refuse one that is not the file the cache was written with."""
        import h5py

        if not path.exists():
            raise KDError(f"the low-rank hidden-state basis {path} is missing: the cache is damaged; re-cache")
        if sha256 is not None and sha256_file(path) != sha256:
            raise KDError(
                f"the low-rank hidden-state basis {path} is not the one this cache was written with (sha256 differs): "
                "the cache is damaged; run python -m kd.cache verify, or re-cache"
            )
        try:
            with h5py.File(path, "r") as f:
                return cls(f["mean"][:], f["components"][:], f["eigenvalues"][:], json.loads(f.attrs["kd_meta"]))
        except (OSError, KeyError, ValueError) as e:
            raise KDError(f"cannot read the low-rank hidden-state basis {path} ({e}): re-cache") from None


class BasisFit:
    """Accumulates the first and second moments of each stored layer's states (fp64), token by token, then takes
    the covariance's eigenvectors. Memory: L x H x H fp64 (2 x 4096^2 x 8 = 268 MB at a 4096-wide teacher)."""

    def __init__(self, num_layers: int, hidden_size: int, device):
        import torch

        self.s1 = torch.zeros(num_layers, hidden_size, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(num_layers, hidden_size, hidden_size, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, hidden, lengths) -> None:
        """hidden [B, L, T, H] (any float dtype), lengths [B]: the valid tokens of each row count."""
        import torch

        T = hidden.shape[2]
        valid = torch.arange(T, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]  # [B, T]
        for j in range(hidden.shape[1]):
            x = hidden[:, j][valid].float()  # [N, H]; fp32 products over one batch, summed in fp64
            self.s1[j] += x.sum(0).double()
            self.s2[j] += (x.T @ x).double()
        self.n += int(valid.sum())

    def finish(self, rank: int, meta: dict) -> HiddenBasis:
        if self.n < 2:
            raise KDError("the low-rank basis needs at least 2 tokens of train data; raise cache.hidden_basis_tokens")
        mean = (self.s1 / self.n).cpu().numpy()
        means, comps, evs = [], [], []
        for j in range(mean.shape[0]):
            m = mean[j]
            cov = self.s2[j].cpu().numpy() / self.n - np.outer(m, m)
            cov = (cov + cov.T) / 2
            w, v = np.linalg.eigh(cov)  # ascending
            w, v = w[::-1], v[:, ::-1][:, :rank]
            # a deterministic sign per direction: its largest-magnitude entry positive
            signs = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
            means.append(m)
            comps.append(v * np.where(signs == 0, 1, signs))
            evs.append(w)
        return HiddenBasis(
            np.stack(means).astype(np.float32),
            np.stack(comps).astype(np.float32),
            np.stack(evs),
            dict(meta, format=BASIS_FORMAT, rank=rank, tokens=self.n),
        )
