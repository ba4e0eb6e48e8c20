"""Where a process's resident memory goes, measured rather than inferred from parameter counts.

A model's weights can be resident several times over: as anonymous memory the tensors own,
as pages of a memory-mapped checkpoint file that still back live tensors, and as pages of
that file that back nothing any more (a quantized layer's float32 original stays resident
until the mapping is dropped). Counting parameters sees only the first, which is how an
int8 session came to report "weights 0.54 GB, float32" while holding more than the fp32 one.
So this module reads the kernel's own books: /proc/self/smaps for what each mapping holds,
mincore(2) for which pages of a tensor are resident, the garbage collector for live KV caches
and activations; glibc's malloc_trim hands freed heap back. Linux only; elsewhere the figures
are zero and `supported()` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
"""Mapped files whose resident pages are weights, not code."""


def megabytes(n: float) -> str:
    """Bytes as the load line, the status page and the reports print them: whole MB from 10 MB,
    two decimals below (a norm layer's 0.05 MB is not 0)."""
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/smaps")


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    rss: int
    anonymous: int

    @property
    def is_weight_file(self) -> bool:
        return self.path.endswith(WEIGHT_FILES)

    @property
    def is_file(self) -> bool:
        return self.path.startswith("/") and not self.path.startswith("/dev/")


def mappings() -> list[Mapping]:
    """Every mapping of this process with its resident and anonymous bytes (/proc/self/smaps)."""
    if not supported():
        return []
    found: list[Mapping] = []
    start = end = 0
    path = ""
    rss = anon = 0
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode [path]"
                if end:
                    found.append(Mapping(start, end, path, rss, anon))
                parts = line.split(None, 5)
                low, high = parts[0].split("-")
                start, end = int(low, 16), int(high, 16)
                path = parts[5].strip() if len(parts) > 5 else ""
                rss = anon = 0
            elif head == "Rss:":
                rss = int(line.split()[1]) * 1024
            elif head == "Anonymous:":
                anon = int(line.split()[1]) * 1024
    if end:
        found.append(Mapping(start, end, path, rss, anon))
    return found


def weight_file_spans() -> list[tuple[int, int]]:
    """(start, end) of every mapped checkpoint file, from /proc/self/maps (cheap: no page counts)."""
    if not supported():
        return []
    spans = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) > 5 and parts[5].strip().endswith(WEIGHT_FILES):
                low, high = parts[0].split("-")
                spans.append((int(low, 16), int(high, 16)))
    return spans


def process_status() -> dict[str, int]:
    """VmRSS, VmHWM (the peak), RssAnon and RssFile in bytes, as /proc/self/status gives them."""
    status: dict[str, int] = {}
    if not supported():
        return status
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0]) * 1024
    return status


def resident_fraction(address: int, nbytes: int) -> float:
    """The share of the pages under [address, address + nbytes) that are resident (mincore)."""
    if nbytes <= 0 or _LIBC is None or not supported():
        return 1.0
    first = address - address % PAGE
    pages = (address + nbytes - first + PAGE - 1) // PAGE
    vector = (ctypes.c_ubyte * pages)()
    if _LIBC.mincore(ctypes.c_void_p(first), ctypes.c_size_t(pages * PAGE), vector) != 0:
        return 1.0  # not a mapping mincore reads: count it whole
    return sum(b & 1 for b in vector) / pages


def _pagemap(address: int, nbytes: int) -> bytes | None:
    """The /proc/self/pagemap entries (8 bytes a page) under [address, address + nbytes), or
    None where they cannot be read."""
    if nbytes <= 0 or not supported():
        return None
    first = address // PAGE
    pages = (address + nbytes + PAGE - 1) // PAGE - first
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first * 8)
            entries = pagemap.read(pages * 8)
    except OSError:
        return None
    return entries if len(entries) == pages * 8 else None


