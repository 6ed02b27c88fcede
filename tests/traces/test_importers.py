"""`moesim trace import`: each format read from small files written here in that format, checked
against counts worked out by hand, and a malformed file of each format gives one clear line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moesim.cli import main
from moesim.errors import InputError
from traces.importers import expand_histogram, import_hf, import_megatron, import_smartmoe
from traces.io import read_trace


def smartmoe_log(block: np.ndarray) -> str:
    """One table_iter*_rank*.log: block [layers, micro_batches, E]."""
    return "\n".join(f"{ly}:" + json.dumps([[float(v) for v in mb] for mb in block[ly]])
                     for ly in range(block.shape[0])) + "\n"


def smartmoe_blocks(iters=(1, 11, 21), ranks=2, layers=3, mbs=2, e=4, tokens=6, k=2, seed=0):
    """Counts for a small run: each micro-batch of `tokens` tokens routes tokens*k pairs, no
    expert above `tokens` (as distinct top-k guarantees)."""
    rng = np.random.default_rng(seed)
    out = {}
    for it in iters:
        for r in range(ranks):
            b = np.zeros((layers, mbs, e))
            for ly in range(layers):
                for m in range(mbs):
                    for _ in range(tokens):
                        b[ly, m, rng.choice(e, k, replace=False)] += 1
            out[(it, r)] = b
    return out


def write_smartmoe(tmp_path, blocks, archive: bool):
    if not archive:
        d = tmp_path / "smartmoe_moe_trace"
        d.mkdir()
        for (it, r), b in blocks.items():
            (d / f"table_iter{it}_rank{r}.log").write_text(smartmoe_log(b))
        return tmp_path
    path = tmp_path / "moe_trace.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for (it, r), b in sorted(blocks.items(), key=lambda kv: -kv[0][0]):  # any order
            data = smartmoe_log(b).encode()
            info = tarfile.TarInfo(f"smartmoe_moe_trace/table_iter{it}_rank{r}.log")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("archive", [True, False])
def test_smartmoe_logs_become_iterations_x_layers_x_ranks(tmp_path, archive):
    blocks = smartmoe_blocks()
    src = write_smartmoe(tmp_path, blocks, archive)
    t = import_smartmoe(src, top_k=2)
    assert t.counts.shape == (3, 3, 2, 1, 4)
    assert t.meta.tokens_per_shard == 12 and t.meta.top_k == 2  # 2 micro-batches x 6 tokens
    for si, it in enumerate((1, 11, 21)):
        for r in range(2):
            assert np.array_equal(t.counts[si, :, r, 0], blocks[(it, r)].sum(axis=1))
    assert t.meta.generator["iterations"] == [1, 21, 10]
    mb = import_smartmoe(src, top_k=2, micro_batches_as_shards=True)
    assert mb.counts.shape == (3, 3, 4, 1, 4) and mb.meta.tokens_per_shard == 6
    assert np.array_equal(mb.counts[1, 2, 3, 0], blocks[(11, 1)][2, 1])  # shard = rank*M + mb
    assert np.array_equal(mb.aggregate(2).counts, t.counts)


def test_smartmoe_bad_logs_name_the_file_and_field(tmp_path):
    blocks = smartmoe_blocks()
    src = write_smartmoe(tmp_path, blocks, archive=False)
    d = src / "smartmoe_moe_trace"
    (d / "table_iter21_rank1.log").unlink()
    with pytest.raises(InputError, match=r"table_iter21_rank1\.log"):
        import_smartmoe(src)
    (d / "table_iter21_rank1.log").write_text("0:[[1.0, 2.0]]\n2:[[1.0, 2.0]]\n")
    with pytest.raises(InputError, match=r"table_iter21_rank1.log: line 2"):
        import_smartmoe(src)
    bad = blocks[(21, 1)].copy()
    bad[0, 0, 0] += 0.5
    (d / "table_iter21_rank1.log").write_text(smartmoe_log(bad))
    with pytest.raises(InputError, match="integers"):
        import_smartmoe(src)
    (tmp_path / "b").mkdir()
    odd = write_smartmoe(tmp_path / "b", smartmoe_blocks(k=1, tokens=5), archive=False)
    with pytest.raises(InputError, match="multiple of top-k"):
        import_smartmoe(odd, top_k=2)  # 5 token-expert pairs per micro-batch


def test_trace_import_cli_writes_parquet_and_rejects_bad_input(tmp_path, capsys):
    src = write_smartmoe(tmp_path, smartmoe_blocks(), archive=True)
    assert main(["trace", "import", "smartmoe", str(src), str(tmp_path / "t.parquet")]) == 0
    assert read_trace(tmp_path / "t.parquet").counts.shape == (3, 3, 2, 1, 4)
    (tmp_path / "junk.tar.xz").write_bytes(b"not an archive")
    assert main(["trace", "import", "smartmoe", str(tmp_path / "junk.tar.xz"),
                 str(tmp_path / "u.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.tar.xz: archive" in err[0]
    assert not (tmp_path / "u.parquet").exists()


def write_histogram(path, rows):
    path.write_text("model,top_k,domain,layer,expert,selections\n"
                    + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_histogram_expands_into_a_trace_with_its_distribution(tmp_path):
    # Two layers (ids 0 and 7) of a 4-expert top-1 model: layer 0 is 70/10/10/10, layer 7 even.
    rows = [("m", 1, "web", 0, e, s) for e, s in enumerate((700, 100, 100, 100))]
    rows += [("m", 1, "web", 7, e, 250) for e in range(4)]
    rows += [("m", 1, "code", 0, e, 1) for e in range(4)] + [("m", 1, "code", 7, e, 1)
                                                             for e in range(4)]
    write_histogram(tmp_path / "h.csv", rows)
    t = expand_histogram(tmp_path / "h.csv", steps=40, shards=8, tokens_per_shard=500,
                         domain="web", seed=3)
    assert t.counts.shape == (40, 2, 8, 1, 4) and t.meta.generator["layers"] == [0, 7]
    share = t.expert_load()[:, :, 0].sum(axis=0) / (40 * 8 * 500)
    # 160,000 multinomial draws per layer: the shares are within 4 sigma (~0.005) of p.
    assert np.allclose(share[0], [0.7, 0.1, 0.1, 0.1], atol=0.006)
    assert np.allclose(share[1], 0.25, atol=0.006)
    again = expand_histogram(tmp_path / "h.csv", steps=40, shards=8, tokens_per_shard=500,
                             domain="web", seed=3)
    assert np.array_equal(again.counts, t.counts)  # seeded
    # Drift: with a Dirichlet per step the step means spread far beyond the multinomial noise.
    d = expand_histogram(tmp_path / "h.csv", steps=40, shards=8, tokens_per_shard=500,
                         domain="web", concentration=20.0, seed=3)
    fixed = t.expert_load()[:, 0, 0, 0] / 4000
    drift = d.expert_load()[:, 0, 0, 0] / 4000
    assert drift.std() > 4 * fixed.std()
    with pytest.raises(InputError, match="--domain"):
        expand_histogram(tmp_path / "h.csv", steps=2, shards=1, tokens_per_shard=4,
                         domain="arxiv")


def shared_file(*parts: str) -> Path:
    """A file of the shared/ folder beside the checkout (CI lays it there; a worktree of the
    dev box finds it at /work/shared)."""
    for root in (Path(__file__).resolve().parents[3] / "shared", Path("/work/shared")):
        if (root.joinpath(*parts)).is_file():
            return root.joinpath(*parts)
    raise FileNotFoundError(f"shared/{'/'.join(parts)} not found beside the checkout")


def test_the_real_olmoe_histogram_reads():
    src = shared_file("traces", "olmoe", "expert_counts.csv")
    t = expand_histogram(src, steps=2, shards=2, tokens_per_shard=64, model="Mixtral-8x7B",
                         domain="wikipedia")
    assert t.num_experts == 8 and t.meta.top_k == 2 and t.meta.generator["layers"] == [0, 7, 15]


def megatron_record(step, layer, rank, idx, **kw):
    return json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                       "rank": rank, "num_tokens": len(idx), "topk": len(idx[0]),
                       "top_indices": idx, **kw}) + "\n"


def test_megatron_router_trace_is_counted_per_rank_and_layer(tmp_path):
    d = tmp_path / "trace"
    d.mkdir()
    # 2 ranks, MoE layers 1 and 3 (layer 2 dense: never recorded), 3 tokens top-2, 4 experts.
    tok = {0: [[0, 1], [0, 2], [3, 0]], 1: [[1, 2], [2, 3], [3, 1]]}
    for r in (0, 1):
        with open(d / f"router_trace_rank{r}.jsonl", "w") as f:
            for step in (0, 1):
                for layer in (3, 1):
                    f.write(megatron_record(step, layer, r, tok[r] if layer == 1 else tok[1 - r]))
                f.write(megatron_record(step, 1, r, tok[r], mtp_idx=0))  # MTP: skipped
    t = import_megatron(d, experts=4)
    assert t.counts.shape == (2, 2, 2, 1, 4) and t.meta.tokens_per_shard == 3
    assert t.counts[0, 0, 0, 0].tolist() == [3, 1, 1, 1]  # layer 1, rank 0
    assert t.counts[1, 1, 0, 0].tolist() == [0, 2, 2, 2]  # layer 3, rank 0 saw rank 1's picks
    assert t.meta.generator["layers"] == [1, 3]
    with open(d / "router_trace_rank1.jsonl", "a") as f:
        f.write(megatron_record(2, 1, 1, [[0, 0], [1, 2], [2, 3]]))
    with pytest.raises(InputError, match=r"rank1.jsonl:7: top_indices: .*twice"):
        import_megatron(d, experts=4)
    with pytest.raises(InputError, match="--experts"):
        import_megatron(tmp_path / "trace", experts=2)


def test_hf_router_logits_dumps_take_the_top_k_logits(tmp_path):
    # One step, 2 layers, 4 tokens (batch 2 x seq 2), 3 experts, top-2, 2 shards.
    l0 = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 4.0], [1.0, 1.0, 0.0], [9.0, 0.0, 8.0]])
    l1 = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [5.0, 6.0, 7.0]]])
    torch.save((l0, l1), tmp_path / "step0.pt")
    np.savez(tmp_path / "step1.npz", layer0=l0.numpy(), layer1=l1.numpy().reshape(4, 3))
    t = import_hf(tmp_path, top_k=2, shards=2)
    assert t.counts.shape == (2, 2, 2, 1, 3) and t.meta.tokens_per_shard == 2
    # layer 0: tokens {0,1} pick {0,1}, {1,2}; tokens {2,3} pick {0,1} (tie: lower id), {0,2}
    assert t.counts[0, 0, :, 0].tolist() == [[1, 2, 1], [2, 1, 1]]
    assert t.counts[0, 1, :, 0].tolist() == [[1, 2, 1], [1, 1, 2]]
    assert np.array_equal(t.counts[0], t.counts[1])  # .pt and .npz dumps agree
    torch.save({"logits": l0}, tmp_path / "step2.pt")
    with pytest.raises(InputError, match=r"step2\.pt: router_logits"):
        import_hf(tmp_path, top_k=2, shards=2)
