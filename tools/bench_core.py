"""Benchmark of the functional core: a Tent step against classic stateful Tent and bare forward+backward.

For a BatchNorm ResNet at batch 1, 8 and 64 it times, interleaved round by round so that machine noise hits
every variant alike:
  - functional: ``make_tent_step`` (functional_call + torch.autograd.grad, foreach Adam, metrics);
  - classic: model.train(), only BN affine params trainable, torch.optim.Adam, loss.backward(), step();
  - captured: the functional step recorded as a CUDA graph and replayed (``make_tent_step(..., capture=True)``;
    on CPU the same as functional);
  - bare: the same forward, loss and backward, nothing else;
  - graph: the captured step's CUDA graph replayed alone, without the host's input and output copies: the GPU's
    own time per step, the floor under any captured step (on CPU the eager update);
and K=8 streams: one vmapped functional update over 8 stacked states (``streams_update``, eager and captured)
against a loop of 8 classic models, with the peak memory of 8 streams over 8 times one stream's.
Peak memory is what one step allocates above what was allocated before it (torch's profiler on CPU, the CUDA
allocator's statistics on GPU); the captured step's includes its capture (warm-up runs, graph, input copies).
"ops" are the operators the host dispatches per step (views, allocations and detaches not counted): on a GPU,
about the kernel launches, the cost of a launch-bound step (a captured step dispatches only its input and
output copies; its graph is one launch). Ratios are to bare (time) and to classic (memory).

    python tools/bench_core.py [--device cuda] [--rounds 10] [--image-size 96] [--model resnet50 --image-size 224]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from yolozu.bridge import make_apply
from yolozu.demo.bench.memory import peak_bytes, sync
from yolozu.functional import filters, optim, streams
from yolozu.functional.losses import softmax_entropy
from yolozu.functional.methods.tent import make_tent_step, tent_method
from yolozu.functional.step import init_state, make_update


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet(width: int = 32, classes: int = 10) -> nn.Module:
    """A ResNet-18-shaped BatchNorm classifier (2 blocks per stage), ``width`` channels in the first stage."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def build_model(args) -> nn.Module:
    """The benchmarked network: our ResNet-18-shaped net, or torchvision's ResNet-50 (random weights)."""
    if args.model == "resnet50":
        try:
            from torchvision.models import resnet50
        except ImportError:
            raise SystemExit("--model resnet50 needs torchvision: pip install 'yolozu[torchvision]'") from None
        return resnet50(weights=None)
    return resnet(args.width)


def model_label(args) -> str:
    return "torchvision ResNet-50" if args.model == "resnet50" else f"ResNet-18-shaped BN net, width {args.width}"


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return softmax_entropy(logits, dim=1).mean()