def mapped_fraction(address: int, nbytes: int) -> float:
    """The share of the pages under [address, address + nbytes) this process has mapped in
    (/proc/self/pagemap's present bit): for a file mapping, what its RSS counts. Falls back to
    mincore where pagemap cannot be read."""
    entries = _pagemap(address, nbytes)
    if entries is None:
        return resident_fraction(address, nbytes)
    present = sum(entries[i + 7] >> 7 for i in range(0, len(entries), 8))
    return present / (len(entries) // 8)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a tensor spans: a contiguous view's own (a chunk of rows), else its storage's
    from where the tensor starts."""
    if t.is_contiguous():
        return t.data_ptr(), t.data_ptr() + t.nbytes
    storage = t.untyped_storage()
    return t.data_ptr(), storage.data_ptr() + storage.nbytes()


def _unwritten(t: torch.Tensor) -> bool:
    """Whether every page of a mapped tensor still holds the file's bytes: none present as a
    private copy (pagemap bit 63 present without bit 61 file-page) or swapped out (bit 62), which
    is what writing into a copy-on-write mapping leaves (an adapter merged in place). False where
    pagemap cannot be read."""
    start, end = _extent(t)
    entries = _pagemap(start, end - start)
    if entries is None:
        return False
    for i in range(0, len(entries), 8):
        flags = entries[i + 7]
        if flags & 0x40 or (flags & 0x80 and not flags & 0x20):
            return False
    return True


def malloc_trim() -> bool:
    """Hand the C heap's free pages back to the OS (glibc): torch frees a quantized layer's
    float32 temporaries into the heap, where they stay resident until trimmed."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    return bool(trim(ctypes.c_size_t(0)))


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's plain storage tensors (torchao's subclasses hold their int data and scales inside)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(t, name))]
    return [t]


def module_tensors(modules) -> list[torch.Tensor]:
    """Parameters and buffers of `modules`, each storage's tensors once."""
    return [leaf for m in modules if m is not None for t in [*m.parameters(), *m.buffers()] for leaf in _leaves(t)]


def _storages(tensors) -> dict[int, tuple[int, str]]:
    """storage address -> (bytes, dtype name) of CPU tensors, each storage once (ties, views)."""
    found: dict[int, tuple[int, str]] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.is_meta:
            continue
        storage = t.untyped_storage()
        found.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).removeprefix("torch.")))
    return found


def _in(address: int, spans: list[Mapping]) -> Mapping | None:
    return next((m for m in spans if m.start <= address < m.end), None)


_CHUNK = 16 << 20


def _copy_out(t: torch.Tensor) -> torch.Tensor:
    """A copy of a mapped tensor in fresh memory, a few MB at a time, each chunk's source pages
    given back once copied: copying the embedded model's 113 MB embedding table whole held it
    twice and set the int8 session's load peak. Mapped checkpoint pages are the file's, so a
    dropped page reads back the same bytes if anything still reads it."""
    if not t.is_contiguous() or t.nbytes < 2 * _CHUNK:
        return t.clone()
    out = torch.empty_like(t)
    src, dst = t.view(-1), out.view(-1)
    step = max(1, _CHUNK // t.element_size())
    for i in range(0, src.numel(), step):
        piece = src[i : i + step]
        dst[i : i + step].copy_(piece)
        _drop_pages(piece)  # a contiguous view: its own pages only
    return out


ALIGNMENT = 64
"""Bytes: torch's CPU allocator starts every tensor on such a boundary, and kernels may rely on it."""


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself where its data starts on an ALIGNMENT-byte boundary, else a copy that does
    (mapped pages given back chunk by chunk as copied). A safetensors file packs its tensors
    back to back, so a mapped tensor starts wherever the one before it ended; PyTorch's packed
    int8 CPU kernel on an AVX-512 machine reads its weight with aligned 16-byte loads once four or
    more rows are multiplied, and a saved int8 weight at offset 12 crashed the process (SIGSEGV)."""
    if t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0:
        return t
    if _in_spans(t.data_ptr(), weight_file_spans()) and _unwritten(t):
        return _copy_out(t)
    return t.clone()  # anonymous memory: its pages may hold other tensors, so none is given back


def _drop_pages(t: torch.Tensor) -> int:
    """Give back the resident pages wholly inside a mapped tensor (its neighbours keep theirs);
    the file has the bytes, and a read pages in only what it touches. Returns the bytes given
    back (0 where madvise is missing or refuses)."""
    madvise = getattr(_LIBC, "madvise", None)
    start, end = _extent(t)
    first = -(-start // PAGE) * PAGE
    last = end // PAGE * PAGE
    if madvise is None or last <= first:
        return 0
    if madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_spans(address: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= address < b for a, b in spans)


def drop_if_mapped(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    """Give back `t`'s resident pages if it lies, unwritten, in a mapped checkpoint (`spans`, from
    `weight_file_spans`); a later read pages in what it touches again. For passes that read every
    weight once (a fingerprint): without it the whole float32 file stays resident after them, and
    a quantized config's load peaks there. Returns whether pages were given back."""
    if t.device.type != "cpu" or not _in_spans(t.data_ptr(), spans) or not _unwritten(t):
        return False
    return _drop_pages(t) > 0


