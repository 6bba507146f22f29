"""Device, dtype, threads and the speed-ups of a loaded model. CUDA is used when present, never assumed.

What is chosen here, and why (measured on 2 cores of an AMD EPYC with AVX512-BF16, SD-1.5-shaped
model at 256 px; ``benchmarks/bench_simulate.py``, README "Speed"):

- **dtype.** ``auto`` is fp16 on CUDA (the VAE kept in fp32 when its config says it overflows in
  half precision) and fp32 elsewhere. ``bf16`` on the CPU runs the UNet and text encoder in bf16
  and keeps the VAE in fp32: on the demo model a bf16 VAE triples the frames' mean difference
  from fp32 (0.10-0.16 -> 0.31-0.47 grey levels). It is opt-in, never picked by ``auto``: its
  frames are not within rounding of fp32's (max |diff| 3-6 grey levels on the demo model, 8-28
  on the random tiny model, where the tolerance would be 2), though a UNet call takes about
  half the fp32 time where the CPU has bf16 hardware (:func:`cpu_has_native_bf16`).
- **threads.** Intra-op threads are torch's default (one per physical core, or
  ``OMP_NUM_THREADS``) unless ``--threads N`` says otherwise (:func:`intra_op_threads`); the
  manifest records the number in effect.
- **layout.** The UNet and VAE run channels-last (NHWC), on the CPU as on CUDA, and get their
  inputs channels-last (:func:`input_memory_format`). A VAE call at 256 px takes 0.87x (encode)
  and 0.90x (decode) the contiguous layout's time on the CPU.
- **CPU weights.** On the CPU the convolution and linear weights of fp32 parts are reordered
  once into oneDNN's blocked layout (:func:`pack_cpu_weights`; what inductor's freezing does,
  without compiling): eager PyTorch otherwise converts every weight at every call. A fp32
  UNet call takes 0.75x the plain time. bf16 parts stay unpacked: packed, a bf16 UNet call was
  slower (0.89 s against 0.81 s). A probe checks the packed kernels against plain PyTorch
  first; where they are missing or disagree the model stays as it was.
- **memory.** Packing reads each weight once and hands its file pages back as it goes, then the
  heap's freed memory (:func:`pack_cpu_weights`); the text encoder, used once per run before the
  denoising, hands its file pages back after that use (:func:`release_after_use`). Measured on
  the SD-1.5-shaped model: peak RSS 5.15 GB -> 4.70 GB, against 4.90 GB for the diffusers loop.
- **compile.** ``--compile`` compiles the UNet with ``torch.compile`` on CUDA. On the CPU it is
  not applied: compiled with inductor's freezing, a UNet call took 2.5 s against 1.5 s packed
  eager (17 s of compiling with a warm cache, about 60 s cold), so it never pays off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pie_cli.core.parameters import DTYPE_CHOICES
from pie_cli.errors import UserError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The attribute a tuned module carries: what tune_for_speed did to it (read back for the manifest).
_TUNED = "_pie_speed"
# The attribute of a part used once per run whose file pages are handed back after use (release_after_use).
_RELEASE = "_pie_release_after_use"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # UNet and text encoder
    vae_dtype: torch.dtype
    notes: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "vae_dtype": dtype_name(self.vae_dtype),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16, AMX-BF16, Arm BF16) and oneDNN can use it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if capabilities is None or not torch.backends.mkldnn.is_available():
        return False
    found = capabilities()
    return any(bool(found.get(name)) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def choose_device(requested: str = "auto") -> tuple[torch.device, tuple[str, ...]]:
    """``auto``: CUDA, then MPS, then CPU (with a note that it is slow)."""
    requested = requested.lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), ()
        if mps_available():
            return torch.device("mps"), ()
        return torch.device("cpu"), ("no GPU found; running on the CPU, which is slow for full-size models.",)
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise UserError(
                f"--device {requested} was asked for, but this torch {torch.__version__} {built}."
            )
        dev = torch.device(requested)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {requested} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return dev, ()
    if requested == "mps":
        if not mps_available():
            raise UserError("--device mps was asked for, but Apple MPS is not available here.")
        return torch.device("mps"), ()
    if requested == "cpu":
        return torch.device("cpu"), ()
    raise UserError(f"--device must be one of auto, cuda, cuda:N, mps, cpu; got {requested!r}.")


def choose_placement(device: str = "auto", dtype: str = "auto", vae_force_upcast: bool = True) -> Placement:
    """Pick device and dtypes.

    ``auto`` dtype is fp16 on CUDA and fp32 elsewhere. In fp16 the VAE stays in fp32
    when its config says it overflows in half precision (``force_upcast``, true for
    SD 1.x), so decoded frames never turn to NaN/black. bf16 has fp32's range; on the CPU
    its VAE stays in fp32 all the same, for precision (module docstring), and on a CPU
    without bf16 hardware it is emulated (slow) and a note says so.
    """
    dev, notes = choose_device(device)
    dtype = dtype.lower()
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}.")
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    if dtype == "fp16" and dev.type == "cpu":
        raise UserError("--dtype fp16 is not supported on the CPU; use fp32 or bf16.")
    if dtype == "bf16" and dev.type == "cpu" and not cpu_has_native_bf16():
        notes = (
            *notes,
            "this CPU has no bf16 hardware (AVX512-BF16 or AMX); --dtype bf16 is emulated and may be slower than fp32.",
        )
    model_dtype = _DTYPES[dtype]
    vae_dtype = model_dtype
    if model_dtype == torch.float16 and vae_force_upcast:
        vae_dtype = torch.float32  # SD's VAE overflows in fp16
    if model_dtype == torch.bfloat16 and dev.type == "cpu":
        vae_dtype = torch.float32  # measured: a bf16 VAE triples the frames' difference from fp32
    return Placement(dev, model_dtype, vae_dtype, notes)


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: torch's default); yields the number in effect.

    torch's thread count is process-wide: it is set back afterwards, so an in-process caller
    (a test, a notebook) keeps its own.
    """
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- speed-ups of a loaded model


