#!/usr/bin/env python3
"""Train switchyard's LeNet-5 style Fashion-MNIST classifier and export it to ONNX.

Reproducible on CPU: fixed seed, deterministic algorithms, a fixed thread count, no data loader
workers. The recipe, the numbers it reached and the time it took are in models/README.md.

    python models/train.py --data ../shared/data/fashion-mnist --out models

writes lenet.onnx (dynamic batch, opset 13, normalisation baked in: feed pixels / 255) and
golden_logits.json (PyTorch's logits for the first 16 test images, which tract must reproduce
within 1e-4: see components/classifier/tests/golden.rs).
"""

import argparse
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Mean and standard deviation of the 60,000 training images (pixels scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530
GOLDEN_COUNT = 16


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain): the format Fashion-MNIST ships in."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


class LeNet5(nn.Module):
    """LeNet-5 layout (conv-pool, conv-pool, three dense layers) with modern parts:
    batch norm, ReLU, max-pooling and dropout. Input: N x 1 x 28 x 28, pixels / 255."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN))
        self.register_buffer("std", torch.tensor(STD))
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 40, kernel_size=5, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc1 = nn.Linear(40 * 5 * 5, 60)
        self.fc2 = nn.Linear(60, 40)
        self.fc3 = nn.Linear(40, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 20 x 14 x 14
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 40 x 5 x 5
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels, whole batch at once."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    shifts = torch.randint(-2, 3, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shifts * (2.0 / 28.0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 1000):
        logits = model(x[start : start + 1000])
        correct += (logits.argmax(1) == y[start : start + 1000]).sum().item()
    return correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory with the official Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where lenet.onnx and golden_logits.json go")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--threads", type=int, default=2, help="fixed so reruns add floats in the same order")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_split(args.data, "train")
    test_x, test_y = load_split(args.data, "t10k")

    model = LeNet5()
    params = sum(p.numel() for p in model.parameters())
    print(f"LeNet5: {params} trainable parameters")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.max_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.max_lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )

    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = augment(train_x[batch], generator)
            loss = F.cross_entropy(model(x), train_y[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        accuracy = evaluate(model, test_x, test_y)
        elapsed = time.monotonic() - started
        print(f"epoch {epoch:2d}  loss {total_loss / len(train_x):.4f}  test {accuracy:.4f}  {elapsed:6.0f} s", flush=True)

    model.eval()
    accuracy = evaluate(model, test_x, test_y)
    print(f"final PyTorch test accuracy {accuracy:.4f} after {time.monotonic() - started:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "lenet.onnx"
    torch.onnx.export(
        model,
        (test_x[:1],),
        str(onnx_path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=13,
        do_constant_folding=True,
        dynamo=False,
    )
    with torch.no_grad():
        golden = model(test_x[:GOLDEN_COUNT])
    golden_path = args.out / "golden_logits.json"
    golden_path.write_text(
        json.dumps(
            {
                "about": f"PyTorch logits of the first {GOLDEN_COUNT} Fashion-MNIST test images (t10k order)",
                "labels": test_y[:GOLDEN_COUNT].tolist(),
                "logits": [[round(v, 7) for v in row] for row in golden.tolist()],
                "pytorch_test_accuracy": accuracy,
                "parameters": params,
                "seed": args.seed,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {golden_path}")


if __name__ == "__main__":
    main()
