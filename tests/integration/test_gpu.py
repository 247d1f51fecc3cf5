"""GPU paths: compiled FlexAttention (softmax with every score bias, the learned distance
schemes included; distance_aware; adaptive span and sparse patterns), bf16 SDPA,
bf16-mixed training, ACT in bf16, kernelized attention through Triton in bf16, LSH and
causal low-rank attention in bf16, MFU of a 350M
model at 4k in bf16 and the cost of ALiBi there, DeepSpeed ZeRO-2/3 in bf16 on one GPU, vLLM
serving the native HF exports (where vLLM is installed). Skipped without CUDA;
`scripts/gpu_check.sh` runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.config import load_config
from lmtrain.model import build_model
from tests.helpers import CONFIGS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def _model(position: str, backend: str, dtype, *extra: str):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.position={position}", f"model.attention.backend={backend}", "model.n_layers=2", "model.d_model=256",
        "model.n_heads=4", "model.d_ff=512", "data.vocab_size=1024", "data.seq_len=1024", *extra])
    torch.manual_seed(0)
    return build_model(cfg, device="cuda").to(dtype)


def _fwd_bwd(model, x, reference: bool):
    from lmtrain.model.attention import reference_paths

    model.zero_grad()
    with reference_paths(reference):
        out = model(x).logits_BLV
    F.cross_entropy(out.float().flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("position", ["alibi", "none", "exp_decay", "gaussian", "kerple_log", "rel_buckets"])
def test_compiled_flex_matches_reference(position, dtype):
    """Outputs and gradients, the learned schemes' own parameters included (their score_mod
    reads them: FlexAttention's gradients for captured tensors)."""
    model = _model(position, "flex", dtype)
    x = torch.randint(0, 1024, (2, 1024), device="cuda")
    (out, grads), (ref, ref_grads) = _fwd_bwd(model, x, False), _fwd_bwd(model, x, True)
    tol = BF16_TOL if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for n in grads:
        torch.testing.assert_close(grads[n].float(), ref_grads[n].float(), **tol, msg=n)
    assert all(k.path_counts["flex"] >= 1 for k in model.attention_kernels())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_distance_aware_compiled_flex_matches_reference(dtype):
    model = _model("none", "flex", dtype, "model.attention.kind=distance_aware", "model.attention.init_w=-0.01",
                   "model.attention.init_v=0.5")
    x = torch.randint(0, 1024, (2, 1024), device="cuda")
    (out, grads), (ref, ref_grads) = _fwd_bwd(model, x, False), _fwd_bwd(model, x, True)
    tol = BF16_TOL if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    assert any(n.endswith("kernel.w") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n].float(), ref_grads[n].float(), **tol, msg=n)
    assert all(k.path_counts["flex"] >= 1 for k in model.attention_kernels())


def test_auto_backend_picks_flex_for_alibi_on_cuda():
    model = _model("alibi", "auto", torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.randint(0, 1024, (1, 256), device="cuda"))
    assert all(k.path_counts["flex"] == 1 for k in model.attention_kernels())


@pytest.mark.parametrize("position", ["rope", "sinusoidal", "learned", "alibi"])
def test_sdpa_bf16_matches_reference(position):
    """ALiBi on the sdpa backend in bf16 folds into the dot product (positions as hi * 256 + lo)."""
    model = _model(position, "sdpa", torch.bfloat16)
    x = torch.randint(0, 1024, (2, 512), device="cuda")
    (out, _), (ref, _) = _fwd_bwd(model, x, False), _fwd_bwd(model, x, True)
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
    if position == "alibi":
        assert all(k.path_counts["folded"] >= 1 for k in model.attention_kernels())


@pytest.mark.parametrize("kind, position, extra", [
    ("lsh", "sinusoidal", ("model.attention.chunk=64", "model.attention.rounds=2")),
    ("lowrank_causal", "rope", ("model.attention.segment=128", "model.attention.slots=8",
                                "model.attention.block=256"))], ids=["lsh", "lowrank_causal"])
