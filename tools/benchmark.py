#!/usr/bin/env python3
"""Params, GMACs, inference / training throughput and peak memory, each against a timm peer.

    python tools/benchmark.py                                   # cbam_resnet50 eca_resnet50 vs resnet50
    python tools/benchmark.py --models cbam_resnet18 eca_mobilenet_v2 --batch-size 16 --steps 5
    python tools/benchmark.py --models eca_resnet50 --peer eca_resnet50=resnet50d --device cuda
    python tools/benchmark.py --ops gate --batch-size 8         # each op backend against its reference
    python tools/benchmark.py --ops neighborhood --batch-size 2 --threads 1
    python tools/benchmark.py --ops routing --batch-size 2 --threads 1
    python tools/benchmark.py --ops agent --batch-size 8 --threads 1
    python tools/benchmark.py --ops linear --batch-size 1 --threads 1

Each model and its peer are timed in the same process with their steps interleaved
(ours, peer, peer, ours, ...) so that drift and neighbours on a noisy machine hit
both alike; medians are reported, and the ratios are ours/peer images/s.
GMACs = FlopCounterMode FLOPs / 2 for one image (papers quote multiply-accumulates).
Peak memory is that of one training step: weights, optimizer state, batch,
activations and gradients (CUDA: allocator peak; CPU: the profiler's allocation trace).
"""
import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

if __name__ == "__main__" and not __package__:  # run by path: see tools/_bootstrap.py
    import _bootstrap  # noqa: F401

import attnzoo  # noqa: E402  (registers our models with timm)
from tools import _common as C  # noqa: E402

# ours -> the timm model it extends; families named <attn>_<timm name> need no entry (see peer_for)
PEERS = {
    "cbam_resnet18": "resnet18",
    "cbam_resnet34": "resnet34",
    "cbam_resnet50": "resnet50",
    "cbam_resnet101": "resnet101",
    "eca_resnet18": "resnet18",
    "eca_resnet34": "resnet34",
    "eca_resnet50": "resnet50",
    "eca_resnet101": "resnet101",
    "eca_resnet152": "resnet152",
    "eca_mobilenet_v2": "mobilenetv2_100",
    # NAT/DiNAT: Swin at equal size (the comparison the NAT papers make)
    **{f"{fam}_{size}": f"swin_{size}_patch4_window7_224" for fam in ("nat", "dinat") for size in ("tiny", "small", "base")},
    # MAViT: Swin-T, the usual peer of 4-5 GMAC hierarchical models
    **{f"mala_{size}": "swin_tiny_patch4_window7_224" for size in ("tiny", "small", "base", "large")},
    # HaloNet: timm's own model of the same config
    "attn_halonet26t": "halonet26t",
    "attn_halonet50ts": "halonet50ts",
    "haloattn_h1": "halonet_h1",
    # Agent attention: the timm model each family modifies, at similar size
    **{f"agent_swin_{size}": f"swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base")},
    "agent_pvt_tiny": "pvt_v2_b1", "agent_pvt_small": "pvt_v2_b2", "agent_pvt_medium": "pvt_v2_b3",
    "agent_pvt_large": "pvt_v2_b4",
    "test_cbam_resnet": "test_resnet",
    "test_eca_resnet": "test_resnet",
    # BiFormer: Swin-T, the nearest FLOPs peer (the BiFormer paper's comparison)
    **{f"biformer_{size}": "swin_tiny_patch4_window7_224" for size in ("tiny", "small", "base")},
}

COLUMNS = ["model", "params_m", "gmacs", "infer_img_s", "train_img_s", "train_mem_mb",
           "peer", "peer_params_m", "peer_gmacs", "peer_infer_img_s", "peer_train_img_s", "peer_train_mem_mb",
           "infer_ratio", "train_ratio"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=C.HelpFormatter)
    p.add_argument("--models", nargs="+", default=["cbam_resnet50", "eca_resnet50"])
    p.add_argument("--peer", nargs="*", default=[],
                   help="NAME (peer of every model), MODEL=NAME, or 'none' / MODEL=none to skip")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=None, help="default: the model's (1000 for ImageNet)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for both modes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--no-timing", action="store_true", help="params and GMACs only")
    p.add_argument("--ops", nargs="*", default=None, metavar="OP",
                   help=f"benchmark ops instead of models: {sorted(OP_BENCHES)} (none given: all)")
    p.add_argument("--results-file", default=None, help="default: output/benchmark/{models,ops}.csv")
    return p.parse_args(argv)


