"""The hardware plan: the GGUF header reader against the gguf package, and the planner on the figures NVML
gives for common cards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lsp_server import hardware
from lsp_server.hardware import GIB, MIB, Gpu, GgufError, GpuProbe, ModelShape, make_plan, read_model_shape, vram_estimate


def _shape(n_layers, n_embd, n_head, n_head_kv, n_vocab, file_bytes, embedding_bytes, output_bytes, n_ctx_train=32768):
    layers = (file_bytes - embedding_bytes - output_bytes) // n_layers
    return ModelShape("qwen2", n_layers, n_embd, n_head, n_head_kv, n_embd // n_head, n_embd // n_head, n_ctx_train,
                      n_vocab, (layers,) * n_layers, output_bytes, embedding_bytes, file_bytes)


# Qwen2.5-Coder-7B-Instruct Q4_K_M (4,683,073,504 bytes): 28 layers of width 3584, 28 query heads, 4 K/V heads
# of 128; token embeddings Q4_K (152064 x 3584 x 144/256 bytes), output Q6_K (x 210/256).
QWEN_7B_Q4_K_M = _shape(28, 3584, 28, 4, 152064, 4_683_073_504, 306_561_024, 447_068_160)
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, as read_model_shape reads the published file.
QWEN_1_5B_Q4_K_M = _shape(28, 1536, 12, 2, 151936, 1_117_320_768, 131_272_704, 191_445_504)

# NVML's figures for cards of these sizes: memory.total in bytes as such cards report it, memory.free with
# a desktop session holding some of it. Representative figures, not captured from these very cards.
CARDS = {
    4: Gpu(0, "NVIDIA GeForce GTX 1650", 4_294_967_296, 3_980_000_000),
    6: Gpu(0, "NVIDIA GeForce RTX 2060", 6_442_450_944, 6_010_000_000),
    8: Gpu(0, "NVIDIA GeForce RTX 3070", 8_589_934_592, 8_110_000_000),
    12: Gpu(0, "NVIDIA GeForce RTX 3060", 12_884_901_888, 12_350_000_000),
    24: Gpu(0, "NVIDIA GeForce RTX 4090", 25_757_220_864, 25_170_000_000),
}


def _plan(shape, gb, **kw):
    probe = GpuProbe((CARDS[gb],)) if gb else GpuProbe(reason="no NVIDIA driver")
    return make_plan(shape, probe, offload_supported=True, cpu_count=8, **kw)


def test_reader_matches_the_gguf_package(tiny_gguf):
    gguf = pytest.importorskip("gguf")
    shape = read_model_shape(tiny_gguf)
    reader = gguf.GGUFReader(str(tiny_gguf))
    by_name = {t.name: int(t.n_bytes) for t in reader.tensors}
    blk0 = sum(n for name, n in by_name.items() if name.startswith("blk.0."))
    # each size is the gap to the next tensor: at most the alignment padding above the tensor's own bytes
    assert 0 <= shape.layer_bytes[0] - blk0 < 32 * len([n for n in by_name if n.startswith("blk.0.")])
    assert shape.n_layers == len({n.split(".")[1] for n in by_name if n.startswith("blk.")})
    assert shape.architecture == "qwen2" and shape.n_head_kv >= 1 and shape.n_vocab > 0


@pytest.mark.real_model
def test_reader_on_the_real_model(default_model):
    from llama_cpp import Llama

    shape = read_model_shape(default_model)
    meta = Llama(model_path=str(default_model), vocab_only=True, verbose=False).metadata  # llama.cpp's own reading
    arch = meta["general.architecture"]
    assert shape.architecture == arch
    assert shape.n_layers == int(meta[f"{arch}.block_count"]) == 24
    assert shape.n_embd == int(meta[f"{arch}.embedding_length"])
    assert shape.n_head_kv == int(meta[f"{arch}.attention.head_count_kv"])
    assert shape.n_ctx_train == int(meta[f"{arch}.context_length"])
    # the tensors fill the file: all sizes together are the file less its header
    weights = sum(shape.layer_bytes) + shape.output_bytes + shape.embedding_bytes
    assert 0 < shape.file_bytes - weights < 16 * 1024 * 1024


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a model at all" * 10, b"GGUF" + b"\xff" * 200])
def test_reader_rejects_bad_files(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(GgufError):
        read_model_shape(bad)


def test_reader_rejects_a_truncated_model(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for keep in (100, 2000, len(data) // 2):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(GgufError):
            read_model_shape(cut)


@pytest.mark.parametrize("gb", [4, 6, 8, 12, 24])
def test_plan_fits_every_card(gb):
    for shape in (QWEN_7B_Q4_K_M, QWEN_1_5B_Q4_K_M):
        plan = _plan(shape, gb)
        assert plan.device.startswith("gpu") and plan.n_gpu_layers > 0
        assert plan.vram_total_needed_bytes <= plan.vram_budget_bytes
        assert plan.vram_budget_bytes <= CARDS[gb].free_bytes - 512 * MIB
        assert plan.flash_attn and plan.n_ctx >= 2048


def test_7b_on_8gb_runs_entirely_on_the_gpu_with_8k_context():
    plan = _plan(QWEN_7B_Q4_K_M, 8)
    assert plan.n_gpu_layers == QWEN_7B_Q4_K_M.n_layers + 1  # the output layer too
    assert plan.n_ctx >= 8192
    # and with the card's whole 8 GiB as the cap (the GPU check runs on a bigger card with this cap)
    big = GpuProbe((Gpu(0, "NVIDIA H200", 150_000_000_000, 149_000_000_000),))
    capped = make_plan(QWEN_7B_Q4_K_M, big, offload_supported=True, vram_budget_mb=8192)
    assert capped.n_gpu_layers == 29 and capped.n_ctx >= 8192
    assert capped.vram_total_needed_bytes <= 8 * GIB - 512 * MIB


def test_7b_on_4gb_splits_layers_and_says_so():
    plan = _plan(QWEN_7B_Q4_K_M, 4)
    assert 0 < plan.n_gpu_layers < QWEN_7B_Q4_K_M.n_layers
    assert plan.kv_type == "q8_0" and "layers fit" in plan.reasons[-1]


def test_bigger_cards_get_longer_contexts_and_never_less():
    contexts = [_plan(QWEN_7B_Q4_K_M, gb).n_ctx for gb in (6, 8, 12, 24)]
    assert contexts == sorted(contexts) and contexts[-1] == 16384


def test_q8_0_kv_when_f16_does_not_fit():
    shape = QWEN_7B_Q4_K_M
    f16 = sum(vram_estimate(shape, shape.n_layers, 8192, "f16", True).values())
    q8 = sum(vram_estimate(shape, shape.n_layers, 8192, "q8_0", True).values())
    assert q8 < f16
    # a budget between the two: the plan keeps every layer and 8k with a q8_0 cache
    cap_mb = int((q8 + f16) / 2 / MIB) + 512
    plan = make_plan(shape, GpuProbe((CARDS[24],)), offload_supported=True, n_ctx=8192, vram_budget_mb=cap_mb)
    assert (plan.n_gpu_layers, plan.kv_type, plan.n_ctx) == (29, "q8_0", 8192)


def test_cpu_plans_say_why():
    no_gpu = _plan(QWEN_1_5B_Q4_K_M, 0)
    assert (no_gpu.device, no_gpu.n_gpu_layers, no_gpu.n_ctx, no_gpu.flash_attn) == ("cpu", 0, 4096, False)
    assert "no NVIDIA driver" in no_gpu.reasons[0] and no_gpu.n_threads == 8
    cpu_build = make_plan(QWEN_1_5B_Q4_K_M, GpuProbe((CARDS[8],)), offload_supported=False)
    assert cpu_build.device == "cpu" and "GGML_CUDA" in cpu_build.reasons[0]
    off = make_plan(QWEN_1_5B_Q4_K_M, GpuProbe((CARDS[8],)), offload_supported=True, n_gpu_layers=0)
    assert off.device == "cpu" and "n_gpu_layers is 0" in off.reasons[0]
    tiny = make_plan(QWEN_7B_Q4_K_M, GpuProbe((Gpu(0, "tiny", 1 * GIB, 700 * MIB),)), offload_supported=True)
    assert tiny.device == "cpu" and "not even one layer" in tiny.reasons[0]


def test_settings_limits_are_kept():
    plan = _plan(QWEN_7B_Q4_K_M, 24, n_gpu_layers=10, n_ctx=4096)
    assert plan.n_gpu_layers == 10 and plan.n_ctx == 4096
    kwargs = plan.llama_kwargs()
    assert kwargs["type_k"] == kwargs["type_v"] == 1 and kwargs["flash_attn"] is True


def test_doctor_prints_the_plan(tiny_gguf):
    out = subprocess.run([sys.executable, "-m", "lsp_server", "doctor", "--model", str(tiny_gguf), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["plan"]["device"] == "cpu" and report["plan"]["reasons"]
    assert report["shape"]["n_layers"] >= 1
    bad = subprocess.run([sys.executable, "-m", "lsp_server", "doctor", "--model", __file__],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "could not be read" in bad.stdout
