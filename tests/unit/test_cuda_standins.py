"""The CUDA-only calls, checked on CPU against stand-ins with the exact signatures and input checks of the real
functions on the GPU machine (torch 2.11's ``torch.nn.attention.varlen.varlen_attn``; flash-attn 2.8's
``flash_attn_varlen_func``; CUDA's ``torch.addmm(..., out_dtype=...)``): q, k, v of one dtype, fp16 or bf16,
(T, H, D), int32 boundaries, key/value heads dividing the query heads. Each stand-in computes per-document causal
attention, so the packed backends' results are compared with the sdpa reference too. The next API drift fails here,
not in the GPU minutes."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sftdist.model import attention
from sftdist.model.attention import flash_attn_forward, packed_attention_kwargs, sdpa_forward, torch_varlen_forward

LENGTHS = [5, 3, 8]


def _checks(name: str, q, k, v, cu_q, cu_k) -> None:
    """What the flash kernels refuse (ATen's and flash-attn's alike)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"{name}: FlashAttention only supports fp16 and bf16, all of one dtype")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise RuntimeError(f"{name}: expected (total, heads, head_dim) tensors")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise RuntimeError(f"{name}: the key/value heads must divide the query heads")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32:
        raise RuntimeError(f"{name}: cu_seqlens must be int32")


def _reference(q, k, v, cu, scale, window) -> torch.Tensor:
    """Per-document attention in fp32 (window (-1, 0) or causal: causal), key/value heads repeated; in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        scores = qs @ ks.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        n = b - a
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if window[0] >= 0:
            causal &= torch.ones(n, n, dtype=torch.bool).triu(-window[0])
        out[a:b] = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    """torch 2.11's signature: no enable_gqa (added in 2.12); GQA by broadcast in the kernel."""
    _checks("varlen_attn", query, key, value, cu_seq_q, cu_seq_k)
    return _reference(query, key, value, cu_seq_q, scale, window_size)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                     num_splits=None):  # fmt: skip
    """torch 2.12+'s signature: GQA needs enable_gqa."""
    _checks("varlen_attn", query, key, value, cu_seq_q, cu_seq_k)
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise RuntimeError("varlen_attn: key/value heads differ from query heads; pass enable_gqa=True")
    return _reference(query, key, value, cu_seq_q, scale, window_size)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """flash-attn 2.8's signature (flash_attn/flash_attn_interface.py)."""
    _checks("flash_attn_varlen_func", q, k, v, cu_seqlens_q, cu_seqlens_k)
    assert causal and softcap == 0.0 and dropout_p == 0.0
    return _reference(q, k, v, cu_seqlens_q, softmax_scale, (window_size[0], 0))


def _inputs(dtype_qk, dtype_v, heads=4, kv_heads=2, dim=8):
    torch.manual_seed(0)
    total = sum(LENGTHS)
    q = torch.randn(1, heads, total, dim).to(dtype_qk)
    k = torch.randn(1, kv_heads, total, dim).to(dtype_qk)
    v = torch.randn(1, kv_heads, total, dim).to(dtype_v)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int64)
    return q, k, v, packed_attention_kwargs(cu, max(LENGTHS), total)


@pytest.fixture
def bf16_autocast(monkeypatch):
    """CUDA autocast as the forward sees it under precision=bf16 (no CUDA here to enter it for real)."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)


def _sdpa(q, k, v, kwargs):
    out, _ = sdpa_forward(None, q.float(), k.float(), v.float(), None, **kwargs)
    return out


@pytest.mark.parametrize("stand_in", [varlen_attn_2_11, varlen_attn_2_13], ids=["torch2.11", "torch2.13"])
def test_torch_varlen_takes_the_mixed_dtypes_of_bf16_training_with_gqa(stand_in, monkeypatch, bf16_autocast):
    """Under bf16 autocast with fp32 master weights RoPE leaves q and k fp32 while v is bf16: cast to one dtype;
    GQA with and without the enable_gqa keyword."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    q, k, v, kwargs = _inputs(torch.float32, torch.bfloat16)
    out, _ = torch_varlen_forward(None, q, k, v, None, **kwargs)
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(LENGTHS), 4, 8)
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, kwargs), atol=3e-2, rtol=3e-2)


def test_the_flash_attn_backend_meets_flash_attns_signature_and_dtypes(monkeypatch, bf16_autocast):
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    q, k, v, kwargs = _inputs(torch.float32, torch.bfloat16)
    out, _ = flash_attn_forward(None, q, k, v, None, **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, kwargs), atol=3e-2, rtol=3e-2)