def peer_for(name, overrides):
    if name in overrides:
        return overrides[name]
    if "*" in overrides:
        return overrides["*"]
    if name in PEERS:
        return PEERS[name]
    head, _, tail = name.partition("_")  # e.g. a future cbam_resnext50_32x4d -> resnext50_32x4d
    return tail if tail and timm.is_model(tail) and name in attnzoo.list_models() else None


class Bench:
    """One model, its batch, an optimizer, and one-step callables for inference and training."""

    def __init__(self, name, args):
        kw = {} if args.num_classes is None else dict(num_classes=args.num_classes)
        self.model = C.create_model(name, img_size=args.img_size, **kw)
        self.name, self.args, self.device = name, args, torch.device(args.device)
        self.params = C.count_params(self.model)
        self.gmacs = gmacs(self.model, args.img_size)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(self.device, memory_format=fmt)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=self.device).contiguous(
            memory_format=fmt)
        self.y = torch.randint(0, self.model.num_classes, (args.batch_size,), device=self.device)
        # SGD with momentum: the optimizer of the ResNet papers; its state is part of training memory
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def infer(self):
        self.model.eval()
        with torch.inference_mode(), self.autocast():
            self.model(self.x)
        self.sync()

    def train(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.sync()

    def train_peak_mb(self):
        """Resting state (weights, optimizer state, batch) + the step's allocation peak above it."""
        self.train()  # creates the optimizer state
        self.opt.zero_grad(set_to_none=True)  # gradients are part of what the step allocates
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x, self.y,
                   *(t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t))]
        resting = sum(t.numel() * t.element_size() for t in tensors)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.train()
            extra = torch.cuda.max_memory_allocated() - base
        else:
            extra = cpu_alloc_peak(self.train)
        return (resting + extra) / 2 ** 20


def gmacs(model, img_size):
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    # FlopCounterMode has no formula for CPU SDPA: count modules' explicit attention math instead
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    counter = FlopCounterMode(display=False)
    # the reference backend: fast paths may express reductions as matmuls, which the counter would add
    try:
        for m in fused:
            m.fused_attn = False
        with torch.no_grad(), counter, _env(ATTNZOO_BACKEND="reference"):
            model(torch.randn(1, 3, img_size, img_size))
    finally:
        for m in fused:
            m.fused_attn = True
    return counter.get_total_flops() / 2 / 1e9


