"""Train an ImageNet-topology ResNet-18 or ResNet-50 briefly on MNIST digits, for bench_compress.

bench_compress's built-in ImageNet ResNets have random weights, and how much of PFP's max-times work the
screens rule out depends on the filters and the data (on ResNet-18, with these trained filters and digits the
scoring took about 6× as long as with random weights and inputs). This script trains the same topologies (the 7×7/2 stem and max pool, 2/2/2/2 basic or 3/4/6/3 bottleneck blocks of
64–512 channels, 1×1 projection shortcuts, 3-channel input, here 10 classes) on the 4,000 training digits of
fixtures/train_mnist.py's split, upscaled bilinearly and repeated over the three channels, so that compress can
also be timed on trained filters. Most steps run at --train-image pixels (cheap), the last --final-steps at
--image, the resolution of the calibration data written. It needs torch, mlxtend and scikit-learn (a
benchmark-only venv; pfp-onnx never imports them) and writes

    <out>/<arch>.onnx          opset 17, BatchNormalization kept, input "input" [N, 3, image, image]
    <out>/<arch>_calib.npz     input [points, 3, image, image] float32 and labels: held-out digits

    python benchmarks/train_resnet.py --arch resnet18 --out /tmp/trained
    python benchmarks/bench_compress.py --onnx /tmp/trained/resnet18.onnx --npz /tmp/trained/resnet18_calib.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from train_mnist import export_onnx, load_data, set_determinism  # noqa: E402  (the fixtures' split and export)

ARCHS = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}
WIDTHS = (64, 128, 256, 512)


def conv_bn(channels_in: int, channels_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(channels_out)]


class Block(nn.Module):
    """Basic (two 3×3) or bottleneck (1×1, 3×3 with the stride, 1×1 to 4× the width) residual block."""

    def __init__(self, channels_in: int, width: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        out = 4 * width if bottleneck else width
        if bottleneck:
            layers = [*conv_bn(channels_in, width, 1, 1), nn.ReLU(), *conv_bn(width, width, 3, stride), nn.ReLU(),
                      *conv_bn(width, out, 1, 1)]
        else:
            layers = [*conv_bn(channels_in, width, 3, stride), nn.ReLU(), *conv_bn(width, width, 3, 1)]
        self.branch = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(*conv_bn(channels_in, out, 1, stride)) \
            if stride != 1 or channels_in != out else nn.Identity()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


def resnet(arch: str, classes: int = 10) -> nn.Sequential:
    blocks, bottleneck = ARCHS[arch]
    layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    channels = 64
    for stage, (width, count) in enumerate(zip(WIDTHS, blocks)):
        for index in range(count):
            block = Block(channels, width, 2 if stage > 0 and index == 0 else 1, bottleneck)
            layers.append(block)
            channels = block.out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def upscaled(digits: np.ndarray | torch.Tensor, image: int) -> torch.Tensor:
    """[N, 1, 28, 28] → [N, 3, image, image], bilinear."""
    digits = torch.as_tensor(digits)
    return F.interpolate(digits, size=(image, image), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="resnet18")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model and the calibration data")
    parser.add_argument("--steps", type=int, default=250, help="SGD steps in all")
    parser.add_argument("--final-steps", type=int, default=100, help="of them, the last ones at --image pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-image", type=int, default=112, help="pixels of the cheap training steps")
    parser.add_argument("--image", type=int, default=224, help="pixels of the last steps and of the data written")
    parser.add_argument("--points", type=int, default=512, help="held-out digits written (at most 1,000)")
    args = parser.parse_args()

    set_determinism()
    x_train, y_train, x_held, y_held, _, _ = load_data()
    model = resnet(args.arch)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=0.05, total_steps=args.steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        chosen = torch.randint(0, len(x_train), (args.batch,), generator=generator)
        image = args.image if step >= args.steps - args.final_steps else args.train_image
        loss = F.cross_entropy(model(upscaled(x_train[chosen], image)), torch.as_tensor(y_train[chosen]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  {image}px  loss {loss.item():.3f}  {time.perf_counter() - started:6.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = args.out / f"{args.arch}.onnx", args.out / f"{args.arch}_calib.npz"
    export_onnx(model, onnx_path, sample=torch.zeros(1, 3, args.image, args.image),
                producer=f"pfp-onnx benchmarks/train_resnet.py --arch {args.arch}")
    held = upscaled(x_held[:args.points], args.image).numpy()
    np.savez(data_path, input=held, labels=y_held[:args.points])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    predicted = np.concatenate([session.run(None, {"input": held[start:start + 32]})[0].argmax(axis=1)
                                for start in range(0, len(held), 32)])
    print(f"wrote {onnx_path} and {data_path}: onnxruntime accuracy on the {len(held)} held-out digits at "
          f"{args.image}px: {np.mean(predicted == y_held[:args.points]):.1%}")


if __name__ == "__main__":
    main()
