"""Where the model runs: GPUs found through NVML, the model's shape read from its GGUF header, and a plan
(layers on the GPU, context length, KV-cache type, flash attention, threads) that fits free VRAM.

Pure logic apart from `probe_gpus` and `read_model_shape`, so the planner is unit-tested with recorded
figures. The estimate mirrors how llama.cpp places a model: the repeating layers and the output layer
(`n_gpu_layers = layers + 1`) go to the GPU with their share of the KV cache; the token embeddings stay
in host memory; the compute buffer holds one micro-batch's activations and logits.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
GIB = 1024 * MIB

N_UBATCH = 512
"""llama.cpp's default micro-batch: the compute buffer is sized for this many tokens at once."""
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32}
"""q8_0 stores 32 values in 34 bytes (32 int8 + one f16 scale)."""
GGML_TYPE_ID = {"f16": 1, "q8_0": 8}
"""llama.cpp's ggml_type numbers, for Llama(type_k=..., type_v=...)."""
AUTO_CONTEXTS = (16384, 8192, 4096, 2048)
"""Context lengths tried, largest first, when the settings leave n_ctx to the plan (0). A FIM prompt
needs well under 2k tokens; a longer context leaves room for code actions on whole files."""
CPU_CONTEXT = 4096
"""On a CPU the context is not what limits (host memory is); 4k holds any prompt we build."""


def headroom_bytes(total_bytes: int) -> int:
    """VRAM left free for the CUDA context, cuBLAS workspaces and the desktop: 512 MiB or 6 %."""
    return max(512 * MIB, int(total_bytes * 0.06))


# --------------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class GpuProbe:
    gpus: tuple[Gpu, ...] = ()
    reason: str = ""
    """Why no GPU is listed (empty when some are)."""