def test_lsh_and_lowrank_bf16_on_cuda_match_reference(kind, position, extra):
    """Issue 22's kernels on CUDA in bf16: the fast paths (chunk engine, SDPA per segment
    block) against their references, outputs and gradients."""
    model = _model(position, "auto", torch.bfloat16, f"model.attention.kind={kind}", *extra)
    x = torch.randint(0, 1024, (2, 512), device="cuda")
    (out, grads), (ref, ref_grads) = _fwd_bwd(model, x, False), _fwd_bwd(model, x, True)
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=5e-2, atol=5e-2, msg=name)


def test_early_exit_on_cuda_decodes_like_its_full_forward():
    """Issue 23 on CUDA: per-token exits (state measure) in a float32 model: decoding through
    the KV cache, exited tokens filling the later layers' cache, gives the full forward's
    logits and exits; and the per-exit objective's backward runs in bf16."""
    from lmtrain.model.layer import KVCache

    model = _model("rope", "auto", torch.float32, "model.depth.kind=early_exit", "model.n_layers=4").eval()
    x = torch.randint(0, 1024, (2, 96), device="cuda")
    model.depth.set_exit_policy("state", 0.0)  # a cosine: most tokens leave early, some do not
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.cat([o.logits_BLV for o in steps], 1), full.logits_BLV, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.cat([o.aux.tokens["exit_layer"] for o in steps], 1), full.aux.tokens["exit_layer"])
    bf = _model("rope", "auto", torch.bfloat16, "model.depth.kind=early_exit", "model.n_layers=4").train()
    h, aux = bf.features(x)
    y = x.roll(-1, 1)
    loss = F.cross_entropy(bf.head(h).float().flatten(0, 1), y.flatten()) * aux.lm_weight
    loss = loss + sum(bf.target_losses(aux, y, 64).values())
    loss.backward()
    assert torch.isfinite(loss) and bf.embed.weight.grad is not None


def test_bf16_mixed_training_runs_and_learns(tmp_path):
    from lmtrain.train.run import train

    cfg = load_config(CONFIGS / "debug.yaml", [
        f"run.root={tmp_path}", f"data.dir={tmp_path / 'data'}", "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed", "trainer.max_steps=40", "trainer.deterministic=false",
        "trainer.progress_bar=false"])
    summary = train(cfg, log=lambda s: None)
    assert summary["val_ppl"] < summary["unigram_val_ppl"]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bf16_on_one_gpu_trains_resumes_and_exports(stage, tmp_path):
    """DeepSpeed ZeRO-2 and ZeRO-3 in bf16 on one GPU: trains, resumes from a sharded
    checkpoint with the same continuation (up to GPU nondeterminism), exports fp32 weights
    whose validation loss matches the live bf16 model's."""
    import json
    import shutil

    from lmtrain.train.callbacks.metrics_file import read_metrics
    from tests.helpers import run_cli

    args = [str(CONFIGS / "debug.yaml"), f"run.root={tmp_path}", f"data.dir={tmp_path / 'data'}",
            "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "trainer.strategy=deepspeed",
            f"deepspeed.zero_stage={stage}", "trainer.max_steps=40", "checkpoint.every_n_steps=20",
            "trainer.val_every_n_steps=20", "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]
    run_cli("train", *args, "run.name=a", check=True)
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_ppl"] < summary["unigram_val_ppl"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step000020.ckpt", tmp_path / "b" / "checkpoints" / "step000020.ckpt")
    run_cli("train", *args, "run.name=b", check=True)
    want, got = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert sorted(got) == list(range(21, 41))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-2), s
    out = tmp_path / "export"
    run_cli("export", str(run), "--out", str(out), check=True)
    from lmtrain.train.checkpoint import load_trained
    from lmtrain.train.data import WindowDataset, val_windows

    t = load_trained(out, device="cuda")
    val = WindowDataset(t.cfg.data.dir, "val", t.cfg.data.seq_len)
    windows = val_windows(len(val), t.cfg.data.val_batches * t.cfg.data.batch_size)
    with torch.no_grad():
        batch = torch.stack([val[w] for w in windows]).cuda()
        loss = float(F.cross_entropy(t.model(batch[:, :-1]).logits_BLV.float().flatten(0, 1), batch[:, 1:].flatten()))
    assert loss == pytest.approx(summary["val_loss"], rel=2e-2)  # fp32 master weights vs the bf16 live model
    print(f"zero-{stage} bf16: val loss live {summary['val_loss']:.4f}, export {loss:.4f}")


