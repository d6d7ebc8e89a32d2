"""Rebuild calib/cifar10_demo from a CIFAR-10 training split laid out as an image folder.

    python calib/make_cifar10_demo.py SRC [--train-links DIR]

Picks, per class and with a fixed seed, 50 calibration and 100 evaluation images, copies the
files byte for byte into calib/cifar10_demo/{calib,eval}/<class>/, and writes the list of
picked source files. With --train-links it also makes DIR/<class>/ holding symbolic links to
every *other* image, the training set of the demo checkpoint, so that the evaluation images
are held out from training.
"""
import argparse
import random
import shutil
from pathlib import Path

CALIB_PER_CLASS, EVAL_PER_CLASS, SEED = 50, 100, 20241121


# A function, not top-level code: the wheel installs this script as a module of
# edgestar._demo_data (provenance travels with the data), and importing it must not run it.
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--train-links", type=Path)
    args = ap.parse_args()

    dest = Path(__file__).resolve().parent / "cifar10_demo"
    if dest.exists():
        shutil.rmtree(dest / "calib", ignore_errors=True)
        shutil.rmtree(dest / "eval", ignore_errors=True)
    rng = random.Random(SEED)
    listing = []
    for class_dir in sorted(d for d in args.src.iterdir() if d.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        picked = rng.sample(files, CALIB_PER_CLASS + EVAL_PER_CLASS)
        splits = {"calib": picked[:CALIB_PER_CLASS], "eval": picked[CALIB_PER_CLASS:]}
        for split, chosen in splits.items():
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(chosen):
                shutil.copyfile(f, out / f.name)
                listing.append(f"{split} {class_dir.name}/{f.name}")
        if args.train_links:
            link_dir = args.train_links / class_dir.name
            link_dir.mkdir(parents=True, exist_ok=True)
            held_out = set(picked)
            for f in files:
                if f not in held_out:
                    (link_dir / f.name).symlink_to(f.resolve())
    (dest / "FILES.txt").write_text("\n".join(listing) + "\n")
    print(f"wrote {len(listing)} images to {dest}")


if __name__ == "__main__":
    main()
