"""``vlmprune bench`` plumbing: a tiny synthetic LLaVA, a few rounds, every card field, consistent ratios.

These check the measuring machinery, not the speed of anything (timings on a shared machine are
noise at this size): fields, ratios recomputed from the raw timings, token / FLOP / KV bookkeeping
against hand counts, the plot file, the memory probe, the targets, and clear errors.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from typer.testing import CliRunner

from vlmprune.bench import measure as M
from vlmprune.bench.measure import BenchError, Variant

TINY_LAYERS = M.TINY.layers  # 4 decoder layers, width 64; CLIP geometry 336/14 -> 576 patches
N = 576
PROMPT = 35 + N + 24  # LLaVA-1.5 layout of bench.decoder.make_prompt


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    c = M.run_bench(models=["tiny"], methods=["prumerge+", "fastv", "random:keep=64"], batches=[1, 2], repeats=2,
                    warmup=1, new_tokens=3, threads=None, memory=False, out=out)
    c["_out"] = out
    return c


def _walk(obj, path: str):
    """Objects at a CARD_FIELDS path ("" = root, "a.b", "a[]" = every element of list a)."""
    objs = [obj]
    if not path:
        return objs
    for part in path.split("."):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        nxt = []
        for o in objs:
            v = o[key]
            nxt.extend(v if many else [v])
        objs = nxt
    return objs


def test_card_has_every_field(card) -> None:
    for path, keys in M.CARD_FIELDS.items():
        objs = _walk(card, path)
        assert objs, path
        for o in objs:
            missing = [k for k in keys if k not in o]
            assert not missing, f"{path or '(root)'} lacks {missing}"
    for v in _walk(card, "results[].variants[]"):
        assert set(v["raw"]) == set(M.RAW_KEYS)
        assert all(len(ts) == card["settings"]["repeats"] for ts in v["raw"].values())
    m = card["machine"]
    assert m["torch"] == torch.__version__ and m["cores_logical"] >= 1 and m["cpu_model"]
    assert m["bf16_matmul"]["slowdown"] > 0 and m["bf16_matmul"]["fp32_s"] > 0
    s = card["settings"]
    assert s["dtype"] == ["fp32"] and s["device"] == "cpu" and s["batches"] == [1, 2] and s["decode_steps"] == 2
    assert s["methods"] == ["prumerge+", "fastv", "random:keep=64"]
    assert [r["batch"] for r in card["results"]] == [1, 2]
    assert card["models"][0]["config"]["decoder"]["layers"] == TINY_LAYERS
    assert card["models"][0]["config"]["vision"]["patches"] == N
    assert any("bf16" in n for n in card["notes"])
    assert not any("issue" in n for n in card["notes"])  # no internal wording
    from vlmprune.runinfo import RUN_FIELDS

    assert set(RUN_FIELDS) <= set(card["run"]) and card["run"]["kind"] == "bench"
    assert [e["label"] for e in card["run"]["methods"]] == ["unpruned", "prumerge+", "fastv", "random:keep=64"]
    b = card["machine"]["bf16_matmul"]
    assert b["accelerated"] == (b["slowdown"] <= M.BF16_ACCELERATED_RATIO) and b["note"] in " ".join(card["notes"])


@pytest.mark.parametrize("ratio, flags, accelerated, hardware, words", [
    (0.55, {"amx_bf16": True, "avx512_bf16": True}, True, "amx_bf16", "this CPU accelerates bf16 (amx_bf16 present)"),
    (0.9, {"avx512_bf16": True}, True, "avx512_bf16", "0.90x the fp32 time"),
    (40.0, {}, False, "none", "this CPU has no bf16 acceleration"),
    (12.0, {"amx_bf16": True}, False, "amx_bf16", "this torch build does not accelerate bf16"),
])
def test_bf16_verdict_from_flags_and_the_measured_ratio(ratio, flags, accelerated, hardware, words) -> None:
    acc, hw, note = M.bf16_verdict(ratio, flags)
    assert (acc, hw) == (accelerated, hardware) and words in note


def test_card_json_is_strict_and_complete(card) -> None:
    data = json.loads((card["_out"] / "card.json").read_text())  # strict JSON: no NaN
    assert data["schema"] == M.SCHEMA
    assert set(data) == set(M.CARD_FIELDS[""])
    assert data["results"][0]["variants"][1]["raw"]["ttft_s"] == card["results"][0]["variants"][1]["raw"]["ttft_s"]


def test_ratios_follow_from_raw_timings(card) -> None:
    for res in card["results"]:
        base = res["variants"][0]
        assert base["method"] is None and base["label"] == "unpruned"
        med = {k: statistics.median(v) for k, v in base["raw"].items()}
        assert base["median"] == pytest.approx(med)
        for v in res["variants"]:
            r, md = v["ratios"], {k: statistics.median(x) for k, x in v["raw"].items()}
            assert v["median"] == pytest.approx(md)
            assert r["prefill_speedup"] == pytest.approx(med["ttft_s"] / md["ttft_s"])
            assert r["prefill_speedup_of_min"] == pytest.approx(min(base["raw"]["ttft_s"]) / min(v["raw"]["ttft_s"]))
            assert r["llm_prefill_speedup"] == pytest.approx(med["llm_prefill_s"] / md["llm_prefill_s"])
            assert r["overhead_fraction"] == pytest.approx(md["overhead_s"] / med["ttft_s"])
            assert r["decode_speedup"] == pytest.approx(md["decode_tokens_per_s"] / med["decode_tokens_per_s"])
            assert r["vision_time_ratio"] == pytest.approx(md["vision_s"] / med["vision_s"])
            assert r["kv_cache_ratio"] == pytest.approx(v["kv_cache_bytes"] / base["kv_cache_bytes"])
            assert r["flop_ideal_speedup"] == pytest.approx(base["flops"]["total"] / v["flops"]["total"])
            assert r["llm_flop_ideal_speedup"] == pytest.approx(base["flops"]["decoder"] / v["flops"]["decoder"])
            assert r["prefill_vs_ideal"] == pytest.approx(r["prefill_speedup"] / r["flop_ideal_speedup"] - 1)
            for i, ts in enumerate(v["raw"]["decode_s"]):  # tokens/s from the decode time of the same run
                assert v["raw"]["decode_tokens_per_s"][i] == pytest.approx(res["batch"] * 2 / ts)
            for k in ("ttft_s", "vision_s", "llm_prefill_s", "decode_s"):
                assert all(t > 0 for t in v["raw"][k]), k
            # the parts fit inside the time to first token
            for i in range(len(v["raw"]["ttft_s"])):
                parts = v["raw"]["vision_s"][i] + v["raw"]["projector_s"][i] + v["raw"]["llm_prefill_s"][i]
                assert parts <= v["raw"]["ttft_s"][i] * 1.001
            if v["method"] is None:
                assert r["prefill_speedup"] == 1.0 and r["kv_cache_ratio"] == 1.0
                assert all(t == 0 for t in v["raw"]["overhead_s"])
            else:
                assert all(t > 0 for t in v["raw"]["overhead_s"]), v["label"]


def test_overhead_split_adds_up(card) -> None:
    """The overhead's parts are measured inside it: each >= 0, the named ones present for the stage,
    and score + select + gather + masks + other == the overhead of the same run."""
    for res in card["results"]:
        for v in res["variants"]:
            raw = v["raw"]
            for i, total in enumerate(raw["overhead_s"]):
                parts = [raw[f"overhead_{p}_s"][i] for p in M.OVERHEAD_PARTS]
                assert sum(parts) == pytest.approx(total, abs=1e-9)
                assert all(p >= 0 for p in parts[:-1]) and parts[-1] >= -1e-6
                if v["method"] is None:
                    assert all(p == 0 for p in parts[:-1])
                elif v["stage"] == "decoder":
                    assert raw["overhead_score_s"][i] > 0 and raw["overhead_select_s"][i] > 0
                    assert raw["overhead_gather_s"][i] > 0 and raw["overhead_masks_s"][i] > 0
                else:
                    assert raw["overhead_select_s"][i] > 0 and raw["overhead_gather_s"][i] > 0
                    assert (raw["overhead_score_s"][i] > 0) == (v["method"] != "random"), v["label"]


def test_token_flop_and_kv_bookkeeping(card) -> None:
    kv_per_token = 2 * TINY_LAYERS * 64 * 4  # K and V, width 64 (1 head of 64), fp32
    cfg = M._cfg_from_card(card["models"][0])
    for res in card["results"]:
        b = res["batch"]
        assert res["prompt_tokens"] == [PROMPT] * b
        by = {v["label"]: v for v in res["variants"]}
        base = by["unpruned"]
        assert base["layer_tokens"] == [[PROMPT] * TINY_LAYERS] * b
        assert base["kv_cache_bytes"] == b * PROMPT * kv_per_token
        # FastV defaults: K=2, half the visual tokens dropped from layer 2 on
        fv = by["fastv"]
        assert fv["layer_tokens"] == [[PROMPT] * 2 + [PROMPT - N // 2] * (TINY_LAYERS - 2)] * b
        assert fv["visual_tokens"] == pytest.approx((2 * N + (TINY_LAYERS - 2) * N / 2) / TINY_LAYERS)
        fv_tokens = 2 * PROMPT + (TINY_LAYERS - 2) * (PROMPT - N // 2)  # summed over layers
        assert fv["kv_cache_bytes"] == b * fv_tokens * kv_per_token // TINY_LAYERS
        assert fv["flops"]["projector"] == pytest.approx(base["flops"]["projector"])
        # random:keep=64 keeps 64 per image before the LLM
        rnd = by["random:keep=64"]
        assert rnd["visual_tokens_per_sample"] == [64.0] * b
        assert rnd["layer_tokens"] == [[PROMPT - N + 64] * TINY_LAYERS] * b
        assert rnd["kv_cache_bytes"] == b * (PROMPT - N + 64) * kv_per_token
        assert rnd["flops"]["projector"] == pytest.approx(base["flops"]["projector"] * 64 / N)
        # PruMerge+: adaptive per image; the FLOPs follow each sample's own count
        pm = by["prumerge+"]
        assert all(1 <= k < N for k in pm["visual_tokens_per_sample"])
        assert pm["layer_tokens"] == [[PROMPT - N + int(k)] * TINY_LAYERS for k in pm["visual_tokens_per_sample"]]
        # decoder FLOPs = the analytic model's, summed over samples
        for v in res["variants"]:
            want = sum(M._decoder_flops(cfg, s) for s in v["layer_tokens"])
            assert v["flops"]["decoder"] == pytest.approx(want)
            assert v["flops"]["vision_tower"] == pytest.approx(base["flops"]["vision_tower"])
            assert v["flops"]["total"] == pytest.approx(sum(v["flops"][k] for k in ("vision_tower", "projector",
                                                                                     "decoder")))


def test_plot_file_written(card) -> None:
    path = card["_out"] / "speedup.png"
    assert card["plot"] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_targets(card) -> None:
    assert card["targets"][0]["met"] is None and "no scaled model" in card["targets"][0]["detail"]
    tg = M.evaluate_targets(card, model="tiny", batch=1)
    names = [(t["method"], t["name"]) for t in tg]
    assert sum("FLOP-ideal" in n for _, n in names) == 2  # prumerge+ and fastv; not random
    assert sum("overhead" in n for _, n in names) == 3
    res = card["results"][0]
    by = {v["label"]: v for v in res["variants"]}
    for t in tg:
        r = by[t["method"]]["ratios"]
        if "FLOP-ideal" in t["name"]:
            assert t["measured"] == r["prefill_vs_ideal"]
            assert t["met"] == (abs(t["measured"]) <= 0.15)
            assert t["margin"] == pytest.approx(0.15 - abs(t["measured"]))
        else:
            assert t["measured"] == r["overhead_fraction"]
            assert t["met"] == (t["measured"] <= 0.05)
            assert t["margin"] == pytest.approx(0.05 - t["measured"])
    from rich.console import Console

    console = Console(record=True, width=200)
    M.print_card({**card, "targets": tg}, console)
    text = console.export_text()
    assert ("MET" in text or "MISSED" in text) and "points" in text
    assert "tiny fp32, batch 2" in text and "where the overhead goes" in text


def test_cache_bytes_of_a_real_cache() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(2, 3, 5, 4)
    for layer in range(3):
        cache.update(k, k.clone(), layer)
    assert M.cache_bytes(cache) == 3 * 2 * k.numel() * 4
    assert M.cache_bytes(None) == 0
    assert M.cache_bytes(((k, k),)) == 2 * k.numel() * 4


def test_bf16_dtype_runs_and_halves_the_kv_cache() -> None:
    c = M.run_bench(models=["tiny"], methods=["fastv"], batches=[1], dtype="bfloat16", repeats=1, warmup=0,
                    new_tokens=2, threads=None, memory=False, out=None)
    assert c["settings"]["dtype"] == ["bf16"] and c["models"][0]["config"]["dtype"] == "bfloat16"
    assert c["results"][0]["dtype"] == "bf16" and c["models"][0]["dtype"] == "bf16"
    base = c["results"][0]["variants"][0]
    assert base["kv_cache_bytes"] == PROMPT * 2 * TINY_LAYERS * 64 * 2  # 2 bytes per element


@pytest.mark.slow
def test_memory_probe_in_a_fresh_process() -> None:
    r = M.probe_memory("tiny", Variant("unpruned", None), 1, new_tokens=2, threads=1)
    assert set(r) == {"peak_rss_delta_bytes", "baseline_rss_bytes", "peak_rss_bytes", "method"}
    assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0
    assert r["peak_rss_delta_bytes"] == r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    assert r["peak_rss_delta_bytes"] > 0  # at least the KV cache and activations


@pytest.mark.slow
def test_saved_testbed_like_model_with_processor(tmp_path) -> None:
    """A saved folder (testbed architecture, tiny widths) goes the processor / ShapesVQA prompt path."""
    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2),
                        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  num_key_value_heads=2))
    model.save_pretrained(tmp_path / "m")
    build_processor(tok).save_pretrained(tmp_path / "m")
    c = M.run_bench(models=[str(tmp_path / "m")], methods=["prumerge"], batches=[3], repeats=1, warmup=0,
                    new_tokens=2, threads=None, memory=False, out=None)
    res = c["results"][0]
    assert c["models"][0]["prompt"]["source"].startswith("ShapesVQA")
    assert len(res["prompt_tokens"]) == 3 and res["visual_tokens_unpruned"] == N
    pm = res["variants"][1]
    assert [s[0] for s in pm["layer_tokens"]] == [p - N + int(k) for p, k in
                                                  zip(res["prompt_tokens"], pm["visual_tokens_per_sample"])]
    assert c["plot"] is None


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, needle", [
    (dict(methods=["nope"]), "unknown pruning method 'nope'"),
    (dict(methods=["prumerge+:k_neighbors=-1"]), "k_neighbors"),
    (dict(methods=["fastv:bogus=1"]), "no option(s) bogus"),
    (dict(methods=["none"]), "at least one pruning method"),
    (dict(methods=["fastv", "fastv"]), "given twice"),
    (dict(batches=[0]), "batch size must be an int >= 1, got 0"),
    (dict(batches=[-2]), "batch size must be an int >= 1"),
    (dict(batches=["8"]), "batch size must be an int >= 1, got '8'"),
    (dict(batches=[]), "at least one batch size"),
    (dict(dtype="fp16"), "unknown dtype 'fp16'; use fp32 (default) or bf16"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(models=["nope-model"]), "unknown model 'nope-model'"),
    (dict(repeats=0), "repeats must be an int >= 1"),
    (dict(new_tokens=1), "new_tokens must be an int >= 2"),
    (dict(threads=0), "threads must be an int >= 1"),
])
def test_bad_input_fails_before_measuring(kwargs, needle, tmp_path) -> None:
    args = dict(models=["tiny"], methods=["fastv"], batches=[1], memory=False, out=tmp_path, threads=None)
    args.update(kwargs)
    with pytest.raises(BenchError) as e:
        M.run_bench(**args)
    assert needle in str(e.value)
    assert not (tmp_path / "card.json").exists()


def test_budget_too_large_for_the_model_is_a_clear_error() -> None:
    with pytest.raises(BenchError, match="random:keep=9999"):
        M.run_bench(models=["tiny"], methods=["random:keep=9999"], batches=[1], repeats=1, warmup=0, new_tokens=2,
                    memory=False, out=None, threads=None)


def test_scaled_config_validation() -> None:
    with pytest.raises(BenchError, match="multiple of 64"):
        M.ScaledConfig(hidden=100)
    with pytest.raises(BenchError, match="layers must be an int >= 1"):
        M.ScaledConfig(layers=0)
    assert M.parse_dtype("bfloat16") == ("bf16", torch.bfloat16)
    assert M.parse_dtype("FP32") == ("fp32", torch.float32)


runner = CliRunner()


@pytest.mark.parametrize("args, needle", [
    (["bench", "-M", "tiny", "-m", "nope"], "unknown pruning method"),
    (["bench", "-M", "tiny", "-b", "0"], "batch size must be an int >= 1"),
    (["bench", "-M", "tiny", "--dtype", "float16"], "unknown dtype 'float16'"),
    (["bench", "-M", "nowhere"], "unknown model 'nowhere'"),
])
def test_cli_bad_input(args, needle) -> None:
    from vlmprune.cli import app

    threads = torch.get_num_threads()
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and needle in res.output.replace("\n", " ")
    assert torch.get_num_threads() == threads


def test_cli_runs_and_writes_the_card(tmp_path) -> None:
    from vlmprune.cli import app

    threads = torch.get_num_threads()
    res = runner.invoke(app, ["bench", "-M", "tiny", "-m", "fastv:drop_ratio=0.75", "-b", "1", "--repeats", "1",
                              "--warmup", "0", "--new-tokens", "2", "--no-memory", "-q", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == threads  # restored after the run
    data = json.loads((tmp_path / "card.json").read_text())
    assert data["command"].startswith("vlmprune bench")
    assert data["settings"]["threads"] == 1 and data["settings"]["methods"] == ["fastv:drop_ratio=0.75"]
    fv = data["results"][0]["variants"][1]
    assert fv["options"] == {"drop_ratio": 0.75}
    assert fv["memory"]["peak_rss_delta_bytes"] is None and "not measured" in fv["memory"]["method"]
    assert "acceptance targets" in res.output and "fp32" in res.output
    assert (tmp_path / "speedup.png").exists()
    assert not math.isnan(fv["ratios"]["prefill_speedup"])
    again = runner.invoke(app, ["bench", "-M", "tiny", "-m", "fastv", "-b", "1", "--repeats", "1", "--warmup", "0",
                                "--new-tokens", "2", "--no-memory", "-q", "--out", str(tmp_path)])
    assert again.exit_code == 0 and f"writing this run to {tmp_path}-2" in again.output.replace("\n", "")
    assert json.loads((tmp_path / "card.json").read_text()) == data  # the first card is kept
    assert json.loads((tmp_path.with_name(tmp_path.name + "-2") / "card.json").read_text())["settings"]["methods"] \
        == ["fastv"]


def test_dtype_choices_and_auto() -> None:
    assert M.parse_dtypes("auto") == ["auto"]
    assert M.parse_dtypes(["bfloat16", "fp32", "bf16"]) == ["bf16", "fp32"]
    assert M.resolve_dtypes(["auto"], bf16_accelerated=True) == ["bf16", "fp32"]
    assert M.resolve_dtypes(["auto"], bf16_accelerated=False) == ["fp32"]
    assert M.resolve_dtypes(["fp32", "auto"], bf16_accelerated=True) == ["fp32", "bf16"]
    with pytest.raises(M.BenchError, match="unknown dtype 'int8'"):
        M.parse_dtypes(["fp32", "int8"])
    with pytest.raises(M.BenchError, match="at least one dtype"):
        M.parse_dtypes([])


def test_two_dtypes_side_by_side_in_one_card(tmp_path) -> None:
    c = M.run_bench(models=["tiny"], methods=["fastv"], batches=[1], dtype=["fp32", "bf16"], repeats=1, warmup=0,
                    new_tokens=2, memory=False, out=tmp_path)
    assert c["settings"]["dtype"] == ["fp32", "bf16"]
    assert [(r["model"], r["dtype"]) for r in c["results"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert [(m["name"], m["dtype"]) for m in c["models"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    kv = [r["variants"][0]["kv_cache_bytes"] for r in c["results"]]
    assert kv[0] == 2 * kv[1]  # the bf16 block really ran in bf16
    json.loads((tmp_path / "card.json").read_text())


def test_device_checks_and_timer_sync() -> None:
    assert M.check_device("CPU") == "cpu"
    assert M.device_sync("cpu")() is None
    with pytest.raises(M.BenchError, match="unknown device 'tpu'"):
        M.check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(M.BenchError, match="no CUDA device here"):
            M.check_device("cuda:0")
    sync = M.device_sync("cuda:1")  # built, not called: the GPU path synchronises that device
    assert sync.func is torch.cuda.synchronize and sync.args == (torch.device("cuda:1"),)


def test_budgets_are_checked_on_every_model_before_measuring(monkeypatch) -> None:
    def measured(*a, **k):
        raise AssertionError("measurement started before every method was checked on every model")

    monkeypatch.setattr(M, "_bench_config", measured)
    with pytest.raises(M.BenchError, match="random"):
        M.run_bench(models=["tiny", "scaled"], methods=["random:keep=9999"], batches=[1], repeats=1, warmup=0,
                    new_tokens=2, memory=False, out=None, scaled=M.ScaledConfig(hidden=64, layers=2,
                                                                                vision_hidden=32, vision_layers=1))


def test_ctrl_c_keeps_the_finished_blocks(monkeypatch, tmp_path) -> None:
    real = M._bench_config
    calls = []

    def second_is_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(M, "_bench_config", second_is_interrupted)
    with pytest.raises(M.BenchInterrupted) as info:
        M.run_bench(models=["tiny"], methods=["fastv"], batches=[1, 2], repeats=1, warmup=0, new_tokens=2,
                    memory=False, out=tmp_path)
    assert info.value.finished == 1 and info.value.path == tmp_path / "card.json"
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["run"]["status"] == "interrupted"
    assert [(r["model"], r["batch"]) for r in card["results"]] == [("tiny", 1)]
    assert (tmp_path / "speedup.png").exists()


# ------------------------------------------------------------------------------ other families


def _saved(tmp_path_factory, build):
    d = tmp_path_factory.mktemp("family")
    build().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def family_cards(tmp_path_factory):
    """Cards of tiny LLaVA-NeXT and Qwen2-VL models saved without a processor (synthetic prompts
    of a 336 x 336 image, geometry from the adapter)."""
    from conftest import make_tiny_llava_next, make_tiny_qwen2_vl

    out = {}
    for family, build in (("llava-next", make_tiny_llava_next), ("qwen2-vl", make_tiny_qwen2_vl)):
        folder = _saved(tmp_path_factory, build)
        out[family] = M.run_bench(models=[folder], methods=["prumerge+", "fastv"], batches=[1, 2], repeats=1,
                                  warmup=0, new_tokens=2, threads=None, memory=False, out=None)
    return out


# hand counts for a 336 x 336 image: NeXT (42 px tiles of 3x3 patches, pinpoints up to 84 x 84): the base
# image + a 2x2 mosaic, 9 + 6 * (6 + 1 newline) = 51 placeholders, 5 tower passes of 9 patches + [CLS];
# Qwen2-VL: 24 x 24 patches -> 144 merged tokens, wrapped in <vision_start> ... <vision_end>.
FAMILY_COUNTS = {"llava-next": dict(visual=51, prompt=35 + 51 + 24, units=[(10, 9)] * 5),
                 "qwen2-vl": dict(visual=144, prompt=35 + 146 + 24, units=[(576, 144)])}


@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl"])
def test_family_geometry_tokens_and_flops(family_cards, family) -> None:
    from vlmprune.cost.analytic import vision_tower_flops

    card, want = family_cards[family], FAMILY_COUNTS[family]
    mc = card["models"][0]
    assert mc["config"]["family"] == family and mc["prompt"]["image_tokens"] == want["visual"]
    shape = mc["config"]["vision"]["shape"]
    cfg = M.flop_config_from_card(mc)
    layers = mc["config"]["decoder"]["layers"]
    for res in card["results"]:
        b = res["batch"]
        assert res["prompt_tokens"] == [want["prompt"]] * b and res["visual_tokens_unpruned"] == want["visual"]
        by = {v["label"]: v for v in res["variants"]}
        base, pm, fv = by["unpruned"], by["prumerge+"], by["fastv"]
        assert base["layer_tokens"] == [[want["prompt"]] * layers] * b
        assert base["flops"]["vision_tower"] == pytest.approx(vision_tower_flops(shape, want["units"] * b)["vision_tower"])
        for v in res["variants"]:  # the tower is never pruned; decoder FLOPs are each sample's own
            assert v["flops"]["vision_tower"] == base["flops"]["vision_tower"]
            assert v["flops"]["decoder"] == pytest.approx(sum(M._decoder_flops(cfg, s) for s in v["layer_tokens"]))
        assert pm["layer_tokens"] == [[want["prompt"] - want["visual"] + int(k)] * layers
                                      for k in pm["visual_tokens_per_sample"]]
        assert fv["layer_tokens"][0][:2] == [want["prompt"]] * 2 and fv["layer_tokens"][0][2] < want["prompt"]
        if shape["projector_after_pruning"]:  # NeXT: the projector sees the kept tokens only
            assert pm["flops"]["projector"] < base["flops"]["projector"]
        else:  # Qwen2-VL: the merger is part of the tower
            assert pm["flops"]["projector"] == base["flops"]["projector"]
        assert pm["median"]["overhead_score_s"] > 0  # the family's score function is timed
        # padding to the batch's longest sample: ideal unchanged when the counts are equal, lower when ragged
        for v in (base, fv):
            assert v["ratios"]["flop_ideal_padded_speedup"] == pytest.approx(v["ratios"]["flop_ideal_speedup"])
        counts = pm["visual_tokens_per_sample"]
        assert (pm["ratios"]["flop_ideal_padded_speedup"] < pm["ratios"]["flop_ideal_speedup"]) == (len(set(counts)) > 1)
        assert pm["median"]["overhead_s"] >= pm["median"]["overhead_score_s"]
    assert card["plot"] is None


def test_family_projector_inside_the_tower_is_not_subtracted_twice(family_cards) -> None:
    """Qwen2-VL's merger runs inside ``visual``: the vision time includes it."""
    for res in family_cards["qwen2-vl"]["results"]:
        for v in res["variants"]:
            assert v["median"]["vision_s"] >= v["median"]["projector_s"] > 0