def make_variant(name: str, batch: int, args) -> callable:
    """A zero-argument callable running one step of variant ``name`` (set-up done here, not timed)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    names = filters.select(model, "norm_only")
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    if name in ("functional", "captured"):
        tx = optim.adam(1e-3)
        step = make_tent_step(make_apply(model), tx, capture=name == "captured")
        holder = [init_state(model, names, tx)]

        def run():
            holder[0], _ = step(holder[0], x, None)

        return run
    if name == "graph":
        method = tent_method(make_apply(model), optim.adam(1e-3))
        update = make_update(method, capture=True)
        state = method.init_state(model, names)
        update(state, x, None)
        replays = update.replays()
        if not replays:  # not on CUDA: nothing recorded
            return lambda: update(state, x, None)
        replay = replays[-1]

        def run_graph():
            replay()
            return update  # holds the recording (its input and output tensors) as long as the graph is replayed

        return run_graph
    if name in ("vmap8", "vmap8_captured", "vmap1"):
        tx = optim.adam(1e-3)
        method = tent_method(make_apply(model), tx)
        update = streams.streams_update(method, capture=name == "vmap8_captured")
        k = 1 if name == "vmap1" else 8
        holder = [streams.replicate(method.init_state(model, names), k)]
        xs = torch.randn(k, batch, 3, args.image_size, args.image_size, device=device)

        def run():
            holder[0], _ = update(holder[0], xs)

        return run
    models = [model] if name != "classic_loop8" else [build_model(args).to(device) for _ in range(8)]
    xs = [x] if name != "classic_loop8" else [torch.randn_like(x) for _ in range(8)]
    optimizers = []
    for m in models:
        m.train()
        for pname, p in m.named_parameters():
            p.requires_grad_(pname in names)
        optimizers.append(torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3))

    def run():
        for m, opt, inputs in zip(models, optimizers, xs):
            loss = _loss(m(inputs))
            if name == "bare":
                torch.autograd.backward(loss)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def time_variants(names: list[str], batch: int, args) -> dict[str, float]:
    """Best-of-rounds seconds per step of each variant (noise only adds time), in interleaved rounds."""
    runs = {name: make_variant(name, batch, args) for name in names}
    for run in runs.values():  # warm-up
        run()
        run()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in runs.items():
            sync(args.device)
            start = time.perf_counter()
            run()
            sync(args.device)
            samples[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in samples.items()}


def peak_memory(name: str, batch: int, args) -> int:
    """Peak bytes one step of a variant allocates above what was allocated before it (after a warm-up step; a
    captured variant's first step, which captures, is the one measured)."""
    run = make_variant(name, batch, args)
    if "captured" not in name:
        run()
    return peak_bytes(run, args.device)


NOT_LAUNCHES = {"detach", "view", "_unsafe_view", "expand", "t", "empty", "empty_like", "empty_strided",
                "as_strided", "unsqueeze", "squeeze", "alias", "reshape", "permute", "transpose", "select",
                "slice", "split", "unbind", "lift_fresh", "_record_function_enter_new", "_record_function_exit"}


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(name: str, batch: int, args) -> int:
    """Operators one step of a variant dispatches, views, allocations and detaches aside (after two warm-ups)."""
    run = make_variant(name, batch, args)
    run()
    run()
    with _OpCount() as counter:
        run()
    return sum(n for op, n in counter.ops.items() if op not in NOT_LAUNCHES)


def batch_row(batch: int, args) -> dict:
    """Time, memory and dispatched operators of the single-model variants at one batch size."""
    t = time_variants(["bare", "classic", "functional", "captured", "graph"], batch, args)
    mem = {name: peak_memory(name, batch, args) for name in ("classic", "functional", "captured", "bare")}
    ops = {name: dispatched_ops(name, batch, args) for name in ("bare", "classic", "functional", "captured")}
    row = {"batch": batch, "seconds": t, "peak_bytes": mem, "ops": ops}
    for name in ("functional", "captured", "classic", "graph"):
        row[f"{name}_over_bare"] = t[name] / t["bare"]
    for name in ("functional", "captured", "graph"):
        row[f"{name}_over_classic"] = t[name] / t["classic"]
    for name in ("functional", "captured"):
        row[f"{name}_over_classic_memory"] = mem[name] / max(mem["classic"], 1)
    print(
        f"{batch:>5} {1e3 * t['bare']:>8.2f} {1e3 * t['classic']:>8.2f} {1e3 * t['functional']:>8.2f} "
        f"{1e3 * t['captured']:>8.2f} {1e3 * t['graph']:>8.2f} {row['functional_over_bare']:>9.3f} "
        f"{row['captured_over_bare']:>9.3f} "
        f"{row['classic_over_bare']:>9.3f} {row['functional_over_classic']:>9.3f} {row['captured_over_classic']:>9.3f}"
        f" {row['functional_over_classic_memory']:>8.3f} {row['captured_over_classic_memory']:>8.3f} "
        f"{ops['bare']:>5} {ops['classic']:>5} {ops['functional']:>5} {ops['captured']:>5}"
    )
    return row


def streams_row(batch: int, args) -> dict:
    """K=8 streams at one batch size: a loop of 8 classic models against one vmapped update (eager, captured)."""
    t = time_variants(["classic_loop8", "vmap8", "vmap8_captured"], batch, args)
    mem = {name: peak_memory(name, batch, args) for name in ("classic_loop8", "vmap8", "vmap1")}
    row = {
        "batch": batch,
        "seconds": t,
        "peak_bytes": mem,
        "vmap_speedup": t["classic_loop8"] / t["vmap8"],
        "captured_vmap_speedup": t["classic_loop8"] / t["vmap8_captured"],
        "vmap_over_loop_memory": mem["vmap8"] / max(mem["classic_loop8"], 1),
        "vmap8_over_8x_one_memory": mem["vmap8"] / max(8 * mem["vmap1"], 1),
    }
    print(
        f"K=8 streams at batch {batch}: loop of 8 classic models {1e3 * t['classic_loop8']:.1f} ms, vmapped "
        f"{1e3 * t['vmap8']:.1f} ms (speed-up {row['vmap_speedup']:.2f}x), captured {1e3 * t['vmap8_captured']:.1f}"
        f" ms ({row['captured_vmap_speedup']:.2f}x); peak memory vmap/loop {row['vmap_over_loop_memory']:.2f}x, "
        f"8 streams over 8 x one stream {row['vmap8_over_8x_one_memory']:.2f}x"
    )
    return row


def targets(rows: list[dict], streams: list[dict]) -> list[dict]:
    """The GPU targets (docs/gpu.md), each with its measured ratio and whether it is met."""
    found = []

    def check(name: str, value: float, bound: float, larger: bool = False) -> None:
        met = value >= bound if larger else value <= bound
        found.append({"target": name, "value": value, "bound": bound, "met": met})

    for r in rows:
        b = r["batch"]
        if b in (1, 8):
            check(f"captured / classic, batch {b}", r["captured_over_classic"], 0.5)
            found[-1]["floor"] = r["graph_over_classic"]  # the GPU's own time: no captured step goes below it
        if b >= 64:
            check(f"functional / bare, batch {b}", r["functional_over_bare"], 1.05)
            check(f"captured / bare, batch {b}", r["captured_over_bare"], 1.05)
        check(f"functional / classic, batch {b}", r["functional_over_classic"], 1.10)
        check(f"functional / classic memory, batch {b}", r["functional_over_classic_memory"], 1.05)
        check(f"captured / classic memory, batch {b}", r["captured_over_classic_memory"], 1.05)
    for r in streams:
        check(f"8 streams / 8 x one stream memory, batch {r['batch']}", r["vmap8_over_8x_one_memory"], 1.5)
        if r["batch"] == 1:
            best = max(r["vmap_speedup"], r["captured_vmap_speedup"])
            check("8 vmapped streams over the loop, batch 1", best, 3.0, larger=True)
    for t in found:
        floor = f"; the graph alone {t['floor']:.3f}" if "floor" in t else ""
        print(f"target {t['target']}: {t['value']:.3f} (bound {t['bound']}) {'met' if t['met'] else 'NOT met'}{floor}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18",
                        help="resnet18: ours, --width/--image-size; resnet50: torchvision's (use --image-size 224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--streams-batches", type=int, nargs="+", help="K=8 streams at these batches (default: "
                        "the second of --batches)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"# bench-core: {model_label(args)}, {args.image_size}px, device {args.device} "
        f"({device_name}), {args.threads} threads, torch {torch.__version__}, best of {args.rounds} rounds"
    )
    print(f"{'batch':>5} {'bare ms':>8} {'classic':>8} {'func':>8} {'captured':>8} {'graph':>8} {'func/bare':>9} "
          f"{'capt/bare':>9} "
          f"{'clas/bare':>9} {'func/clas':>9} {'capt/clas':>9} {'func mem':>8} {'capt mem':>8} "
          f"{'ops: bare':>5} {'clas':>5} {'func':>5} {'capt':>5}")
    rows = [batch_row(batch, args) for batch in args.batches]
    streams_batches = args.streams_batches or [args.batches[min(1, len(args.batches) - 1)]]
    streams = [streams_row(batch, args) for batch in streams_batches]
    found = targets(rows, streams)
    if args.json:
        figures = {"device": args.device, "device_name": device_name, "threads": args.threads,
                   "image_size": args.image_size, "width": args.width, "model": args.model, "rows": rows,
                   "streams": streams, "targets": found}
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