def probe_gpus() -> GpuProbe:
    """NVIDIA GPUs and their free memory through NVML; never raises."""
    try:
        import pynvml
    except ImportError:
        return GpuProbe(reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError, AttributeError) as exc:
        return GpuProbe(reason=f"no NVIDIA driver (NVML: {exc})")
    try:
        gpus = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(Gpu(i, name.decode() if isinstance(name, bytes) else str(name), int(mem.total), int(mem.free)))
        return GpuProbe(tuple(gpus), "" if gpus else "NVML lists no GPU")
    except (pynvml.NVMLError, OSError) as exc:
        return GpuProbe(reason=f"NVML failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except (pynvml.NVMLError, OSError):
            pass


def llama_gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (CUDA, ...)."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# The model's shape, from the GGUF header (no weights are read)
# --------------------------------------------------------------------------------------------------


class GgufError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    layer_bytes: tuple[int, ...]
    """Bytes of each repeating layer's tensors (blk.N.*)."""
    output_bytes: int
    """The output layer (output.weight, or the tied token embeddings, plus output_norm)."""
    embedding_bytes: int
    """token_embd.weight, which llama.cpp keeps in host memory."""
    file_bytes: int

    def kv_bytes_per_token_layer(self, kv_type: str) -> float:
        return self.n_head_kv * (self.head_dim_k + self.head_dim_v) * KV_BYTES_PER_ELEMENT[kv_type]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_COUNT = 1 << 31


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufError("the GGUF header is truncated")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_COUNT or self.pos + n > len(self.buf):
            raise GgufError("a GGUF string runs past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if count > _MAX_COUNT:
                raise GgufError("a GGUF array is implausibly long")
            if item_type in _SCALARS and not keep:
                self.pos += struct.calcsize(_SCALARS[item_type]) * count
                return count
            if item_type == _STRING and not keep:
                for _ in range(count):  # only the lengths are read: a vocabulary is 150k strings
                    (n,) = _U64.unpack_from(self.buf, self.pos)
                    self.pos += 8 + n
                if self.pos > len(self.buf):
                    raise GgufError("a GGUF string array runs past the end of the file")
                return count
            items = [self.value(item_type, keep) for _ in range(count)]
            return items if keep else count
        raise GgufError(f"unknown GGUF value type {vtype}")


_ARRAYS_KEPT = ("head_count", "head_count_kv")
"""Per-layer arrays some architectures use for these keys; other arrays are only counted."""


def read_model_shape(path: str | os.PathLike) -> ModelShape:
    """Read the architecture figures and tensor sizes from a GGUF file's header."""
    path = Path(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as fh:
        if file_bytes < 24:
            raise GgufError(f"{path.name} is too small to be a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(_Reader(buf), file_bytes, path.name)
            except (struct.error, UnicodeDecodeError, OverflowError) as exc:
                raise GgufError(f"{path.name}: malformed GGUF header ({exc})") from exc


def _parse(r: _Reader, file_bytes: int, name: str) -> ModelShape:
    if bytes(r.buf[:4]) != b"GGUF":
        raise GgufError(f"{name} is not a GGUF file")
    r.pos = 4
    version = r.unpack("<I")
    if version < 2:
        raise GgufError(f"{name}: GGUF version {version} is not supported")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise GgufError(f"{name}: implausible GGUF counts")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("<I")
        meta[key] = r.value(vtype, keep=key.endswith(_ARRAYS_KEPT))
    tensors: list[tuple[str, int]] = []
    for _ in range(n_tensors):
        tname = r.string()
        n_dims = r.unpack("<I")
        if n_dims > 8:
            raise GgufError(f"{name}: tensor {tname} has {n_dims} dimensions")
        r.pos += 8 * n_dims
        r.unpack("<I")  # ggml type: sizes come from the offsets instead
        tensors.append((tname, r.unpack("<Q")))
    alignment = int(meta.get("general.alignment", 32) or 32)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    sizes = _tensor_sizes(tensors, file_bytes - data_start, name)

    arch = str(meta.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values: the largest decides the memory
            value = max(value) if value else default
        return int(value)

    n_layers = num("block_count")
    n_embd = num("embedding_length")
    n_head = num("attention.head_count")
    if n_layers <= 0 or n_embd <= 0 or n_head <= 0:
        raise GgufError(f"{name}: the header lacks the layer count, width or head count of '{arch}'")
    n_head_kv = num("attention.head_count_kv", n_head) or n_head
    head_dim_k = num("attention.key_length", n_embd // n_head)
    head_dim_v = num("attention.value_length", n_embd // n_head)
    layer_bytes = [0] * n_layers
    output = embedding = 0
    for tname, size in sizes.items():
        if tname.startswith("blk."):
            index = tname.split(".", 2)[1]
            if index.isdigit() and int(index) < n_layers:
                layer_bytes[int(index)] += size
        elif tname.startswith("output"):
            output += size
        elif tname.startswith("token_embd"):
            embedding += size
    if "output.weight" not in sizes:  # tied embeddings: llama.cpp copies them to the output layer's device
        output += embedding
    tokens = meta.get("tokenizer.ggml.tokens", 0)
    return ModelShape(
        architecture=arch, n_layers=n_layers, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ctx_train=num("context_length", CPU_CONTEXT),
        n_vocab=int(tokens) if isinstance(tokens, int) else len(tokens),  # type: ignore[arg-type]
        layer_bytes=tuple(layer_bytes), output_bytes=output, embedding_bytes=embedding, file_bytes=file_bytes,
    )


def _tensor_sizes(tensors: list[tuple[str, int]], data_bytes: int, name: str) -> dict[str, int]:
    """Tensors lie back to back in the data section: each one's size is the gap to the next offset."""
    ordered = sorted(tensors, key=lambda t: t[1])
    sizes: dict[str, int] = {}
    for i, (tname, offset) in enumerate(ordered):
        end = ordered[i + 1][1] if i + 1 < len(ordered) else data_bytes
        if offset > data_bytes or end < offset:
            raise GgufError(f"{name}: tensor {tname} lies outside the file (truncated download?)")
        sizes[tname] = end - offset
    return sizes


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    device: str
    """"cpu" or "gpu N (name)"."""
    n_gpu_layers: int
    """As llama.cpp counts them: the repeating layers, plus one for the output layer."""
    n_ctx: int
    kv_type: str
    flash_attn: bool
    n_threads: int
    vram_budget_bytes: int = 0
    vram_needed_bytes: dict[str, int] = field(default_factory=dict)
    """The estimate by part: weights, kv_cache, compute."""
    reasons: list[str] = field(default_factory=list)

    @property
    def vram_total_needed_bytes(self) -> int:
        return sum(self.vram_needed_bytes.values())

    def llama_kwargs(self) -> dict:
        """Keyword arguments for llama_cpp.Llama."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "n_ctx": self.n_ctx,
            "flash_attn": self.flash_attn,
            "type_k": GGML_TYPE_ID[self.kv_type],
            "type_v": GGML_TYPE_ID[self.kv_type],
            "n_threads": self.n_threads,
            "n_threads_batch": self.n_threads,
        }

    def to_dict(self) -> dict:
        return {
            "device": self.device, "n_gpu_layers": self.n_gpu_layers, "n_ctx": self.n_ctx, "kv_type": self.kv_type,
            "flash_attn": self.flash_attn, "n_threads": self.n_threads, "vram_budget_bytes": self.vram_budget_bytes,
            "vram_needed_bytes": dict(self.vram_needed_bytes), "reasons": list(self.reasons),
        }

    def summary(self) -> str:
        where = self.device if self.n_gpu_layers == 0 else f"{self.device}, {self.n_gpu_layers} layers"
        return f"{where}, n_ctx {self.n_ctx}, KV {self.kv_type}, flash attention {'on' if self.flash_attn else 'off'}, {self.n_threads} threads"


def vram_estimate(shape: ModelShape, gpu_layers: int, n_ctx: int, kv_type: str, flash_attn: bool) -> dict[str, int]:
    """Bytes on the GPU with `gpu_layers` repeating layers offloaded (the output layer too when all are)."""
    gpu_layers = max(0, min(gpu_layers, shape.n_layers))
    full = gpu_layers == shape.n_layers
    weights = sum(shape.layer_bytes[shape.n_layers - gpu_layers :]) + (shape.output_bytes if full else 0)
    kv = int(shape.kv_bytes_per_token_layer(kv_type) * n_ctx * gpu_layers)
    if gpu_layers == 0:
        return {"weights": 0, "kv_cache": 0, "compute": 0}
    ubatch = min(N_UBATCH, n_ctx)
    activations = ubatch * shape.n_embd * 4 * 8
    logits = ubatch * shape.n_vocab * 4 if full else 0
    scores = 0 if flash_attn else ubatch * n_ctx * shape.n_head * 4
    return {"weights": weights, "kv_cache": kv, "compute": activations + logits + scores}


def make_plan(
    shape: ModelShape,
    probe: GpuProbe | None,
    *,
    offload_supported: bool,
    n_ctx: int = 0,
    n_gpu_layers: int = -1,
    vram_budget_mb: int = 0,
    n_threads: int = 0,
    cpu_count: int | None = None,
) -> Plan:
    """Choose where and how the model runs.

    `n_ctx` 0 lets the plan choose (the largest of AUTO_CONTEXTS that fits, up to the training length);
    `n_gpu_layers` -1 offloads as many layers as fit, 0 keeps the model on the CPU, N offloads at most N;
    `vram_budget_mb` caps the VRAM used (0: the GPU's free memory) minus headroom.
    Preference: everything on the GPU with an f16 KV cache, then with q8_0 (flash attention is on for both:
    llama.cpp needs it for a quantized V cache, and it keeps the compute buffer small), then a shorter
    context, then fewer layers, then the CPU."""
    threads = n_threads or max(1, cpu_count if cpu_count is not None else (os.cpu_count() or 1))
    contexts = [n_ctx] if n_ctx > 0 else [c for c in AUTO_CONTEXTS if c <= shape.n_ctx_train] or [shape.n_ctx_train]
    cpu_ctx = n_ctx if n_ctx > 0 else min(CPU_CONTEXT, shape.n_ctx_train)

    def cpu(reason: str) -> Plan:
        return Plan("cpu", 0, cpu_ctx, "f16", False, threads, reasons=[reason])

    if n_gpu_layers == 0:
        return cpu("n_gpu_layers is 0 in the settings: CPU only")
    if probe is None or not probe.gpus:
        return cpu(f"no GPU: {probe.reason if probe and probe.reason else 'none found'}")
    if not offload_supported:
        return cpu("a GPU is present but this llama-cpp-python build has no GPU backend "
                   "(rebuild it with CMAKE_ARGS=-DGGML_CUDA=on: scripts/setup does when nvcc works)")
    gpu = max(probe.gpus, key=lambda g: g.free_bytes)
    total = min(gpu.total_bytes, vram_budget_mb * MIB) if vram_budget_mb > 0 else gpu.total_bytes
    free = min(gpu.free_bytes, total)
    budget = free - headroom_bytes(total)
    device = f"gpu {gpu.index} ({gpu.name})"
    reasons = [
        f"{gpu.name}: {gpu.free_bytes / GIB:.1f} GiB free of {gpu.total_bytes / GIB:.1f} GiB"
        + (f", capped to {vram_budget_mb} MiB" if vram_budget_mb > 0 else "")
        + f"; {max(budget, 0) / GIB:.2f} GiB usable after {headroom_bytes(total) / MIB:.0f} MiB headroom"
    ]
    max_layers = shape.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, shape.n_layers)

    def plan(layers: int, ctx: int, kv: str, why: str) -> Plan:
        need = vram_estimate(shape, layers, ctx, kv, True)
        counted = layers + (1 if layers == shape.n_layers else 0)
        return Plan(device, counted, ctx, kv, True, threads, max(budget, 0), need, reasons + [why])

    for ctx in contexts:
        for kv in ("f16", "q8_0"):
            if sum(vram_estimate(shape, max_layers, ctx, kv, True).values()) <= budget:
                whole = "the whole model" if max_layers == shape.n_layers else f"{max_layers} layers (the settings' limit)"
                return plan(max_layers, ctx, kv, f"{whole} fits with n_ctx {ctx} and a {kv} KV cache")
    ctx = min(CPU_CONTEXT, shape.n_ctx_train) if n_ctx <= 0 else n_ctx
    for layers in range(max_layers - 1, 0, -1):
        if sum(vram_estimate(shape, layers, ctx, "q8_0", True).values()) <= budget:
            return plan(layers, ctx, "q8_0", f"only {layers} of {shape.n_layers} layers fit: the rest run on the CPU")
    return cpu(f"{gpu.name}: not even one layer fits in {max(budget, 0) / MIB:.0f} MiB: CPU only")


def plan_for_file(
    model_path: str | os.PathLike, *, n_ctx: int = 0, n_gpu_layers: int = -1, vram_budget_mb: int = 0, n_threads: int = 0
) -> tuple[Plan, ModelShape | None, GpuProbe | None]:
    """The plan for a GGUF file on this machine, with the figures it came from (for `offpilot doctor`)."""
    threads = n_threads or (os.cpu_count() or 1)
    probe = probe_gpus() if n_gpu_layers != 0 else None
    try:
        shape = read_model_shape(model_path)
    except (GgufError, OSError) as exc:
        # llama.cpp will say what is wrong with the file when it loads it; the plan stays on the safe side.
        return Plan("cpu", 0, n_ctx or CPU_CONTEXT, "f16", False, threads,
                    reasons=[f"the GGUF header could not be read: {exc}"]), None, probe
    supported = probe is not None and bool(probe.gpus) and llama_gpu_offload_supported()
    plan = make_plan(shape, probe, offload_supported=supported, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                     vram_budget_mb=vram_budget_mb, n_threads=threads)
    return plan, shape, probe