def materialise(modules) -> int:
    """Settle every parameter and buffer that lives in a memory-mapped checkpoint once a step
    has replaced what it replaced. One still holding the file's bytes stays mapped with its
    pages given back: a quantized config's float32 embedding table is then resident only in the
    rows its lookups read, as in a saved checkpoint (int8 and int4 keep 114 MB of it otherwise).
    One written in place (an adapter merged into a mapped weight) is copied into memory of its
    own, since giving back a written copy-on-write page would restore the file's bytes. Returns
    the bytes copied. Tied parameters are one Parameter object: settled once, still tied."""
    files = [m for m in mappings() if m.is_weight_file]
    if not files:
        return 0
    copied = 0
    settled: dict[int, torch.Tensor] = {}

    def settle(key: int, t: torch.Tensor) -> torch.Tensor:
        nonlocal copied
        if key not in settled:
            if _unwritten(t):
                _drop_pages(t)
                settled[key] = t
            else:
                settled[key] = _copy_out(t)
                copied += t.nbytes
        return settled[key]

    with torch.no_grad():
        for module in (sub for m in modules if m is not None for sub in m.modules()):
            for param in module._parameters.values():
                if param is not None and param.device.type == "cpu" and _in(param.data_ptr(), files):
                    param.data = settle(id(param), param.data)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device.type == "cpu" and _in(buffer.data_ptr(), files):
                    module._buffers[name] = settle(id(buffer), buffer)
    return copied


class CheckpointPages:
    """Give back the resident pages of a mapped checkpoint under a layer's weight once the layer
    has been replaced. The file keeps the bytes (a later read would page them in again); the
    process stops holding them, so quantizing layer after layer does not page the whole float32
    checkpoint in at once (with the rest of this change the int8 load peak fell from 1344 to 689 MiB, docs/memory.md).
    Built once per pass over `model`: the mapped spans and how many module slots hold each
    tensor, so a weight tied to another module (the embedding) keeps its pages."""

    def __init__(self, model: nn.Module):
        self.spans = weight_file_spans()
        self.holders = Counter(
            t.data_ptr()
            for m in model.modules()
            for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None and t.device.type == "cpu"
        )

    def drop(self, tensor: torch.Tensor) -> int:
        """Returns the bytes given back: 0 unless `tensor` lies in a mapped checkpoint and only
        the replaced layer held it. The heap is trimmed too: a layer's quantization temporaries
        are freed into it, and untrimmed they piled up to 100 MB over the peak by the last layer."""
        malloc_trim()
        address = tensor.data_ptr()
        if self.holders[address] != 1 or not _in_spans(address, self.spans):
            return 0
        return _drop_pages(tensor)


def release(modules) -> int:
    """Free what a compression step left behind: checkpoint pages no live tensor needs and
    freed heap. Returns the bytes of live tensors copied out of the checkpoint mapping."""
    copied = materialise(modules)
    gc.collect()
    malloc_trim()
    return copied


def _live_tensors() -> tuple[dict[int, int], dict[int, int]]:
    """(KV-cache storages, every other CPU tensor storage) alive in this process, address ->
    bytes, found by the garbage collector: the running batch's cache and activations during a
    request (read from another thread, e.g. the status page), what stays alive between them."""
    kv: dict[int, int] = {}
    other: dict[int, int] = {}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: it reads __class__, which some module proxies warn on
        try:
            if issubclass(kind, Cache):
                for layer in getattr(obj, "layers", []):
                    for name in ("keys", "values"):
                        t = getattr(layer, name, None)
                        if isinstance(t, torch.Tensor) and (held := _cpu_storage(t)):
                            kv[held[0]] = held[1]
            elif issubclass(kind, torch.Tensor):
                for leaf in _leaves(obj):
                    if held := _cpu_storage(leaf):
                        other[held[0]] = held[1]
        except Exception:  # noqa: BLE001 - the collector hands back half-built and foreign objects too:
            continue  # one that cannot be read is left uncounted (it shows as unaccounted), never fatal
    return kv, other


