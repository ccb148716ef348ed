"""Reference CPU code for the few things that truly need CUDA, so that the GPU path runs on a CPU.

``make gpu-check --smoke`` and the tests use it to drive prunelib's own CUDA code paths
(the 2:4 cuSPARSELt weights, the CUDA-graph capture of a timed step) on the CPU. Nothing
of prunelib is replaced: only torch's CUDA-only entry points.

- :func:`fake_cusparselt`: ``torch._cslt_compress`` / ``torch._cslt_sparse_mm`` as reference
  CPU code (one packed tensor: the kept values, then 4 bits of indices per group of 4, the
  size of the real layout), ``torch.backends.cusparselt.is_available`` true, torch's
  "only CUDA tensors" check of ``SparseSemiStructuredTensor`` lifted (its dim, dtype and
  shape checks kept), and ``torch.cuda.get_device_name`` naming the fake. A 2:4 model built
  under it holds real ``SparseSemiStructuredTensorCUSPARSELT`` weights and runs their
  dispatch (``F.linear`` -> ``torch.ops.semi_structured.cusparselt_mm`` -> the fake kernel).
- :func:`fake_cuda_graphs`: ``torch.cuda.Stream`` / ``stream`` / ``current_stream`` /
  ``CUDAGraph`` / ``graph`` and the capture flag ``torch.cuda.is_current_stream_capturing``.
  Inside ``with torch.cuda.graph(g)`` the flag is true, as during a real capture (transformers
  reads it to choose its attention mask); a replay runs nothing (the captured outputs stay).
"""
from __future__ import annotations

import contextlib

import torch

NAME = "CPU (faked cuSPARSELt: prunelib.run.fakekernels reference code)"


def cslt_compress(dense: torch.Tensor) -> torch.Tensor:
    """A 2:4 ``[m, k]`` matrix packed as cuSPARSELt does: one 1-D tensor of the kept values
    (m k / 2) followed by the metadata (4 bits per group of 4: the two kept indices)."""
    if dense.dim() != 2 or dense.element_size() != 2 or dense.shape[1] % 16:
        raise RuntimeError(f"fake cuSPARSELt compresses 2-D 16-bit matrices with k % 16 == 0, got "
                           f"{tuple(dense.shape)} {dense.dtype}")
    m, k = dense.shape
    g = dense.reshape(m, k // 4, 4)
    # the non-zeros of each group first (lowest index first), padded with the first zeros
    order = (g != 0).to(torch.int16) * 8 + (3 - torch.arange(4, dtype=torch.int16))
    idx = order.topk(2, dim=-1).indices.sort(-1).values
    if ((g != 0).sum(-1) > 2).any():
        raise RuntimeError("fake cuSPARSELt: the matrix is not 2:4 sparse (a group of 4 has more than 2 non-zeros)")
    vals = g.gather(-1, idx)
    code = (idx[..., 0] + 4 * idx[..., 1]).to(torch.int32).reshape(m, k // 16, 4)
    word = code[..., 0] | code[..., 1] << 4 | code[..., 2] << 8 | code[..., 3] << 12
    meta = torch.where(word > 32767, word - 65536, word).to(torch.int16)
    return torch.cat([vals.reshape(-1), meta.reshape(-1).view(dense.dtype)])


def _decompress(packed: torch.Tensor, k: int) -> torch.Tensor:
    m = packed.numel() * 16 // (9 * k)
    vals = packed[: m * k // 2].reshape(m, k // 4, 2)
    word = packed[m * k // 2:].view(torch.int16).to(torch.int32).reshape(m, k // 16) & 0xFFFF
    code = torch.stack([(word >> s) & 15 for s in (0, 4, 8, 12)], -1).reshape(m, k // 4)
    idx = torch.stack([code & 3, code >> 2], -1).long()
    return torch.zeros(m, k // 4, 4, dtype=packed.dtype).scatter_(-1, idx, vals).reshape(m, k)


def cslt_sparse_mm(compressed_A, dense_B, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0,
                   split_k=1, split_k_mode=-1):
    """``A @ B`` (+ bias per row of A, times alpha) for the packed ``A`` [m, k] and a dense ``B`` [k, n]."""
    a = _decompress(compressed_A, dense_B.shape[0])
    res = (a.float() @ dense_B.float())
    if bias is not None:
        res = res + bias.float()[:, None]
    if alpha is not None:
        res = res * alpha
    res = res.to(out_dtype or dense_B.dtype)
    return res.t().contiguous() if transpose_result else res


def _validate(cls, original_tensor: torch.Tensor) -> None:
    """torch's checks of a tensor to compress (dim, contiguity, dtype, shape), without "only CUDA tensors"."""
    if original_tensor.dim() != 2 or not original_tensor.is_contiguous():
        raise RuntimeError(f"Error original_tensor of shape {tuple(original_tensor.shape)} must be 2-D and contiguous")
    if original_tensor.dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise RuntimeError(f"Error original_tensor.dtype {original_tensor.dtype} is not a supported dtype for {cls}!")
    c = cls._DTYPE_SHAPE_CONSTRAINTS[original_tensor.dtype]
    m, n = original_tensor.shape
    if m < c.sparse_min_rows or m % c.sparse_min_rows or n < c.sparse_min_cols or n % c.sparse_min_cols:
        raise RuntimeError(f"Error original_tensor.shape {original_tensor.shape} is not supported!")


@contextlib.contextmanager
def fake_cusparselt():
    """cuSPARSELt's kernels as reference CPU code for the duration of the block (see the module docstring)."""
    from torch.sparse import SparseSemiStructuredTensor

    saved = [(torch, "_cslt_compress"), (torch, "_cslt_sparse_mm"), (torch.backends.cusparselt, "is_available"),
             (SparseSemiStructuredTensor, "_validate_device_dim_dtype_shape"), (torch.cuda, "get_device_name")]
    old = [(obj, name, obj.__dict__[name]) for obj, name in saved]
    torch._cslt_compress = cslt_compress
    torch._cslt_sparse_mm = cslt_sparse_mm
    torch.backends.cusparselt.is_available = lambda: True
    SparseSemiStructuredTensor._validate_device_dim_dtype_shape = classmethod(_validate)
    torch.cuda.get_device_name = lambda device=None: NAME
    try:
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


class _Graph:
    """A stand-in for ``torch.cuda.CUDAGraph``: capture runs the block once; a replay runs nothing."""

    def __init__(self, *args, **kwargs):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _Capturing:
    def __init__(self, graph, *args, **kwargs):
        self.graph = graph

    def __enter__(self):
        _CAPTURING[0] = True
        return self

    def __exit__(self, *exc):
        _CAPTURING[0] = False
        return False


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


_CAPTURING = [False]


@contextlib.contextmanager
def fake_cuda_graphs():
    """CUDA-graph capture as a CPU stand-in for the duration of the block (see the module docstring)."""
    names = ("Stream", "stream", "current_stream", "CUDAGraph", "graph", "is_current_stream_capturing")
    old = {n: getattr(torch.cuda, n) for n in names}
    torch.cuda.Stream = _Stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _Stream()
    torch.cuda.CUDAGraph = _Graph
    torch.cuda.graph = _Capturing
    torch.cuda.is_current_stream_capturing = lambda: _CAPTURING[0]
    try:
        yield
    finally:
        _CAPTURING[0] = False
        for n, v in old.items():
            setattr(torch.cuda, n, v)
