"""Miniature copies of every official on-disk dataset format: a few real JPEG files each, and the real split
and annotation files (text and MATLAB), laid out where the official archives put them."""
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

# (train, test) images each fixture holds: what the readers must find
SIZES = {"flowers102": (6, 3), "pets": (6, 4), "dtd": (6, 3), "indoor67": (6, 3), "cub200": (6, 4),
         "aircraft": (6, 3), "cars": (6, 3)}


def jpeg(path: Path, seed: int, size=(40, 30)):
    """A real JPEG: a coloured rectangle on noise, different for every seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
    a[y:y + size[1] // 2, x:x + size[0] // 2] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, "JPEG")


def flowers102(root: Path):
    base = root / "flowers-102"
    labels = [1, 2, 3, 1, 2, 3, 1, 2, 3]  # image_00001 .. image_00009, classes 1-based
    for i in range(1, 10):
        jpeg(base / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                          "tstid": np.array([[7, 8, 9]])})
    return labels


def pets(root: Path):
    base = root / "oxford-iiit-pet"
    trainval = ["Abyssinian_1 1 1 1", "Abyssinian_2 1 1 1", "american_bulldog_1 2 2 1", "american_bulldog_2 2 2 1",
                "Bengal_1 3 1 2", "Bengal_2 3 1 2"]
    test = ["Abyssinian_3 1 1 1", "american_bulldog_3 2 2 1", "Bengal_3 3 1 2", "Bengal_4 3 1 2"]
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (base / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    for i, line in enumerate(trainval + test):
        jpeg(base / "images" / f"{line.split()[0]}.jpg", 100 + i)


def _class_files(classes, per_class, ext=".jpg"):
    return [f"{c}/{c}_{i:04d}{ext}" for c in classes for i in range(per_class)]


def dtd(root: Path):
    base = root / "dtd" / "dtd"
    classes = ["banded", "dotted", "zigzagged"]
    files = _class_files(classes, 4)
    split = {"train1": files[0::4], "val1": files[1::4], "test1": files[2::4]}  # the 4th of each class: unused
    (base / "labels").mkdir(parents=True, exist_ok=True)
    for name, lines in split.items():
        (base / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    for i, f in enumerate(files):
        jpeg(base / "images" / f, 200 + i)


def indoor67(root: Path):
    base = root / "indoor67"
    files = _class_files(["airport_inside", "kitchen", "library"], 3)
    (base).mkdir(parents=True, exist_ok=True)
    (base / "TrainImages.txt").write_text("\n".join(f for f in files if not f.endswith("2.jpg")) + "\n")
    (base / "TestImages.txt").write_text("\n".join(f for f in files if f.endswith("2.jpg")) + "\n")
    for i, f in enumerate(files):
        jpeg(base / "Images" / f, 300 + i)


def cub200(root: Path):
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    files = _class_files(classes, 5)
    base.mkdir(parents=True, exist_ok=True)
    (base / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (base / "images.txt").write_text("".join(f"{i} {f}\n" for i, f in enumerate(files, 1)))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {1 + (i - 1) // 5}\n" for i in range(1, 11)))
    is_train = [1, 1, 1, 0, 0, 1, 1, 1, 0, 0]
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, t in enumerate(is_train, 1)))
    for i, f in enumerate(files):
        jpeg(base / "images" / f, 400 + i)


def aircraft(root: Path):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = [f"{1000000 + i}" for i in range(9)]
    rows = [f"{ids[i]} {variants[i % 3]}" for i in range(9)]
    (data / "images_variant_trainval.txt").write_text("\n".join(rows[:6]) + "\n")
    (data / "images_variant_test.txt").write_text("\n".join(rows[6:]) + "\n")
    for i, name in enumerate(ids):
        jpeg(data / "images" / f"{name}.jpg", 500 + i)


def cars(root: Path):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None]})

    def annos(n, first_class_offset):
        rec = np.zeros((1, n), dtype=[("fname", "O"), ("class", "O")])
        for i in range(n):
            rec[0, i] = (f"{i + 1:05d}.jpg", np.array([[1 + (i + first_class_offset) % 3]], dtype=np.uint8))
        return rec

    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos(6, 0)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos(3, 0)})
    for i in range(6):
        jpeg(base / "cars_train" / f"{i + 1:05d}.jpg", 600 + i)
    for i in range(3):
        jpeg(base / "cars_test" / f"{i + 1:05d}.jpg", 700 + i)


def imagenet(root: Path, classes=3, per_class=12):
    wnids = [f"n{1440764 + i:08d}" for i in range(classes)]
    for c, w in enumerate(wnids):
        for i in range(per_class):
            jpeg(root / "imagenet" / "train" / w / f"{w}_{i}.JPEG", 800 + c * 100 + i)
        for i in range(2):
            jpeg(root / "imagenet" / "val" / w / f"ILSVRC2012_val_{c}{i}.JPEG", 900 + c * 10 + i)
    return wnids


def folder(path: Path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                jpeg(path / split / c / f"{c}{i}.jpg", 1000 + 10 * n + i + (c == "dog") * 5)


ALL = [flowers102, pets, dtd, indoor67, cub200, aircraft, cars]


def make_all(root: Path):
    for make in ALL:
        make(root)
    imagenet(root)
    folder(root / "mine")