@contextlib.contextmanager
def _env(**kv):
    saved = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on fd 2 from C++; silence them for the profiled step only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_alloc_peak(fn):
    """Peak bytes allocated by fn above the level at its start, from the profiler's allocation events
    (the CPU allocator keeps no peak counter, and RSS hides reuse of memory glibc already holds)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                allocs.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
            stack.extend(node.children)
        if not allocs:
            return 0
        allocs.sort()
        # the running total is process-wide and not reset per session: measure from the level at the start
        return max(total for _, total, _ in allocs) - (allocs[0][1] - allocs[0][2])
    except Exception as e:  # private profiler API: degrade to "-" rather than lose the benchmark
        print(f"warning: CPU memory measurement failed ({type(e).__name__}: {e})")
        return float("nan")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(benches, mode, args):
    """Median seconds per step of each bench; order alternates each round (ABBA) to cancel drift."""
    times = [[] for _ in benches]
    for i in range(args.warmup + args.steps):
        order = list(range(len(benches)))[::1 if i % 2 == 0 else -1]
        for j in order:
            t = timed(getattr(benches[j], mode))
            if i >= args.warmup:
                times[j].append(t)
    return [statistics.median(t) for t in times]


def run_pair(name, peer, args):
    benches = [Bench(name, args)] + ([Bench(peer, args)] if peer else [])
    if args.no_timing:
        row = dict(model=name, params_m=benches[0].params / 1e6, gmacs=benches[0].gmacs, peer=peer or "")
        if peer:
            row.update(peer_params_m=benches[1].params / 1e6, peer_gmacs=benches[1].gmacs)
        return row
    infer = interleaved(benches, "infer", args)
    train = interleaved(benches, "train", args)
    mem = [float("nan") if args.no_memory else b.train_peak_mb() for b in benches]
    stats = [dict(params_m=b.params / 1e6, gmacs=b.gmacs, infer_img_s=args.batch_size / ti,
                  train_img_s=args.batch_size / tt, train_mem_mb=m)
             for b, ti, tt, m in zip(benches, infer, train, mem)]
    row = dict(model=name, **stats[0], peer=peer or "")
    if peer:
        row.update({f"peer_{k}": v for k, v in stats[1].items()})
        row.update(infer_ratio=stats[0]["infer_img_s"] / stats[1]["infer_img_s"],
                   train_ratio=stats[0]["train_img_s"] / stats[1]["train_img_s"])
    return row


# ----------------------------------------------------------------------------- ops

@dataclasses.dataclass
class OpCase:
    """One op at one shape: ``run(inputs, backend)`` for the op's backends, plus baselines
    (other formulations, ``fn(inputs)``) timed beside them. ``flops``: useful FLOPs of one forward."""

    op: str
    shape: str
    inputs: list
    run: object
    flops: float = 0.0
    baselines: dict = dataclasses.field(default_factory=dict)
    memory: bool = False  # also measure each method's forward+backward peak allocation


def _gate_cases(batch, device, dtype):
    """CBAM and ECA gates at ResNet-50's four stage shapes (224 px)."""
    from collections import OrderedDict

    from torch import nn

    from attnzoo.ops.gate import cbam_gate, eca_gate

    for ch, H in ((256, 56), (512, 28), (1024, 14), (2048, 7)):
        mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(ch, ch // 16), act=nn.ReLU(), fc2=nn.Linear(ch // 16, ch)))
        conv = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1))
        mlp, conv = mlp.to(device, dtype), conv.to(device, dtype)
        w = torch.randn(1, 1, 5, device=device, dtype=dtype)
        x = torch.randn(batch, ch, H, H, device=device, dtype=dtype)
        shape = f"{batch}x{ch}x{H}x{H}"
        yield OpCase("cbam_gate", shape, [x] + list(mlp.parameters()) + list(conv.parameters()),
                     lambda ins, b, m=mlp, c=conv: cbam_gate(ins[0], m, c, backend=b))
        yield OpCase("eca_gate", shape, [x, w], lambda ins, b: eca_gate(ins[0], ins[1], backend=b))


