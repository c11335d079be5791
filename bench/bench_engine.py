"""Training-engine benchmark: nero-deap's engine vs a minimal plain-PyTorch loop.

    python bench/bench_engine.py [--data ../shared/datasets/cifar10-jpeg.zip] [--epochs 2]
                                 [--train-subset N] [--test-n N] [--device auto] [--accelerate auto]

Both train the same fixed reference architecture (written as a phenotype of
our grammar) with the same optimiser, schedule shape and augmentation, then
report images/s, s/epoch and test accuracy.  The baseline is what most
people write: a DataLoader over the images, augmentation with torchvision
on the CPU, float32, no channels_last.  A benchmark, not a test.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nero_deap.attacks import accuracy_clean_fgsm  # noqa: E402
from nero_deap.cli import add_accelerate_option  # noqa: E402
from nero_deap.config import ACCELERATE  # noqa: E402
from nero_deap.data import load_raw, make_splits  # noqa: E402
from nero_deap.evaluate import read_phenotype  # noqa: E402
from nero_deap.network import build_network  # noqa: E402
from nero_deap.parallel import claim_device  # noqa: E402
from nero_deap.phenotype import Phenotype  # noqa: E402
from nero_deap.train import TrainSettings, make_optimizer, train, warmup_then_decay  # noqa: E402

REFERENCE = read_phenotype(str(Path(__file__).resolve().parent.parent / "grammars" / "reference" /
                                "engine-reference.txt")).to_text()


def plain_pytorch(model, learning, x_u8, y, epochs, device):
    """The baseline: DataLoader + torchvision CPU augmentation + float32."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    class Images(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return augment(x_u8[i]).float() / 255.0, y[i]

    loader = DataLoader(Images(), batch_size=int(learning["batch_size"]), shuffle=True, num_workers=2,
                        drop_last=False, persistent_workers=True)
    optimizer = make_optimizer(model.parameters(), learning)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total, 0.1))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/datasets/cifar10-jpeg.zip")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--test-n", type=int, default=0, help="score on a stratified test subset (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-baseline", action="store_true")
    add_accelerate_option(p, default="auto")
    args = p.parse_args()
    device = claim_device(args.device)
    splits = make_splits(load_raw(args.data), train_subset=args.train_subset or None,
                         test_subset=args.test_n or None)
    phenotype = Phenotype.from_text(REFERENCE)
    n = len(splits.train_y)
    print(f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
          f"train images={n}, epochs={args.epochs}, accelerate={args.accelerate}, torch {torch.__version__}")
    results = {}
    for name in ("nero-deap", "plain-pytorch"):
        if name == "plain-pytorch" and args.skip_baseline:
            continue
        torch.manual_seed(0)
        model = build_network(phenotype, 10, splits.image_shape, splits.mean, splits.std).to(device)
        if name == "nero-deap":
            on_device = splits.to(device)
            start = time.perf_counter()
            train(model, phenotype.learning, on_device.train_x, on_device.train_y, TrainSettings(epochs=args.epochs, accelerate=ACCELERATE[args.accelerate]))
            seconds = time.perf_counter() - start
        else:
            start = time.perf_counter()
            plain_pytorch(model, phenotype.learning, splits.train_x, splits.train_y, args.epochs, device)
            seconds = time.perf_counter() - start
        test = splits.to(device)
        clean, fgsm = accuracy_clean_fgsm(model.float(), test.test_x, test.test_y)
        results[name] = seconds
        print(f"{name:>14}: {n * args.epochs / seconds:9.0f} images/s  {seconds / args.epochs:8.2f} s/epoch  "
              f"test clean {clean:.4f}  FGSM {fgsm:.4f}  ({model.params:,} params)")
    if len(results) == 2:
        print(f"speed-up of nero-deap over plain PyTorch: {results['plain-pytorch'] / results['nero-deap']:.2f}x")


if __name__ == "__main__":
    main()
