"""Train a small VQ-VAE on several processes with rotvq.VectorQuantizer: a complete, runnable example.

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 100 --save ckpt.pt
    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 100 --resume ckpt.pt --check

Each rank trains on its share of every global batch (the embedded 8x8 digits of ``rotvq.lab``,
nothing is downloaded). On a machine with CUDA each rank uses its own GPU (``cuda:LOCAL_RANK``,
backend ``nccl``); without CUDA every rank runs on the CPU (backend ``gloo``): the script picks,
nothing needs editing. The quantizer keeps its own state (codebook, EMA buffers, k-means init,
dead-code replacements) identical on every rank by itself; DDP averages the gradients.

Checkpoints. A checkpoint holds the model's and the optimizer's state. To resume, load it on
*every* rank before wrapping the model in DDP (this script does): the quantizer would
broadcast its own state from rank 0 on its first training call, but the encoder, the decoder
and the optimizer's moments would not be, and ranks that hold different values drift apart
without an error. ``--check`` compares every tensor of the model and the optimizer across ranks
at the end and exits with status 1 if any differs; ``--resume-on-rank0-only`` loads the
checkpoint on rank 0 alone, after wrapping, to show that failure.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import rotvq
from rotvq.lab.datasets import load_digits


class VQVAE(nn.Module):
    """The README's model: conv encoder, channel-first VectorQuantizer, conv decoder (8x8 -> 4x4 codes)."""

    def __init__(self, dim: int = 16, codes: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, dim, 1))
        self.vq = rotvq.VectorQuantizer(dim, codes, channel_first=True)  # rotation trick, k-means init
        self.decoder = nn.Sequential(nn.ConvTranspose2d(dim, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 1, 3, padding=1))

    def forward(self, x):
        out = self.vq(self.encoder(x))  # quantized: (B, dim, 4, 4), indices: (B, 4, 4)
        return self.decoder(out.quantized), out


def start_process_group() -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` from torchrun's environment: a GPU per rank with NCCL, else the CPU with gloo."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def shard(x: torch.Tensor, step: int, global_batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """This rank's rows of global batch ``step``: the same permutation on every rank, a function of the step
    alone (so a resumed run sees the batches an uninterrupted one would)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    per_rank = global_batch // world
    return x[order[:global_batch][rank * per_rank:(rank + 1) * per_rank]]


def differing_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the model's and the optimizer's tensors that differ from rank 0's on any rank."""
    named = list(model.state_dict().items())
    for i, state in sorted(optimizer.state_dict()["state"].items()):
        named += [(f"optimizer.{i}.{k}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    differ = []
    for name, tensor in named:
        mine = tensor.detach().clone()
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        flag = torch.tensor([0.0 if torch.equal(mine, theirs) else 1.0], device=mine.device)
        dist.all_reduce(flag)
        if flag.item():
            differ.append(name)
    return differ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to run (after the resumed ones)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split evenly over the ranks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write a checkpoint (model, optimizer, step) here at the end (rank 0)")
    parser.add_argument("--resume", help="continue from this checkpoint, loaded on every rank")
    parser.add_argument("--resume-on-rank0-only", action="store_true",
                        help="the mistake: load --resume on rank 0 only, after wrapping in DDP (ranks drift)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every rank holds the same tensors")
    args = parser.parse_args(argv)

    rank, world, device = start_process_group()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    torch.manual_seed(args.seed)  # the same initial weights, and k-means draws, on every rank
    model = VQVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device)
        start = checkpoint["step"]
        if not args.resume_on_rank0_only:  # every rank: model (quantizer included) and optimizer
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.resume and args.resume_on_rank0_only and rank == 0:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    x = load_digits("train", flatten=False).x  # (1438, 1, 8, 8) in [0, 1]
    for step in range(start, start + args.steps):
        batch = shard(x, step, args.batch_size, rank, world, args.seed).to(device)
        x_hat, out = ddp(batch)
        loss = F.mse_loss(x_hat, batch) + out.loss
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        if rank == 0 and (step + 1) % 25 == 0:
            m = out.metrics()  # usage and perplexity are those of the global batch
            print(f"step {step + 1}: loss {loss.item():.4f}, usage {m['usage']:.2f}, perplexity {m['perplexity']:.1f}")

    if args.save and rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": start + args.steps},
                   args.save)
    status = 0
    if args.check:
        differ = differing_tensors(model, optimizer)
        if rank == 0:
            print("ranks identical: model, quantizer and optimizer state" if not differ
                  else f"ranks differ in {len(differ)} tensors: {', '.join(differ[:6])}")
        status = 1 if differ else 0
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
