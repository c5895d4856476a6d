"""Benchmark of the functional core: a Tent step against classic stateful Tent and bare forward+backward.

For a BatchNorm ResNet at batch 1, 8 and 64 it times, interleaved round by round so that machine noise hits
every variant alike:
  - functional: ``make_tent_step`` (functional_call + torch.autograd.grad, foreach Adam, metrics);
  - classic: model.train(), only BN affine params trainable, torch.optim.Adam, loss.backward(), step();
  - bare: the same forward, loss and backward, nothing else;
and K=8 streams: one vmapped functional update over 8 stacked states (``streams_update``) against a loop of 8
classic models.
Peak memory is what one step allocates above what was allocated before it (torch's profiler on CPU, the CUDA
allocator's statistics on GPU). Ratios are to bare (time) and to classic (memory).

    python tools/bench_core.py [--device cuda] [--rounds 10] [--image-size 96] [--model resnet50 --image-size 224]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from torch import nn

from yolozu.demo.bench.memory import peak_bytes, sync
from yolozu.functional import filters, optim, streams
from yolozu.functional.losses import softmax_entropy
from yolozu.bridge import make_apply
from yolozu.functional.step import init_state
from yolozu.functional.tent import make_tent_step, tent_method


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
    if name == "functional":
        tx = optim.adam(1e-3)
        step = make_tent_step(make_apply(model), tx)
        holder = [init_state(model, names, tx)]

        def run():
            holder[0], _ = step(holder[0], x, None)

        return run
    if name == "vmap8":
        tx = optim.adam(1e-3)
        method = tent_method(make_apply(model), tx)
        update = streams.streams_update(method)
        holder = [streams.replicate(method.init_state(model, names), 8)]
        xs = torch.randn(8, batch, 3, args.image_size, args.image_size, device=device)

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
    """Peak bytes one step of a variant allocates above what was allocated before it (after a warm-up step)."""
    run = make_variant(name, batch, args)
    run()
    return peak_bytes(run, args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18",
                        help="resnet18: ours, --width/--image-size; resnet50: torchvision's (use --image-size 224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
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
    results = []
    header = (
        f"{'batch':>5} {'bare ms':>9} {'classic ms':>10} {'functional ms':>13} {'func/bare':>9} "
        f"{'classic/bare':>12} {'func/classic mem':>16}"
    )
    print(header)
    for batch in args.batches:
        t = time_variants(["bare", "classic", "functional"], batch, args)
        mem = {name: peak_memory(name, batch, args) for name in ("classic", "functional", "bare")}
        row = {
            "batch": batch,
            "seconds": t,
            "peak_bytes": mem,
            "functional_over_bare": t["functional"] / t["bare"],
            "classic_over_bare": t["classic"] / t["bare"],
            "functional_over_classic_memory": mem["functional"] / max(mem["classic"], 1),
        }
        results.append(row)
        print(
            f"{batch:>5} {1e3 * t['bare']:>9.2f} {1e3 * t['classic']:>10.2f} {1e3 * t['functional']:>13.2f} "
            f"{row['functional_over_bare']:>9.3f} {row['classic_over_bare']:>12.3f} "
            f"{row['functional_over_classic_memory']:>16.3f}"
        )
    streams_batch = args.batches[min(1, len(args.batches) - 1)]
    t = time_variants(["classic_loop8", "vmap8"], streams_batch, args)
    mem = {name: peak_memory(name, streams_batch, args) for name in ("classic_loop8", "vmap8")}
    streams_row = {
        "batch": streams_batch,
        "seconds": t,
        "peak_bytes": mem,
        "vmap_speedup": t["classic_loop8"] / t["vmap8"],
        "vmap_over_loop_memory": mem["vmap8"] / max(mem["classic_loop8"], 1),
    }
    print(
        f"K=8 streams at batch {streams_batch}: loop of 8 classic models {1e3 * t['classic_loop8']:.1f} ms, "
        f"vmapped functional step {1e3 * t['vmap8']:.1f} ms, speed-up {streams_row['vmap_speedup']:.2f}x, "
        f"peak memory vmap/loop {streams_row['vmap_over_loop_memory']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": args.device,
                    "device_name": device_name,
                    "threads": args.threads,
                    "image_size": args.image_size,
                    "width": args.width,
                    "model": args.model,
                    "rows": results,
                    "streams": streams_row,
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
