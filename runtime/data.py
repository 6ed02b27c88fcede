"""Token batches, a pure function of (seed, step, rank): a resumed run sees exactly the batches
an uninterrupted one would.

- "synthetic": sequences of a seeded order-1 Markov chain in which every token has 4 possible
  successors, so the loss has something to learn (its floor is log 4) and no file is needed.
- a path: a UTF-8 text file read as bytes (vocab 256); sequences start at seeded random
  offsets. No natural-language corpus ships with the packages on the lent machines, so the
  default is synthetic (docs/runtime.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moesim.config import Config
from moesim.errors import InputError

SUCCESSORS = 4


class Batches:
    def __init__(self, cfg: Config, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        m, r = cfg.model, cfg.run
        if r.tokens_per_rank % m.seq_len:
            raise InputError(cfg.source, "run.tokens_per_rank", f"{r.tokens_per_rank} is not a "
                             f"multiple of model.seq_len = {m.seq_len}")
        self.batch = r.tokens_per_rank // m.seq_len
        if r.data == "synthetic":
            rng = np.random.default_rng(r.seed)
            self.table = rng.integers(0, m.vocab_size, (m.vocab_size, SUCCESSORS))
            self.text = None
        else:
            if m.vocab_size < 256:
                raise InputError(cfg.source, "model.vocab_size", "a text file is read as bytes: "
                                 "needs vocab_size >= 256")
            self.text = np.frombuffer(Path(r.data).read_bytes(), dtype=np.uint8)
            if len(self.text) < m.seq_len + 1:
                raise InputError(cfg.source, "run.data", f"{r.data}: shorter than one sequence")

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [batch, seq_len] each."""
        s = self.cfg.model.seq_len
        rng = np.random.default_rng([self.cfg.run.seed, step, self.rank])
        if self.text is None:
            seq = np.empty((self.batch, s + 1), dtype=np.int64)
            seq[:, 0] = rng.integers(0, self.cfg.model.vocab_size, self.batch)
            pick = rng.integers(0, SUCCESSORS, (self.batch, s))
            for i in range(s):
                seq[:, i + 1] = self.table[seq[:, i], pick[:, i]]
        else:
            starts = rng.integers(0, len(self.text) - s - 1, self.batch)
            seq = np.stack([self.text[a:a + s + 1] for a in starts]).astype(np.int64)
        t = torch.from_numpy(seq)
        return t[:, :-1], t[:, 1:]