def tune_for_speed(
    components,
    placement: Placement,
    compile_unet: bool = False,
    *,
    channels_last: bool | None = None,
    pack_weights: bool | None = None,
) -> dict[str, Any]:
    """Make the loaded model fast on its device, in place and once (the model cache keeps it).

    CUDA: channels-last UNet and VAE. CPU: channels-last UNet and VAE, the fp32 weights packed
    for oneDNN, the text encoder's file pages handed back after each run's one encoding
    (:func:`release_after_use`; module docstring). ``compile_unet``: torch.compile the UNet, on CUDA only (on the
    CPU it was measured slower than the packed weights; the caller says so). ``channels_last`` and
    ``pack_weights`` exist for benchmarks: None is the measured default (pack fp32 parts on the
    CPU; bf16 ones run faster unpacked), True packs bf16 parts too, False none.
    Attention already runs on PyTorch's scaled_dot_product_attention (diffusers' default
    processor on torch 2). Returns :func:`speed_record`'s description of the model.
    """
    device = placement.device.type
    if channels_last is None:
        channels_last = device in ("cuda", "cpu")
    for part in ("unet", "vae"):
        module = getattr(components, part)
        if hasattr(module, "_orig_mod") or getattr(module, _TUNED, None) is not None:
            continue  # tuned before (a cached model)
        record = {"memory_format": "contiguous", "weights": "plain"}
        dtype = module_dtype(module)
        pack = (dtype == torch.float32) if pack_weights is None else pack_weights
        pack = pack and device == "cpu"
        if pack and _packing_works(dtype) and pack_cpu_weights(module):
            # Packed convolutions take either layout and return NHWC: the model is channels-last.
            record = {"memory_format": "channels_last", "weights": "packed"}
        elif channels_last:
            module.to(memory_format=torch.channels_last)
            record["memory_format"] = "channels_last"
        setattr(module, _TUNED, record)
    if device == "cpu":
        setattr(_inner(components.text_encoder), _RELEASE, True)  # read once per run (release_after_use)
    if compile_unet and device != "cpu" and not hasattr(components.unet, "_orig_mod"):
        components.unet = torch.compile(components.unet)
    return speed_record(components)