def test_family_targets_use_issue_17_limits(family_cards) -> None:
    card = json.loads(json.dumps(family_cards["qwen2-vl"]))
    for r in card["results"]:
        r["model"] = "scaled-qwen2-vl"
    card["models"][0]["name"] = "scaled-qwen2-vl"
    targets = M.card_targets(card)
    assert {(t["model"], t["batch"]) for t in targets} == {("scaled-qwen2-vl", 1), ("scaled-qwen2-vl", 2)}
    for t in targets:
        assert t["threshold"] == (M.FAMILY_SPEEDUP_TOL if "FLOP-ideal" in t["name"] else M.FAMILY_OVERHEAD)
        assert t["met"] == (abs(t["measured"]) <= t["threshold"] if "FLOP-ideal" in t["name"]
                            else t["measured"] <= t["threshold"])
    assert sum("within 10%" in t["name"] for t in targets) == 4 and sum("<= 3%" in t["name"] for t in targets) == 4


@pytest.mark.parametrize("name, passes, visual, layers, heads, kv, head_dim", [
    ("scaled-llava-next", 5, 144 + 24 * 25, 32, 4, 4, 64),  # 336 px = base + 2x2 mosaic of 12x12 crops
    ("scaled-qwen2-vl", 1, 144, 28, 7, 1, 64),  # 336 px = 24x24 patches; the 7B's 28 : 4 heads
])
def test_scaled_family_models(name, passes, visual, layers, heads, kv, head_dim) -> None:
    """The scaled models' shapes and prompts (built on the meta device: no weights)."""
    from vlmprune.bench.models import SCALED, build, synthetic_inputs
    from vlmprune.integrations.base import get_adapter

    assert M.check_model_name(name) == name and name in M.MODEL_CHOICES
    with torch.device("meta"):
        model = build(name)
    adapter = get_adapter(model)
    t = adapter.text_config(model)
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (layers, heads, kv)
    assert t.hidden_size // t.num_attention_heads == head_dim
    layout = adapter.size_layout(model, SCALED[name].image_size)
    assert (len(layout.units), sum(layout.tokens_per_image)) == (passes, visual)
    inputs, desc = synthetic_inputs(model, 2, SCALED[name].image_size)
    assert desc["image_tokens"] == visual and inputs["input_ids"].shape[0] == 2
    assert int((inputs["input_ids"] == adapter.image_token_id(model)).sum()) == 2 * visual
    assert model.config._attn_implementation == "sdpa"


def test_family_memory_probe_in_a_fresh_process(tmp_path_factory) -> None:
    """The memory probe rebuilds a saved Qwen2-VL folder and its synthetic prompt in a subprocess."""
    from conftest import make_tiny_qwen2_vl

    folder = _saved(tmp_path_factory, make_tiny_qwen2_vl)
    mem = M.probe_memory(folder, M.parse_methods(["prumerge+"])[1], 2, new_tokens=2)
    assert mem["peak_rss_delta_bytes"] > 0 and mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"]