def _tiled_sdpa_8x8(q, k, v, kernel_size, dilation, scale, tile=8):
    """The formulation measured before this backend (for the benchmark only): dilation
    sub-grids moved into the batch, ``tile x tile`` query tiles attending their clamped
    ``(tile + k - 1)^2`` halo (gathered with ``index_select``) under an additive mask,
    through ``scaled_dot_product_attention``; no rpb, square maps divisible by the dilation."""
    from attnzoo.ops.neighborhood import reference
    import math
    B, H, W, heads, D = q.shape
    d, ks = dilation, kernel_size
    n = H // d
    T = tile if n % tile == 0 else next(t for t in range(tile, 0, -1) if n % t == 0)
    nt, hal = n // T, T + ks - 1
    starts = torch.tensor([min(max(i * T - ks // 2, 0), n - hal) for i in range(nt)])
    idx = (starts[:, None] + torch.arange(hal)).reshape(-1)
    keys, _ = reference.neighbor_index(n, ks)
    pos = torch.arange(n).view(nt, T)
    rows = idx.view(nt, hal)
    ok = (rows[:, None, :] >= keys[pos][..., :1]) & (rows[:, None, :] <= keys[pos][..., -1:])  # [nt, T, hal]
    ok = ok[:, None, :, None, :, None] & ok[None, :, None, :, None, :]
    mask = torch.zeros(ok.shape, dtype=q.dtype).masked_fill_(~ok, -math.inf).reshape(nt * nt, 1, T * T, hal * hal)

    def sub(x):  # [B, H, W, heads, D] -> [B * d * d, n, n, heads, D]
        return x.reshape(B, n, d, n, d, heads, D).permute(0, 2, 4, 1, 3, 5, 6).reshape(B * d * d, n, n, heads, D)

    Bd = B * d * d

    def halo(x):
        x = sub(x).index_select(1, idx).index_select(2, idx).view(Bd, nt, hal, nt, hal, heads, D)
        return x.permute(1, 3, 0, 5, 2, 4, 6).reshape(nt * nt, Bd * heads, hal * hal, D)

    qt = sub(q).view(Bd, nt, T, nt, T, heads, D).permute(1, 3, 0, 5, 2, 4, 6).reshape(nt * nt, Bd * heads, T * T, D)
    o = F.scaled_dot_product_attention(qt, halo(k), halo(v), attn_mask=mask, scale=scale)
    o = o.view(nt, nt, B, d, d, heads, T, T, D).permute(2, 0, 6, 3, 1, 7, 4, 5, 8)
    return o.reshape(B, H, W, heads, D)




def _neighborhood_cases(batch, device, dtype):
    """NAT/DiNAT's first level: B=2 (default), 4 heads, 56x56, D=32, k=7, dilation 1 and 2, with and
    without rpb, against the reference's gather form and the earlier tiled-SDPA formulation."""
    from attnzoo.ops.neighborhood import na2d

    heads, n, D, ks = 4, 56, 32, 7
    for dil in (1, 2):
        for with_rpb in (False, True):
            q, k, v = (torch.randn(batch, n, n, heads, D, device=device, dtype=dtype) for _ in range(3))
            ins = [q, k, v] + ([torch.randn(heads, 2 * ks - 1, 2 * ks - 1, device=device, dtype=dtype)] if with_rpb else [])
            base = {} if with_rpb else {"tiled-sdpa-8x8": lambda i, d=dil: _tiled_sdpa_8x8(*i[:3], ks, d, D ** -0.5)}
            yield OpCase(f"na2d d{dil}" + (" rpb" if with_rpb else ""), f"{batch}x{n}x{n}x{heads}x{D} k{ks}", ins,
                         lambda i, b, d=dil: na2d(i[0], i[1], i[2], ks, d, rpb=i[3] if len(i) > 3 else None, backend=b),
                         flops=4 * batch * heads * n * n * ks * ks * D, baselines=base)


def _halo_cases(batch, device, dtype):
    """HaloNet's attention layer (64x64, block 8, halo 3, 8 heads, dim 256) on our op against
    timm's ``HaloAttn`` holding the same weights."""
    import copy

    from timm.layers.halo_attn import HaloAttn

    from attnzoo.layers import HaloAttention

    dim, n = 256, 64
    timm_layer = HaloAttn(dim, dim, num_heads=8, block_size=8, halo_size=3).to(device, dtype)
    ours = HaloAttention(dim, dim, num_heads=8, block_size=8, halo_size=3).to(device, dtype)
    ours.load_state_dict(copy.deepcopy(timm_layer.state_dict()))
    x = torch.randn(batch, dim, n, n, device=device, dtype=dtype)

    def run(ins, b):
        ours.backend = b
        return ours(ins[0])

    yield OpCase("halo_attn", f"{batch}x{dim}x{n}x{n} b8 h3", [x], run,
                 flops=4 * batch * n * n * 14 * 14 * dim, baselines={"timm HaloAttn": lambda ins: timm_layer(ins[0])})


def _official_gather_bra(q, k, v, S, topk, scale):
    """BiFormer's ``ops/bra_legacy.py`` data flow (for the benchmark only): region layout, routing
    by region means, K/V concatenated, ``expand`` to ``[B, S^2, S^2, n, 2C]`` and ``gather`` of
    ``topk`` copies, then matmul / softmax / matmul. Maps divisible by ``S``."""
    B, H, W, heads, D = q.shape
    C, h, w = heads * D, H // S, W // S

    def regions(x):  # [B, H, W, heads, D] -> [B, S*S, h*w, C]
        return x.reshape(B, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, S * S, h * w, C)

    qr, kv = regions(q), torch.cat([regions(k), regions(v)], -1)
    with torch.no_grad():
        r_idx = torch.topk((qr.mean(2) * scale) @ kv[..., :C].mean(2).transpose(-1, -2), topk, dim=-1).indices
    p2, n = S * S, h * w
    sel = torch.gather(kv.view(B, 1, p2, n, 2 * C).expand(-1, p2, -1, -1, -1), 2,
                       r_idx.view(B, p2, topk, 1, 1).expand(-1, -1, -1, n, 2 * C))
    k_sel = sel[..., :C].reshape(B * p2, topk * n, heads, D).permute(0, 2, 3, 1)
    v_sel = sel[..., C:].reshape(B * p2, topk * n, heads, D).transpose(1, 2)
    qh = qr.reshape(B * p2, n, heads, D).transpose(1, 2)
    out = torch.softmax((qh * scale) @ k_sel, -1) @ v_sel
    return out.transpose(1, 2).reshape(B, S, S, h, w, heads, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, H, W, heads, D)


def _dense_masked_bra(q, k, v, S, topk, scale):
    """The routing as a token-level boolean mask over dense SDPA (for the benchmark only)."""
    from attnzoo.ops.routing import reference

    B, H, W, heads, D = q.shape
    idx = reference.route(q, k, (S, S), topk)  # [B, nR, topk]
    sel = torch.zeros(B, S * S, S * S, dtype=torch.bool, device=q.device).scatter_(2, idx, True)
    rows = torch.arange(H, device=q.device) // (H // S)
    cols = torch.arange(W, device=q.device) // (W // S)
    region = (rows[:, None] * S + cols[None, :]).reshape(-1)  # region of each token
    mask = sel[:, region[:, None], region[None, :]]  # [B, HW, HW]
    qh, kh, vh = (t.reshape(B, H * W, heads, D).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, D)


def _routing_cases(batch, device, dtype):
    """BiFormer's second stage shape: B=2 (default), 4 heads, 56x56, S=7 (8x8 regions), topk=4,
    D=32, against the official expand + gather formulation and dense SDPA under the routing
    mask; peak memory of forward+backward."""
    from attnzoo.ops.routing import bra

    heads, n, D, S, topk = 4, 56, 32, 7, 4
    q, k, v = (torch.randn(batch, n, n, heads, D, device=device, dtype=dtype) for _ in range(3))
    scale = (heads * D) ** -0.5
    yield OpCase("bra", f"{batch}x{n}x{n}x{heads}x{D} S{S} topk{topk}", [q, k, v],
                 lambda i, b: bra(i[0], i[1], i[2], S, topk, backend=b),
                 flops=4 * batch * heads * n * n * topk * (n // S) ** 2 * D,
                 baselines={"official expand+gather": lambda i: _official_gather_bra(*i, S, topk, scale),
                            "dense SDPA + mask": lambda i: _dense_masked_bra(*i, S, topk, scale)},
                 memory=True)


def _agent_official_eager(q, k, v, a, b1, b2, scale):
    """The official AgentAttention's two stages, as written there (benchmark baseline): biases
    ``repeat``-ed over the batch, agents and queries scaled before their products."""
    b = q.shape[0]
    attn = torch.softmax((a * scale) @ k.transpose(-2, -1) + b1.unsqueeze(0).repeat(b, 1, 1, 1), dim=-1)
    agent_v = attn @ v
    attn = torch.softmax((q * scale) @ a.transpose(-2, -1) + b2.unsqueeze(0).repeat(b, 1, 1, 1), dim=-1)
    return attn @ agent_v


def _agent_cases(batch, device, dtype):
    """Agent-Swin-T's first stage: 56x56 tokens, 49 agents, 4 heads, D=32, both biases, against
    the official code's eager formulation."""
    from attnzoo.ops.agent import agent_attention

    heads, n, agents, D = 4, 56 * 56, 49, 32
    q, k, v = (torch.randn(batch, heads, n, D, device=device, dtype=dtype) for _ in range(3))
    a = torch.randn(batch, heads, agents, D, device=device, dtype=dtype)
    b1 = 0.1 * torch.randn(heads, agents, n, device=device, dtype=dtype)
    b2 = 0.1 * torch.randn(heads, n, agents, device=device, dtype=dtype)
    yield OpCase("agent_attn", f"{batch}x{heads}x{n}x{D} A{agents}", [q, k, v, a, b1, b2],
                 lambda i, b: agent_attention(*i, backend=b), flops=4 * 2 * batch * heads * n * agents * D,
                 baselines={"official eager": lambda i: _agent_official_eager(*i, D ** -0.5)})


def _official_mala(q, k, v, sin_full, cos_full, scale):
    """qhfan/MALA's ``AddLinearAttention`` maths from the elu+1 features on, eager (for the benchmark
    only): ``[N, D]`` tables, RoPE by the "rotate every two" shuffle, z before RoPE, eps 1e-6."""
    n = q.shape[-2]
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) * scale

    def turn(x):
        return x * cos_full + torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2) * sin_full

    q, k = turn(q), turn(k)
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    return q @ kv * (1 + 1 / (z + 1e-6)) - z * v.mean(dim=2, keepdim=True)


def _linear_cases(batch, device, dtype):
    """MALA on MAViT-style heads (4 heads, D=32, 2-D RoPE): at 56x56 against the official eager
    formulation, then 56^2 / 112^2 / 224^2 tokens beside softmax attention (SDPA) on the same
    q, k, v, to show linear against quadratic growth (a different op: its error column is not
    a bug; SDPA at 224^2, ~1.3 TFLOP a forward per image, runs on CUDA only)."""
    from attnzoo.layers.mala import RotaryEmbedding2d
    from attnzoo.ops.linear import magnitude_aware_linear_attention

    heads, D = 4, 32
    for n in (56, 112, 224):
        cos, sin = (t.to(device, dtype) for t in RotaryEmbedding2d(heads * D, heads)(n, n))
        q, k = (F.elu(torch.randn(batch, heads, n * n, D, device=device, dtype=dtype)) + 1 for _ in range(2))
        v = torch.randn(batch, heads, n * n, D, device=device, dtype=dtype)
        base = {}
        if n == 56:
            sf, cf = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
            base["official eager"] = lambda i, s_=sf, c_=cf: _official_mala(*i, s_, c_, D ** -0.5)
        if n < 224 or device.type == "cuda":
            base["sdpa (softmax)"] = lambda i: F.scaled_dot_product_attention(*i)
        yield OpCase("mala", f"{batch}x{heads}x{n * n}x{D} rope", [q, k, v],
                     lambda i, b, r=(cos, sin): magnitude_aware_linear_attention(*i, r, backend=b),
                     flops=4 * batch * heads * n * n * D * D, baselines=base)


OP_BENCHES = {"gate": _gate_cases, "neighborhood": _neighborhood_cases, "halo": _halo_cases,
              "routing": _routing_cases, "agent": _agent_cases, "linear": _linear_cases}
OP_COLUMNS = ["op", "shape", "method", "fwd_ms", "fwd_bwd_ms", "fwd_speedup", "fwd_bwd_speedup",
              "fwd_gflops", "of_matmul_peak", "max_rel_err", "fwd_bwd_peak_mb"]


def _fwd_bwd(fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(leaves)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
    return y, grads


def matmul_gflops(device, steps=5):
    """The machine's float32 matmul rate in this process and thread setting: the ceiling for 'useful' FLOP/s."""
    a = torch.randn(1024, 1024, device=device)
    t = statistics.median(timed(lambda: (a @ a, _sync(device))) for _ in range(steps + 1))
    return 2 * 1024 ** 3 / t / 1e9


def bench_ops(args):
    """Each backend that can run here and each baseline against the op's reference, forward
    and forward+backward. As in flash-linear-attention's benchmarks, a method whose outputs or
    gradients differ from the reference's gets no speedup figure."""
    from attnzoo.ops import _dispatch

    device = torch.device(args.device)
    names = args.ops or sorted(OP_BENCHES)
    backends = ["cpu"] if device.type == "cpu" else ["triton"]
    peak = matmul_gflops(device)
    print(f"  float32 matmul: {peak:.1f} GFLOP/s")
    rows = []
    for name in names:
        if name not in OP_BENCHES:
            raise SystemExit(f"error: unknown op {name!r}; choose from {sorted(OP_BENCHES)}")
        for case in OP_BENCHES[name](args.batch_size, device, torch.float32):
            methods = {"reference": lambda i, c=case: c.run(i, "reference")}
            for b in backends:
                if b == "triton" and _dispatch.can_run_triton(case.inputs, True) is not None:
                    continue
                methods[b] = lambda i, c=case, b=b: c.run(i, b)
            methods.update(case.baselines)
            ref_y, ref_g = _fwd_bwd(methods["reference"], case.inputs)
            errs = {}
            for m, fn in methods.items():
                y, g = _fwd_bwd(fn, case.inputs)
                errs[m] = max([((y - ref_y).norm() / ref_y.norm()).item()] +
                              [((a - r).norm() / r.norm().clamp_min(1e-12)).item()
                               for a, r in zip(g, ref_g) if a is not None and r is not None])
            fwd = {m: [] for m in methods}
            both = {m: [] for m in methods}
            for i in range(args.warmup + args.steps):  # methods interleaved, order alternating
                for m in (list(methods) if i % 2 == 0 else list(methods)[::-1]):
                    with torch.no_grad():
                        tf = timed(lambda: (methods[m](case.inputs), _sync(device)))
                    tb = timed(lambda: (_fwd_bwd(methods[m], case.inputs), _sync(device)))
                    if i >= args.warmup:
                        fwd[m].append(tf)
                        both[m].append(tb)
            rf, rb = statistics.median(fwd["reference"]), statistics.median(both["reference"])
            peak_mb = {m: float("nan") for m in methods}
            if case.memory:
                for m in methods:
                    peak_mb[m] = _op_peak_bytes(lambda m=m: _fwd_bwd(methods[m], case.inputs), device) / 2 ** 20
            for m in methods:
                tf, tb = statistics.median(fwd[m]), statistics.median(both[m])
                ok = errs[m] < 1e-4
                gfl = case.flops / tf / 1e9 if case.flops else float("nan")
                rows.append(dict(op=case.op, shape=case.shape, method=m, fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3,
                                 fwd_speedup=rf / tf if ok else "wrong", fwd_bwd_speedup=rb / tb if ok else "wrong",
                                 fwd_gflops=gfl, of_matmul_peak=gfl / peak, max_rel_err=errs[m],
                                 fwd_bwd_peak_mb=peak_mb[m]))
            print(f"  {case.op} {case.shape}: " + ", ".join(
                f"{m} {statistics.median(both[m]) * 1e3:.1f} ms" for m in methods), flush=True)
    return rows


def _op_peak_bytes(fn, device):
    """Peak bytes allocated by ``fn`` above the level at its start (inputs excluded)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return cpu_alloc_peak(fn)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:  # fixed, not C.ThreadPicker's load-dependent choice: runs must stay comparable
        torch.set_num_threads(args.threads)
    if args.steps < 1:
        raise SystemExit("error: --steps must be >= 1")
    C.check_device(args.device)
    overrides = {}
    for item in args.peer:
        model, _, peer = item.rpartition("=")
        overrides[model or "*"] = None if peer.lower() == "none" else peer
    for name in args.models + [p for p in overrides.values() if p]:
        C.check_model_name(name)

    print(f"{args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, {args.img_size}px, "
          f"{args.warmup} warmup + {args.steps} timed steps, channels_last={args.channels_last}, amp={args.amp}")
    if args.ops is not None:
        rows = bench_ops(args)
        path = args.results_file or os.path.join("output", "benchmark", "ops.csv")
        C.write_rows(path, rows, OP_COLUMNS)
        print()
        print(C.format_table(rows, OP_COLUMNS, markdown=True))
        print(f"\nresults: {path}")
        return rows
    rows = []
    for name in args.models:
        peer = peer_for(name, overrides)
        print(f"  {name}" + (f" vs {peer}" if peer else " (no peer)") + " ...", flush=True)
        rows.append(run_pair(name, peer, args))

    path = args.results_file or os.path.join("output", "benchmark", "models.csv")
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    C.write_rows(path, rows, columns)
    print()
    print(C.format_table(rows, columns, markdown=True))
    print(f"\nresults: {path}")
    return rows


if __name__ == "__main__":
    main()