def speed_record(components) -> dict[str, Any]:
    """What the manifest records about the model's speed-ups: layout and weights per part, compile, threads."""
    out: dict[str, Any] = {}
    for part in ("unet", "vae"):
        module = getattr(components, part)
        record = getattr(_inner(module), _TUNED, None) or {"memory_format": "contiguous", "weights": "plain"}
        out[part] = {**record, "compiled": hasattr(module, "_orig_mod")}
    out["text_encoder"] = {
        "released_after_use": bool(getattr(_inner(components.text_encoder), _RELEASE, False))
    }
    out["threads"] = torch.get_num_threads()
    return out


def input_memory_format(module) -> torch.memory_format:
    """The layout to hand ``module`` its images or latents in: channels-last for a tuned channels-last model."""
    record = getattr(_inner(module), _TUNED, None)
    if record is not None and record.get("memory_format") == "channels_last":
        return torch.channels_last
    return torch.contiguous_format


def module_dtype(module) -> torch.dtype:
    return next(_inner(module).parameters()).dtype


def _inner(module):
    """A compiled module's original (torch.compile wraps it in an OptimizedModule)."""
    return getattr(module, "_orig_mod", module)


# --------------------------------------------------------------------------- CPU weight packing


def pack_cpu_weights(module) -> int:
    """Reorder the weights of ``module``'s Conv2d and Linear layers into oneDNN's layout; returns how many.

    Each layer gets a forward that calls the packed kernel; its ``weight`` becomes an empty
    placeholder of the same dtype and device (the plain copy is freed), so the module is for
    inference only from then on. Layers of LoRA adapters (``lora_*``) are left as they are: they
    are small, and peft reads their weights.

    Memory: a weight memory-mapped from its safetensors file is read once here, and its pages
    would stay resident (counted in the RSS) as long as the file is mapped: on Linux each one's
    pages are handed back as soon as it is packed (:func:`_drop_file_pages`), and at the end the
    module's other tensors (biases, norms) are copied into memory of their own, so nothing
    refers to the file and it is unmapped; the heap's freed memory is handed back (:func:`_trim_heap`).
    The peak is then the packed model plus one layer.
    """
    count = 0
    mapped = _file_mappings()
    for name, layer in module.named_modules():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.numel() == 0:
            continue
        if weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        if (
            type(layer) is torch.nn.Conv2d
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        ):
            layer.forward = _PackedConv(layer)
        elif type(layer) is torch.nn.Linear:
            layer.forward = _PackedLinear(layer)
        else:
            continue
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
        _drop_file_pages(weight, mapped)
        del weight
        count += 1
    if count:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.numel() and tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
        _trim_heap()
    return count


def _trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Packing frees each plain weight as its packed copy is made, but glibc keeps most of the freed
    memory for later allocations: measured on the SD-1.5 UNet, 160 MB of RSS that no tensor uses.
    """
    if not sys.platform.startswith("linux"):
        return
    # Not glibc (musl has no malloc_trim): nothing to do, the memory is reused by later allocations.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


_MADV_DONTNEED = 4  # Linux


def convert_releasing(module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` for its floating-point tensors, one at a time, each source's file pages handed back as it goes.

    For a part read memory-mapped from fp32 files into another dtype: ``from_pretrained(torch_dtype=...)``
    keeps every fp32 page it read resident until the whole file is closed, so the peak is the fp32
    part plus the converted one (5.4 GB for an SD-1.5 UNet in bf16, against 1.7 GB converted). Here
    the peak is the converted part plus one tensor. Values are those of ``module.to(dtype)``.
    """
    clean = _file_mappings(unwritten_only=True)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                source = tensor.data
                tensor.data = source.to(dtype)
                if source.device.type == "cpu":
                    _drop_file_pages(source, clean)
                del source