def test_fp32_reaches_no_flash_kernel(monkeypatch):
    """precision=fp32: auto passes the flash backends over (saying why) and picks flex; forced, they refuse
    clearly instead of the kernel's error."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_2_11)
    q, k, v, kwargs = _inputs(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="take fp16 or bf16, not torch.float32: use precision=bf16"):
        torch_varlen_forward(None, q, k, v, None, **kwargs)
    cuda = torch.device("cuda")
    assert attention.resolve_backend("auto", cuda, "fp32") == "flex"
    assert attention.resolve_backend("auto", cuda, "bf16") in ("flash_attn", "torch_varlen")
    assert "precision=fp32" in attention.available("torch_varlen", cuda, "fp32")


def test_a_broken_flash_attn_install_is_passed_over_with_the_reason(monkeypatch, caplog):
    """find_spec says installed, the import fails (a build for another torch or CUDA): auto says so and goes on."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a)
    )
    module = types.ModuleType("flash_attn")

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c104cuda9SetDeviceEi")

    module.__getattr__ = broken
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    with caplog.at_level("INFO", logger="sftdist.model.attention"):
        chosen = attention.resolve_backend("auto", torch.device("cuda"), "bf16")
    assert chosen != "flash_attn"
    assert "not flash_attn: flash-attn does not import: ImportError: undefined symbol" in caplog.text


def test_the_row_length_comes_from_the_host():
    """The trainer passes the row's width: no read of a device tensor (which waits for the device) per micro-batch."""

    class NoRead(torch.Tensor):
        def __getitem__(self, index):
            raise AssertionError("read a value of cu_seqlens on the host")

    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    meta = packed_attention_kwargs(cu.as_subclass(NoRead), 5, 8)["sftdist_packed"]
    assert meta.total == 8
    assert packed_attention_kwargs(cu, 5)["sftdist_packed"].total == 8  # (tests and tools without the width)


def test_the_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    """Saved: the current device's state only, so a resume that sees fewer GPUs restores it; a checkpoint written
    before (every visible GPU's, by index) restores this device's."""
    from sftdist.run.checkpoint import capture_rng, restore_rng

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state.tolist()))
    states = capture_rng()
    assert states["cuda"] == [7, 7]
    restore_rng(states)
    restore_rng({**states, "cuda": [[1, 1], [2, 2], [3, 3]]})  # (the old format: device 1's)
    assert restored == [[7, 7], [2, 2]]


@pytest.mark.parametrize(
    "name,peak", [("NVIDIA H200 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA GB200", 2500.0), ("NVIDIA B200", 2250.0)]
)
def test_the_peak_table_knows_the_machines_of_the_day(monkeypatch, name, peak):
    from sftdist.metrics.flops import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda"), None) == peak