def _cpu_storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a CPU tensor's storage; None for meta, fake and functional tensors,
    which hold no memory (torch.compile leaves them alive), and for sparse ones, which have no
    single storage to read (left uncounted: the workbench makes none)."""
    if t.device.type != "cpu" or t.is_meta or t.layout != torch.strided or type(t).__name__ in _NO_STORAGE:
        return None
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


_NO_STORAGE = {"FakeTensor", "FunctionalTensor"}


@dataclass
class MemoryReport:
    """Resident memory of this process, split by what holds it (bytes). `rss` is measured;
    the parts are measured separately, so `unaccounted` (rss minus the parts) says how far
    the split is from the truth: Python objects and libraries loaded after the model, heap
    fragments."""

    rss: int
    peak: int
    """VmHWM: the most this process has held, whatever it loaded (a test run holds many models)"""
    load_peak: int
    """VmHWM when the session finished loading and compressing"""
    runtime: int
    """the interpreter and its libraries: anonymous memory before the model loaded, plus the
    resident pages of every mapped file that is not a checkpoint"""
    weights: dict[str, int] = field(default_factory=dict)
    """resident bytes per dtype of the session's tensors, each storage once, wherever it lives"""
    weights_file_backed: int = 0
    """of `weights`, the bytes that are pages of a memory-mapped checkpoint"""
    stale_checkpoint_pages: int = 0
    """resident pages of mapped checkpoints that back no live tensor (a replaced layer's original)"""
    kv_cache: int = 0
    """live KV caches (zero between requests: the engine builds one per generation)"""
    activations: int = 0
    """every other live CPU tensor: a running request's activations and logits, whatever a
    caller keeps. Freed activations the C heap keeps resident fall under `unaccounted`."""
    device_weights: int = 0
    """bytes of weights on an accelerator (not resident here)"""

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values()) + self.stale_checkpoint_pages

    @property
    def accounted(self) -> int:
        return self.runtime + self.weight_total + self.kv_cache + self.activations

    @property
    def unaccounted(self) -> int:
        return self.rss - self.accounted

    def as_dict(self) -> dict:
        return {**asdict(self), "weight_total": self.weight_total, "unaccounted": self.unaccounted}

    def summary(self) -> str:
        """One line: what the process holds and why."""
        weights = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(self.weights.items(), key=lambda kv: -kv[1]) if v)
        stale = (
            f", stale checkpoint pages {self.stale_checkpoint_pages / 1e6:.0f}"
            if self.stale_checkpoint_pages >= 1e6
            else ""
        )
        mapped = (
            f" ({self.weights_file_backed / 1e6:.0f} of them mapped from the checkpoint)"
            if self.weights_file_backed
            else ""
        )
        device = f" | on the device: weights {self.device_weights / 1e6:.0f} MB" if self.device_weights else ""
        return (
            f"resident {self.rss / 1e6:.0f} MB = runtime {self.runtime / 1e6:.0f} + weights {self.weight_total / 1e6:.0f}"
            f" [{weights or 'none'}{stale}]{mapped} + KV cache {self.kv_cache / 1e6:.0f} + activations"
            f" {self.activations / 1e6:.0f} + unaccounted {self.unaccounted / 1e6:.0f} | load peak {self.load_peak / 1e6:.0f} MB"
            + device
        )


def measure(modules, *, runtime_anon: int, load_peak: int) -> MemoryReport:
    """The split for a session whose tensors live in `modules`; `runtime_anon` is the
    anonymous memory the process held before its model loaded."""
    maps = mappings()
    status = process_status()
    files = [m for m in maps if m.is_weight_file]
    tensors = module_tensors(modules)
    storages = _storages(tensors)
    kv, live = _live_tensors()
    weights: Counter[str] = Counter()
    file_backed = 0
    covered: Counter[int] = Counter()
    for address, (nbytes, dtype) in storages.items():
        mapping = _in(address, files)
        # mincore answers for the page cache, not this process: a checkpoint just written is all
        # cached, though only the embedding rows a forward read are mapped in here
        held = int(
            nbytes * (resident_fraction(address, nbytes) if mapping is None else mapped_fraction(address, nbytes))
        )
        weights[dtype] += held
        if mapping is not None:
            file_backed += held
            covered[mapping.start] += held
    stale = sum(max(0, m.rss - covered[m.start]) for m in files)
    libraries = sum(m.rss - m.anonymous for m in maps if m.is_file and not m.is_weight_file)
    device = sum(t.nbytes for t in tensors if t.device.type not in ("cpu", "meta"))
    return MemoryReport(
        rss=status.get("VmRSS", 0),
        peak=status.get("VmHWM", 0),
        load_peak=load_peak,
        runtime=runtime_anon + libraries,
        weights=dict(weights),
        weights_file_backed=file_backed,
        stale_checkpoint_pages=stale,
        kv_cache=sum(int(n * resident_fraction(a, n)) for a, n in kv.items()),
        activations=sum(int(n * resident_fraction(a, n)) for a, n in live.items() if a not in storages and a not in kv),
        device_weights=device,
    )