@pytest.mark.parametrize("pattern", ["window", "bigbird", "window|strided", "window+globals"])
def test_sparse_compiled_flex_matches_reference(pattern):
    """Sparse patterns through FlexAttention with a BlockMask built from the rule, compiled, with
    ALiBi as score_mod: outputs and gradients against the dense masked reference."""
    cfg = load_config(CONFIGS / "debug.yaml", [
        "model.position=alibi", "model.attention.kind=sparse", "model.attention.backend=flex",
        f"model.attention.pattern={pattern}", "model.attention.window=128", "model.attention.global_every=64",
        "model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.d_ff=512", "data.vocab_size=1024",
        "data.seq_len=1024"])
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    _assert_flex_matches_reference(model)


def _assert_flex_matches_reference(model) -> dict:
    """Outputs and gradients of the compiled flex path against the reference (fp32, L = 1024);
    returns the gradients."""
    x = torch.randint(0, 1024, (2, 1024), device="cuda")
    (out, grads), (ref, ref_grads) = _fwd_bwd(model, x, False), _fwd_bwd(model, x, True)
    tol = dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    for n in grads:
        torch.testing.assert_close(grads[n].float(), ref_grads[n].float(), **tol, msg=n)
    assert all(k.path_counts["flex"] >= 1 for k in model.attention_kernels())
    return grads


@pytest.mark.parametrize("position", ["alibi", "none"])
def test_adaptive_span_compiled_flex_matches_reference(position):
    """The banded FlexAttention path of adaptive_span, compiled, against the paper's dense
    form: outputs and gradients, the gradient of the learned spans z included."""
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.position={position}", "model.attention.kind=adaptive_span", "model.attention.backend=flex",
        "model.attention.max_span=512", "model.n_layers=2", "model.d_model=256", "model.n_heads=4",
        "model.d_ff=512", "data.vocab_size=1024", "data.seq_len=1024"])
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda")
    for k in model.attention_kernels():
        with torch.no_grad():
            k.span_frac.copy_(torch.tensor([0.05, 0.2, 0.51, 0.9], device="cuda"))
    grads = _assert_flex_matches_reference(model)
    assert any("span_frac" in n for n in grads)