def test_selective_checkpointing_keeps_the_packed_attention_kernels():
    """Recomputing attention in backward costs as much as computing it: the varlen kernels are saved, by name."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    from torch.utils.checkpoint import CheckpointPolicy

    from sftdist.model.blocks import _policy

    for op in (
        torch.ops.torch_attn._varlen_attn.default,
        torch.ops.aten._flash_attention_forward.default,
        torch.ops.aten.mm.default,
    ):
        assert _policy(None, op) == CheckpointPolicy.MUST_SAVE, op
    assert _policy(None, torch.ops.aten.add.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def test_the_packed_metadata_reaches_every_block_as_one_object():
    """FSDP2 casts each wrapped block's inputs with torch.distributed.utils._apply_to_tensors (mixed precision): the
    metadata must come through as the same object, its masks built once for all the layers."""
    from torch.distributed.utils import _apply_to_tensors

    kwargs = packed_attention_kwargs(torch.tensor([0, 5, 8], dtype=torch.int32), 5, 8)
    meta = kwargs["sftdist_packed"]
    mask = meta.dense_mask(None)
    cast = _apply_to_tensors(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, kwargs)
    assert cast["sftdist_packed"] is meta and cast["sftdist_packed"].dense_mask(None) is mask


def test_deepspeed_keeps_bf16_autocast_inside_its_engine_on_cuda(monkeypatch):
    """DeepSpeed's own autocast_if_enabled, with the config sftdist generates, under an outer CUDA autocast (what
    the step opens on a GPU): the engine's forward keeps autocast on, in bf16, instead of turning it off."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import torch_autocast
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    from sftdist.config import StrategyConfig
    from sftdist.parallel.deepspeed import deepspeed_config

    config = deepspeed_config(StrategyConfig(name="zero3"), "bf16", 1.0)

    class Engine:
        def torch_autocast_enabled(self):
            return get_torch_autocast_enabled(config)

        def torch_autocast_dtype(self):
            return get_torch_autocast_dtype(config)

    entered = []
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: True)  # (the step's, on CUDA)
    monkeypatch.setattr(torch_autocast.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(
        torch,
        "autocast",
        lambda device_type, dtype=None, enabled=True: (
            entered.append((dtype, enabled)) or __import__("contextlib").nullcontext()
        ),
    )
    with torch_autocast.autocast_if_enabled(Engine()):
        pass
    assert entered == [(torch.bfloat16, True)]
    assert not get_torch_autocast_enabled(deepspeed_config(StrategyConfig(name="zero3"), "fp32", 1.0))


def test_mfu_counts_the_output_head_where_the_chunked_loss_runs_it():
    """train/mfu counts model FLOPs: under the chunked loss the head multiplies the supervised positions only."""
    from sftdist.metrics.flops import ModelDims

    dims = ModelDims(matmul_params=1000, layers=2, width=8, head_params=300)
    attention = 6 * 2 * 8 * (100 * 100 + 50 * 50)
    assert dims.flops([100, 50]) == 6 * 1000 * 150 + attention
    assert dims.flops([100, 50], head_tokens=30) == 6 * 700 * 150 + 6 * 300 * 30 + attention


def test_a_timed_out_benchmark_run_leaves_no_worker_behind(tmp_path):
    """bench_distributed_gpu.py: past its timeout a run's whole process group goes (torchrun and its workers)."""
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_distributed_gpu import run_group

    child = tmp_path / "child"
    code, _ = run_group(["bash", "-c", f"sleep 60 & echo $! > {child}; wait"], str(tmp_path), 1.0)
    assert code is None
    status = Path(f"/proc/{int(child.read_text())}/status")
    for _ in range(50):  # (killed, then reaped by init)
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_the_trl_bench_measures_whether_documents_are_isolated():
    """bench_vs_trl.py labels each TRL setting by measuring, not by the attention implementation's name: with
    restarting position_ids and no mask, sdpa lets a packed document attend to the one before it."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_vs_trl import documents_isolated

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    assert documents_isolated(LlamaForCausalLM(config), torch.device("cpu")) is False


def _addmm_stand_in(real, input_may_be_out_dtype: bool):
    """CUDA's ``addmm`` with ``out_dtype``: fp16/bf16 products summed in fp32. torch's check on ``input``: one of
    out_dtype or the products' dtype in newer versions, the products' dtype only in older ones."""

    def addmm(input, mat1, mat2, out_dtype=None, *, beta=1, alpha=1, out=None):
        if out_dtype is None:
            return real(input, mat1, mat2, beta=beta, alpha=alpha, out=out)
        if mat1.dtype != mat2.dtype:
            raise RuntimeError("mat1 and mat2 must have the same dtype")
        low = (torch.float16, torch.bfloat16)
        if not (out_dtype == mat1.dtype or (out_dtype == torch.float32 and mat1.dtype in low)):
            raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
        if out is not None and out.dtype != out_dtype:
            raise RuntimeError("out_dtype must be the same as the dtype of the provided out tensor")
        if input.dtype != mat1.dtype and not (input_may_be_out_dtype and input.dtype == out_dtype):
            raise RuntimeError("self and mat2 must have the same dtype")
        result = beta * input.to(out_dtype) + alpha * (mat1.double() @ mat2.double()).to(out_dtype)
        return result if out is None else out.copy_(result)

    return addmm


@pytest.mark.parametrize("newer_torch", [True, False])
def test_the_chunked_loss_sums_its_weight_gradient_in_one_fp32_matmul_where_torch_can(monkeypatch, newer_torch):
    """kernels/linear_cross_entropy.py under bf16: with an addmm that takes an fp32 input and out_dtype (CUDA, newer
    torch) each chunk's product goes straight into the fp32 gradient; where it refuses (older torch, CPU), the product
    is made in bf16 and added. Either way the gradient is that of the plain bf16 path, or closer to the exact one."""
    from sftdist.kernels import linear_cross_entropy as lce

    g = torch.Generator().manual_seed(0)
    h = torch.randn(96, 32, generator=g).requires_grad_()
    w = (torch.randn(300, 32, generator=g) / 32**0.5).requires_grad_()
    targets = torch.randint(0, 300, (96,), generator=g)
    targets[:20] = -100
    monkeypatch.setattr(lce, "_FUSED_ACCUMULATE", {})
    assert not lce.fused_accumulate(torch.device("cpu"))  # CPU has no such kernel
    unfused = torch.autograd.grad(lce.linear_cross_entropy(h, w, targets, torch.bfloat16, chunk=16), (h, w))

    monkeypatch.setattr(lce, "_FUSED_ACCUMULATE", {})
    monkeypatch.setattr(torch, "addmm", _addmm_stand_in(torch.addmm, newer_torch))
    assert lce.fused_accumulate(torch.device("cpu")) is newer_torch
    grads = torch.autograd.grad(lce.linear_cross_entropy(h, w, targets, torch.bfloat16, chunk=16), (h, w))
    exact = torch.autograd.grad(lce.linear_cross_entropy_reference(h.double(), w.double(), targets), (h, w))
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert grads[0].dtype == grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[0], unfused[0])  # the hidden states' gradient takes no sum over chunks
    if newer_torch:
        assert rel(grads[1], exact[1]) <= rel(unfused[1], exact[1])
        assert not torch.equal(grads[1], unfused[1])  # (the fused sum did run)
    else:
        assert torch.equal(grads[1], unfused[1])