def _file_mappings(unwritten_only: bool = False) -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory-mapped files (Linux smaps; elsewhere none).

    ``unwritten_only``: only mappings that hold no written page. A written page of a private
    mapping becomes the process's own anonymous copy (``Anonymous`` in smaps): dropping it would
    bring the file's bytes back in place of what was written. A mapping with no such page reads
    back exactly what it held. (``Private_Dirty`` would not do: it also counts pages of a file
    written moments ago that the kernel has not flushed to disk yet.)
    """
    smaps = Path("/proc/self/smaps")
    if not sys.platform.startswith("linux") or not smaps.is_file():
        return []
    ranges, current = [], None
    for line in smaps.read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            named = len(fields) >= 6 and fields[5].startswith("/") and fields[1].startswith("r")
            current = (start, end) if named else None
        elif current is not None and fields[:1] == ["Anonymous:"]:
            if fields[1] == "0" or not unwritten_only:
                ranges.append(current)
            current = None
    return ranges


def release_after_use(module) -> int:
    """Hand back the resident pages of ``module``'s tensors that are read from their files; returns how many tensors.

    For a part used once per run (the text encoder: pie encodes every prompt once, before the
    denoising), so that its weights do not count in the run's peak memory. Only tensors lying in
    a memory-mapped file none of whose pages was written are touched; the next use reads them
    from the file again (the page cache, usually), unchanged. Anywhere else this does nothing.
    """
    if not getattr(_inner(module), _RELEASE, False):
        return 0
    clean = _file_mappings(unwritten_only=True)
    if not clean:
        return 0
    count = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel():
            count += _drop_file_pages(tensor, clean)
    return count


def _drop_file_pages(weight: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    """Hand back the resident pages of a weight that lies in a mapped file (no copy of it is left).

    Only whole pages inside the weight's own bytes are dropped: a neighbouring tensor's data is
    never touched. Returns whether pages were dropped. A dropped page of a file mapping is read
    from the file again if ever used.
    """
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mapped):
        return False
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    madvise = _madvise()
    if last <= first or madvise is None:
        return False  # without madvise the pages stay until the file is unmapped at the end
    return madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0


@functools.cache
def _madvise():
    """libc's madvise (loaded once), or None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


class _PackedConv:
    """A Conv2d's forward on its weight reordered for oneDNN (returns NHWC tensors)."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        weight = conv.weight.detach()
        self.bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        shape = [1, weight.shape[1] * conv.groups, 64, 64]  # a format hint only; any input size works
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.args, shape)
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype != self.dtype or x.device.type != "cpu":
            padding, stride, dilation, groups = self.args  # what nn.Conv2d would do (or refuse)
            return torch.nn.functional.conv2d(
                x, self.weight.to_dense(), self.bias, stride, padding, dilation, groups
            )
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "none", [], "")


class _PackedLinear:
    """A Linear's forward on its weight reordered for oneDNN."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        weight = linear.weight.detach()
        self.bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1024)  # batch hint only
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.dtype != self.dtype or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's packed kernels and they agree with plain PyTorch (a small probe)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            conv = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2).to(dtype)
            linear = torch.nn.Linear(32, 24).to(dtype)
            model = torch.nn.ModuleDict({"conv": conv, "linear": linear})
            x = torch.randn(2, 16, 12, 10, generator=generator).to(dtype)
            tokens = torch.randn(3, 5, 32, generator=generator).to(dtype)
            want = (conv(x).float(), linear(tokens).float())
            pack_cpu_weights(model)
            got_nhwc = conv(x.contiguous(memory_format=torch.channels_last)).float()
            got = (conv(x).float(), linear(tokens).float())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False
    scale = max(1.0, float(want[0].abs().max()), float(want[1].abs().max()))
    return all(
        g.shape == w.shape and float((g - w).abs().max()) <= tolerance * scale
        for g, w in ((got[0], want[0]), (got_nhwc, want[0]), (got[1], want[1]))
    )