def test_act_bf16_running_positions_only_matches_every_position():
    """ACT on CUDA in bf16: computing the running positions only (per-row query subsets through
    SDPA with a mask) gives the outputs of computing every position, and trains."""
    outs = []
    for skip in (True, False):
        cfg = load_config(CONFIGS / "debug.yaml", [
            "model.depth.kind=act", "model.depth.max_steps=6", f"model.depth.skip_halted={skip}", "model.n_layers=1",
            "model.d_model=256", "model.n_heads=4", "model.d_ff=512", "data.vocab_size=1024", "data.seq_len=512"])
        torch.manual_seed(0)
        model = build_model(cfg, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            model.depth.halt.weight.normal_(0, 1.0)
            model.depth.halt.bias.fill_(-0.5)
        x = torch.randint(0, 1024, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        out = model(x)
        loss = F.cross_entropy(out.logits_BLV.float().flatten(0, 1), x.roll(-1, 1).flatten()) + out.aux.total_loss()
        loss.backward()
        outs.append((out.logits_BLV.detach().float(), out.aux.tokens["act_steps"],
                     float(out.aux.stats["act/computed_fraction"]), model.depth.halt.weight.grad.float()))
    (a, sa, fa, ga), (b, sb, fb, gb) = outs
    # bf16 rounding differs between the two shapes, so a position right at the threshold may
    # halt a step apart; everywhere else the results agree.
    same = sa == sb
    assert float(same.float().mean()) > 0.98 and sa.unique().numel() > 1
    assert fa < fb
    torch.testing.assert_close(a[same], b[same], **BF16_TOL)
    assert torch.isfinite(ga).all() and ga.abs().sum() > 0


@pytest.mark.parametrize("kind, extra", [("performer", ()), ("rfa", ("model.attention.gate=true",)), ("linear", ())],
                         ids=["performer", "rfa-gate", "linear"])
def test_kernelized_bf16_uses_triton_and_matches_reference(kind, extra):
    """A bf16 model with kernelized attention on CUDA: the auto backend runs the Triton kernels
    (features in float32), and outputs and gradients agree with the quadratic reference."""
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.attention.kind={kind}", "model.position=rope", "model.n_layers=2", "model.d_model=256",
        "model.n_heads=4", "model.d_ff=512", "data.vocab_size=1024", "data.seq_len=1024", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").to(torch.bfloat16)
    x = torch.randint(0, 1024, (2, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast, fast_grads = _fwd_bwd(model, x, reference=False)
    assert all(k.path_counts["triton"] >= 1 for k in model.attention_kernels())
    ref, ref_grads = _fwd_bwd(model, x, reference=True)
    torch.testing.assert_close(fast.float(), ref.float(), **BF16_TOL)
    for name in ref_grads:
        a, b = fast_grads[name].float(), ref_grads[name].float()
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 5e-2, name


def _train_throughput(position: str, steps: int = 5, warmup: int = 3) -> tuple[float, float]:
    """(tokens/s, MFU against the datasheet bf16 peak) of a ~350M-parameter decoder at L = 4096
    in bf16 (24 x 1024, 16 heads, d_ff 4096, vocab 50304), AdamW, through LMModule's loss."""
    import time

    from lmtrain.model.flops import training_flops_per_token
    from lmtrain.train.hardware import peak_flops
    from lmtrain.train.loss import chunked_lm_loss

    cfg = load_config(CONFIGS / "debug.yaml", [
        f"model.position={position}", "model.n_layers=24", "model.d_model=1024", "model.n_heads=16",
        "model.d_ff=4096", "model.bias=false", "data.vocab_size=50304", "data.seq_len=4096"])
    torch.manual_seed(0)
    model = build_model(cfg, device="cuda").to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50304, (2, 4097), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        h, _ = model.features(x[:, :-1])
        chunked_lm_loss(h, model.head.weight, x[:, 1:], 4096).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tps = 2 * 4096 * steps / (time.perf_counter() - t0)
    peak, _ = peak_flops(None, torch.device("cuda"))
    return tps, tps * training_flops_per_token(model, 4096) / peak


def test_mfu_of_a_350m_model_at_4k_in_bf16_and_the_cost_of_alibi():
    """Issue 9's H100 targets: MFU at least 45%, and ALiBi (FlexAttention score_mod) at least
    97% of the throughput without a positional bias (SDPA's flash kernel)."""
    alibi_tps, alibi_mfu = _train_throughput("alibi")
    none_tps, none_mfu = _train_throughput("none")
    print(f"350M, L=4096, bf16: alibi {alibi_tps:,.0f} tok/s, MFU {alibi_mfu:.1%}; no bias {none_tps:,.0f} tok/s, "
          f"MFU {none_mfu:.1%}; alibi / no bias {alibi_tps / none_tps:.3f}")
    assert alibi_mfu >= 0.45
    assert alibi_tps / none_tps >= 0.97


@pytest.mark.parametrize("family", ["mpt", "gpt_neox", "llama"])
def test_vllm_serves_the_native_export(family, tmp_path):
    """vLLM loads each native HF export as its own architecture and decodes greedily the tokens
    lmtrain's model gives. Skipped where vLLM is not installed (it pins its own torch build)."""
    vllm = pytest.importorskip("vllm")
    pytest.importorskip("transformers")
    from data_pipelines.tokenizer import train_tokenizer
    from lmtrain.generate import generate
    from tests.unit.test_hf import NATIVE, exported

    tok = tmp_path / "tokenizer.json"
    train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 257, show_progress=False).save(str(tok))
    out = tmp_path / "hf"
    out.mkdir()
    cfg, model, meta = exported(NATIVE[family], tok, out)
    assert meta["hf_family"] == family
    prompt = torch.randint(0, cfg.data.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, 12, temperature=0.0)[0, 10:].tolist()
    llm = vllm.LLM(model=str(out), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                   max_model_len=4 * cfg.data.seq_len)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": prompt[0].tolist()}], params)[0].outputs[0].token_ids
    assert list(got) == want
