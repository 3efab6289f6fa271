"""data/: IDX parsing, Fashion-MNIST, ImageFolder (errors, bad-image policy), samplers,
transforms, loaders, and scripts/prepare_imagenet_val.py. Tiny fake datasets in tmp_path."""
import gzip
import hashlib
import http.server
import importlib.util
import json
import os
import struct
import threading
import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, write_idx_dataset
from PIL import Image
from torchvision import transforms as T

from data import build_eval_loader, build_loaders, eval_transform, repeated_aug_copies, set_epoch
from data import datasets
from data.datasets import (
    FASHION_MNIST_DEBIAN_DIR, ImageFolderDataset, base_dataset, create_dataset, load_fashion_mnist, read_idx,
)
from data.samplers import RepeatAugSampler, ShardedEvalSampler
from data.transforms import train_transform
from engine.config import DataConfig
from engine.errors import UserError

# Settings that keep the loaders cheap and deterministic unless a test says otherwise.
PLAIN = dict(workers=0, batch_size=8, train_transform="none", mixup=0.0, cutmix=0.0, repeated_aug=1, crop_pct=1.0)


def write_idx(path, array, type_byte):
    header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def write_images(folder, names, size=(12, 10)):
    """Small random images; the format follows each name's extension."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, name))


def image_tree(root, layout):
    """layout: {split: {class: number of images}}; images alternate PNG and JPEG."""
    for split, classes in layout.items():
        for cls, n in classes.items():
            write_images(os.path.join(root, split, cls), [f"{cls}_{i}.{'png' if i % 2 else 'jpg'}" for i in range(n)])
    return str(root)


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST

@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    values = np.array([-3, 0, 70000, 2 ** 30], dtype=np.int32)
    write_idx(str(tmp_path / f"a{suffix}"), images, 0x08)
    write_idx(str(tmp_path / f"b{suffix}"), values, 0x0C)
    got = read_idx(str(tmp_path / f"a{suffix}"))
    assert got.dtype == np.uint8 and got.shape == (5, 3, 4) and np.array_equal(got, images)
    assert np.array_equal(read_idx(str(tmp_path / f"b{suffix}")), values)


def test_corrupt_idx_names_the_file(tmp_path):
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    truncated = str(tmp_path / "short.gz")
    write_idx(truncated, np.zeros((4, 2, 2), np.uint8), 0x08)
    with gzip.open(truncated, "rb") as f:
        data = f.read()
    with gzip.open(truncated, "wb") as f:
        f.write(data[:-3])
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"this is not gzip")
    for path, words in ((bad_magic, "magic"), (truncated, "corrupt"), (not_gzip, "cannot read")):
        with pytest.raises(UserError, match=words) as e:
            read_idx(str(path))
        assert str(path) in str(e.value)


def test_fake_fashion_mnist_splits_and_items(tmp_path):
    root = write_idx_dataset(str(tmp_path), n_train=50, n_test=20)
    train = load_fashion_mnist(root, "train")
    assert len(train) == 50
    assert len(load_fashion_mnist(root, "val")) == len(load_fashion_mnist(root, "test")) == 20
    img, label = train[3]
    assert img.mode == "L" and img.size == (28, 28) and isinstance(label, int)
    assert np.array_equal(np.asarray(img), train.images[3].numpy()) and label == int(train.labels[3])
    # torchvision's download layout <root>/FashionMNIST/raw, uncompressed files
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(root):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(root, name), "rb") as f:
                (raw / name[:-3]).write_bytes(f.read())
    assert torch.equal(load_fashion_mnist(str(tmp_path / "tv"), "train").images, train.images)
    with pytest.raises(UserError, match="no split 'dev'"):
        load_fashion_mnist(root, "dev")


def test_missing_fashion_mnist_says_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        build_loaders(DataConfig(root=str(tmp_path / "nowhere"), **PLAIN), 28, 0, 1, 0)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and os.path.join("FashionMNIST", "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError) as e:
        load_fashion_mnist("", "train")
    cache = str(tmp_path / "cache" / "multimax-vit" / "fashion-mnist")
    assert str(tmp_path / "no-debian") in str(e.value) and f"data.download=true to fetch it (into {cache})" in str(e.value)


def test_fashion_mnist_cache_dir_follows_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in (None, "", "relative/cache"):  # unset, empty and relative values are ignored (XDG spec)
        if xdg is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert datasets.fashion_mnist_cache_dir() == str(tmp_path / "home" / ".cache" / "multimax-vit" / "fashion-mnist")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.fashion_mnist_cache_dir() == str(tmp_path / "xdg" / "multimax-vit" / "fashion-mnist")


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Fashion-MNIST's download without the network: torchvision's FashionMNIST fetches the fake
    IDX files over HTTP from a server on 127.0.0.1 (its real code path: mirrors, MD5 check,
    extraction). No Debian directory; the user cache is in tmp_path. Yields the server's request log."""
    src = write_idx_dataset(str(tmp_path / "served"))
    resources = []
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with open(os.path.join(src, name), "rb") as f:
            resources.append((name, hashlib.md5(f.read()).hexdigest()))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=src, **kwargs)

        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield requests
    server.shutdown()
    thread.join()


def test_download_without_root_fetches_into_the_user_cache(fake_download, tmp_path):
    cfg = DataConfig(root="", download=True, **PLAIN)
    loaders = build_loaders(cfg, 28, 0, 1, 0)
    assert len(loaders.train.dataset) == 96 and len(loaders.val.dataset) == 37
    raw = tmp_path / "cache" / "multimax-vit" / "fashion-mnist" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte.gz").is_file() and (raw / "t10k-labels-idx1-ubyte").is_file()
    fetched = len(fake_download)
    assert fetched >= 4
    again = build_loaders(DataConfig(root="", download=False, **PLAIN), 28, 0, 1, 0)  # found in the cache
    assert torch.equal(base_dataset(again.train.dataset).images, base_dataset(loaders.train.dataset).images)
    assert len(fake_download) == fetched


def test_the_quickstart_commands_run_on_a_machine_without_debians_package(fake_download, tmp_path):
    """`make demo`'s two commands (train.py on the quickstart config, eval.py on its checkpoint), on
    a machine without /usr/share/datasets/fashion-mnist: the data comes from the (fake) download."""
    import eval as eval_script
    import train as train_script

    out = str(tmp_path / "quickstart")
    args = ["--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "train.resume=none", "train.epochs=1",
            "train.max_steps_per_epoch=2", "data.batch_size=16", "data.workers=0", "model.kwargs.depth=1",
            f"train.output_dir={out}"]
    assert train_script.main(args) == 0
    assert fake_download and os.path.isdir(tmp_path / "cache" / "multimax-vit" / "fashion-mnist")
    result = str(tmp_path / "eval.json")
    assert eval_script.main(["--checkpoint", os.path.join(out, "last.pth"), "--output", result]) == 0
    with open(result) as f:
        assert json.load(f)["num_images"] == 37  # the fake test split, read back from the cache


def test_failed_download_is_one_line(fake_download, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens
    with pytest.raises(UserError) as e:
        load_fashion_mnist(str(tmp_path / "dl"), "train", download=True)
    assert "downloading Fashion-MNIST into" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- ImageFolder

def test_imagefolder_loads_with_shared_classes(tmp_path):
    root = image_tree(tmp_path, {"train": {"b": 3, "a": 2}, "val": {"a": 1, "b": 2}})
    loaders = build_loaders(DataConfig(dataset="imagefolder", root=root, **PLAIN), 8, 0, 1, 0)
    assert loaders.info.num_classes == 2 and loaders.info.in_chans == 3
    labels = [int(y) for _, y in loaders.val.dataset]
    assert labels == [0, 1, 1]  # sorted classes: a=0, b=1
    x, _ = loaders.val.dataset[0]
    assert x.shape == (3, 8, 8)


def test_imagefolder_is_torchvisions_without_hidden_files(tmp_path):
    root = image_tree(tmp_path, {"train": {"b": 3, "a": 2, ".ipynb_checkpoints": 1}})
    with open(os.path.join(root, "train", "a", "._a_0.png"), "wb") as f:  # a macOS resource fork
        f.write(b"\x00\x05\x16\x07")
    ds = ImageFolderDataset(os.path.join(root, "train"), bad_images="error")
    assert isinstance(ds, torchvision.datasets.ImageFolder) and ds.classes == ["a", "b"]
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a_0.jpg", "a_1.png", "b_0.jpg", "b_1.png", "b_2.jpg"]
    assert ds.targets == [0, 0, 1, 1, 1] and ds.skipped() == []


def test_imagefolder_user_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "none" / "train")):
        create_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "none")), "train", True)
    root = image_tree(tmp_path / "e", {"train": {"a": 2, "b": 1}})
    os.makedirs(os.path.join(root, "train", "empty_cls"))
    with pytest.raises(UserError, match="empty class folder .*empty_cls"):
        ImageFolderDataset(os.path.join(root, "train"))
    root = image_tree(tmp_path / "m", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}})
    with pytest.raises(UserError, match=r"only in train \['b'\], only in val \['c'\]"):
        build_loaders(DataConfig(dataset="imagefolder", root=root, **PLAIN), 8, 0, 1, 0)
    flat = tmp_path / "flat" / "val"
    write_images(str(flat), ["ILSVRC2012_val_00000001.JPEG"])
    with pytest.raises(UserError, match="prepare_imagenet_val.py"):
        ImageFolderDataset(str(flat))


def _with_bad_files(tmp_path):
    root = image_tree(tmp_path, {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    bad = os.path.join(root, "train", "a", "a_1x.png")  # sorts between a_1.png and a_2.jpg
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root, bad


def test_corrupt_image_error_policy_names_the_file(tmp_path):
    root, bad = _with_bad_files(tmp_path)
    ds = ImageFolderDataset(os.path.join(root, "train"), bad_images="error")
    with pytest.raises(UserError, match="cannot read image " + bad):
        ds[ds.samples.index((bad, 0))]
    loaders = build_loaders(DataConfig(dataset="imagefolder", root=root, bad_images="error",
                                          **{**PLAIN, "batch_size": 2}), 8, 0, 1, 0)
    with pytest.raises(UserError, match=bad):
        for _ in loaders.train:
            pass
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="notes.txt is not an image file"):
        ImageFolderDataset(os.path.join(root, "train"), bad_images="error")


def test_corrupt_image_skip_policy_counts_and_replaces(tmp_path):
    root, bad = _with_bad_files(tmp_path)
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="left out 1 non-image"):
        ds = ImageFolderDataset(os.path.join(root, "train"), bad_images="skip")
    i = ds.samples.index((bad, 0))
    with pytest.warns(UserWarning, match="skipping unreadable image " + bad):
        img, label = ds[i]
    assert img.size == (12, 10) and label == 0
    assert np.array_equal(np.asarray(img), np.asarray(ds[i + 1][0]))  # replaced by the next sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: skipped without a new warning
        assert len([ds[j] for j in range(len(ds))]) == len(ds) == 6
    assert sorted(ds.skipped()) == sorted([bad, str(tmp_path / "train" / "b" / "notes.txt")])
    assert "2 file(s) skipped" in ds.report_skipped() and ds.report_skipped() is None


def test_skip_policy_reported_by_set_epoch(tmp_path):
    root, bad = _with_bad_files(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=root, bad_images="skip", **{**PLAIN, "batch_size": 2})
    loaders = build_loaders(cfg, 8, 0, 1, 0)
    with pytest.warns(UserWarning):
        n = sum(len(y) for _, y in loaders.train)
    assert n == 6  # batches keep their size: the bad file is replaced, not dropped
    with pytest.warns(UserWarning, match=r"1 file\(s\) skipped so far .*a_1x.png"):
        set_epoch(loaders, 1)


# ----------------------------------------------------------------------------- samplers

def test_repeat_aug_sampler_deterministic_per_seed_and_epoch():
    data = range(40)

    def order(seed, epoch, rank=0, world=1):
        s = RepeatAugSampler(data, world, rank, num_repeats=3, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0) and order(5, 2, 1, 2) == order(5, 2, 1, 2)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    one = order(0, 3)
    assert len(one) == 40  # world 1: epoch length is the dataset size
    assert all(one[3 * k] == one[3 * k + 1] == one[3 * k + 2] for k in range(13))  # copies in a row
    assert len(set(one)) == 14  # 13 full triples + the start of the 14th


@pytest.mark.parametrize("world,repeats", [(2, 3), (3, 3), (4, 2)])
def test_repeat_aug_sampler_spreads_copies_over_ranks(world, repeats):
    n, seed, epoch = 48, 7, 4
    per_rank = []
    for rank in range(world):
        s = RepeatAugSampler(range(n), world, rank, num_repeats=repeats, seed=seed)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(s) == len(per_rank[-1]) == n // world
    dealt = [per_rank[p % world][p // world] for p in range(n)]  # deal the ranks' lists back together
    assert all(dealt[k] == dealt[k - k % repeats] for k in range(n))  # each image `repeats` times in a row
    assert len(set(dealt)) == n // repeats
    for img in set(dealt):
        ranks = [r for r in range(world) if img in per_rank[r]]
        assert len(ranks) == min(repeats, world)
    assert sorted(set().union(*map(set, per_rank))) == sorted(set(dealt))  # union over ranks covers the epoch


def test_one_process_never_gets_repeated_augmentation(fake_fmnist):
    """As in DeiT: a single process samples each image once per epoch (a plain shuffle), and says why."""
    cfg = DataConfig(root=fake_fmnist, **{**PLAIN, "repeated_aug": 3})
    with pytest.warns(UserWarning, match=r"data.repeated_aug=3: repeated augmentation is off on a single process"):
        loaders = build_loaders(cfg, 28, 0, 1, seed=0)
    assert not isinstance(loaders.train_sampler, RepeatAugSampler)
    set_epoch(loaders, 1)
    order = list(loaders.train_sampler)
    assert sorted(order) == list(range(96)) and order != list(range(96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repeated_aug_copies(1, 1) == 1 and repeated_aug_copies(3, 8) == 3  # nothing to say


@pytest.mark.parametrize("world, repeats, copies", [(2, 3, 2), (3, 4, 3), (3, 3, 3), (4, 3, 3)])
def test_copies_of_an_image_never_share_a_process(fake_fmnist, world, repeats, copies):
    cfg = DataConfig(root=fake_fmnist, **{**PLAIN, "repeated_aug": repeats})
    per_rank = []
    for rank in range(world):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaders = build_loaders(cfg, 28, rank, world, seed=0)
        said = [str(w.message) for w in caught if "repeated_aug" in str(w.message)]
        assert len(said) == (1 if rank == 0 and copies < repeats else 0), said  # rank 0 says it, once
        if said:
            assert f"makes {copies} copies per image on {world} processes" in said[0]
        assert loaders.train_sampler.num_repeats == copies
        set_epoch(loaders, 2)
        per_rank.append(list(loaders.train_sampler))
        assert len(set(per_rank[-1])) == len(per_rank[-1])  # no image twice on one process
    seen = [i for order in per_rank for i in order]
    counts = {i: seen.count(i) for i in set(seen)}
    assert max(counts.values()) == copies and len(seen) == world * (96 // world)


def test_repeat_aug_sampler_epoch_length_not_divisible():
    lens = [len(list(RepeatAugSampler(range(50), 3, r, num_repeats=3))) for r in range(3)]
    assert lens == [16, 16, 16]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_eval_sampler_exact_cover(world):
    n = 37  # not divisible by world * batch
    seen = []
    for rank in range(world):
        s = ShardedEvalSampler(range(n), world, rank)
        s.set_epoch(5)
        loader = torch.utils.data.DataLoader(torch.arange(n), batch_size=4, sampler=s)
        got = torch.cat(list(loader)).tolist()
        assert len(got) == len(s)
        seen += got
    assert len(seen) == n and sorted(seen) == list(range(n))


# ----------------------------------------------------------------------------- loaders

def test_train_loader_drop_last_and_val_exact(fake_fmnist):
    cfg = DataConfig(root=fake_fmnist, **{**PLAIN, "batch_size": 16})
    loaders = build_loaders(cfg, 28, 0, 1, seed=0)
    sizes = [len(y) for _, y in loaders.train]
    assert sizes == [16] * (96 // 16) and len(loaders.train) == len(sizes)
    assert loaders.val.batch_size == 24 and sum(len(y) for _, y in loaders.val) == 37
    for repeated in (1, 2):  # DistributedSampler, RepeatAugSampler
        cfg = DataConfig(root=fake_fmnist, **{**PLAIN, "batch_size": 10, "repeated_aug": repeated})
        two = [build_loaders(cfg, 28, rank, 2, seed=0) for rank in range(2)]
        assert [len(lo.train) for lo in two] == [4, 4]  # 48 samples per rank, batch 10, drop_last
        assert isinstance(two[0].train_sampler, RepeatAugSampler) == (repeated == 2)
    val_labels = [int(y) for lo in two for _, ys in lo.val for y in ys]
    assert len(val_labels) == 37


def test_default_deit_recipe_batch(fake_fmnist):
    """The full DeiT data recipe (RandAugment, erasing, repeated aug, mixup/cutmix) on 'L' images."""
    loaders = build_loaders(DataConfig(root=fake_fmnist, workers=0, batch_size=16), 28, 0, 3, seed=1)
    set_epoch(loaders, 0)
    x, y = next(iter(loaders.train))
    x, soft = loaders.mixup_fn(x, y)
    assert x.shape == (16, 1, 28, 28) and soft.shape == (16, 10)
    assert isinstance(loaders.train_sampler, RepeatAugSampler) and len(loaders.train) == 96 // 3 // 16


AUGMENTED = {**PLAIN, "train_transform": "deit", "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}


def test_loader_with_workers_matches_in_process(fake_fmnist):
    """Each batch's augmentation is seeded by its place in the epoch, so workers or none, the same
    images come out (RandAugment, random crops and flips, random erasing); and the main process's
    own RNG streams (the training loop's) are left as they were."""
    def epoch(workers):
        loaders = build_loaders(DataConfig(root=fake_fmnist, **{**AUGMENTED, "workers": workers}), 28, 0, 1, seed=3)
        set_epoch(loaders, 2)
        torch.manual_seed(0)
        batches = [(x, y) for x, y in loaders.train]
        after = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(3))   # the global stream as if no batch had been made
        return batches, [y for _, y in loaders.val]

    (train0, val0), (train2, val2) = epoch(0), epoch(2)
    assert len(train0) == len(train2) == 12
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(train0, train2))
    assert torch.equal(torch.cat(val0), torch.cat(val2))


def test_an_epoch_started_later_yields_its_tail_without_decoding_the_rest(fake_fmnist, monkeypatch):
    """``set_epoch(loaders, epoch, start_batch)`` (a mid-epoch resume): the batches from there on,
    identical to the whole epoch's, and no image before them is read."""
    from data.datasets import FashionMNIST

    read, real = [], FashionMNIST.__getitem__
    monkeypatch.setattr(FashionMNIST, "__getitem__", lambda self, i: read.append(i) or real(self, i))
    loaders = build_loaders(DataConfig(root=fake_fmnist, **AUGMENTED), 28, 0, 1, seed=3)
    set_epoch(loaders, 4)
    whole = list(loaders.train)
    read.clear()
    set_epoch(loaders, 4, start_batch=9)
    tail = list(loaders.train)
    assert len(whole) == 12 and len(tail) == 3 and len(read) == 3 * 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[9:], tail))
    assert len(loaders.train) == 12   # the loop still counts the whole epoch's steps
    set_epoch(loaders, 5)
    assert len(list(loaders.train)) == 12   # the next epoch starts at its beginning


def test_train_workers_persist_across_epochs(fake_fmnist):
    """Seeded batches make the workers' own RNG state irrelevant, so the train loader keeps its
    workers from epoch to epoch instead of starting new ones."""
    loaders = build_loaders(DataConfig(root=fake_fmnist, **{**PLAIN, "workers": 2}), 28, 0, 1, seed=0)
    pids = []
    for e in (0, 1):
        set_epoch(loaders, e)
        assert len(list(loaders.train)) == 12
        pids.append(sorted(w.pid for w in loaders.train._iterator._workers))
    assert pids[0] == pids[1] and len(pids[0]) == 2


def test_worker_user_error_reaches_caller_as_one_line(tmp_path):
    root, bad = _with_bad_files(tmp_path)
    cfg = DataConfig(dataset="imagefolder", root=root, **{**PLAIN, "workers": 2, "batch_size": 2})
    loaders = build_loaders(cfg, 8, 0, 1, 0)
    with pytest.raises(UserError) as e:
        for _ in loaders.train:
            pass
    assert bad in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_subsets_mixup_and_channel_override(fake_fmnist):
    cfg = DataConfig(root=fake_fmnist, **{**PLAIN, "max_train_samples": 30, "max_val_samples": 7, "mixup": 0.8,
                                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    loaders = build_loaders(cfg, 28, 0, 1, 0)
    assert len(loaders.train.dataset) == 30 and len(loaders.val.dataset) == 7
    assert loaders.train.dataset.dataset.indices == [i * 96 // 30 for i in range(30)]
    assert loaders.info.in_chans == 3 and loaders.val.dataset[0][0].shape == (3, 28, 28)
    x, y = next(iter(loaders.train))
    mixed, soft = loaders.mixup_fn(x, y)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    with pytest.raises(UserError, match="even batch"):
        build_loaders(DataConfig(root=fake_fmnist, **{**PLAIN, "batch_size": 7, "mixup": 0.8}), 28, 0, 1, 0)
    with pytest.raises(UserError, match="model.num_classes=5"):
        build_loaders(DataConfig(root=fake_fmnist, **PLAIN), 28, 0, 1, 0, num_classes=5)
    assert build_loaders(DataConfig(root=fake_fmnist, **PLAIN), 28, 0, 1, 0).mixup_fn is None


def test_eval_loader_and_timm_factory(tmp_path, fake_fmnist):
    loader, info = build_eval_loader(DataConfig(root=fake_fmnist, val_split="test", **PLAIN), 28, 1, 2)
    assert info.num_classes == 10 and len(loader.sampler) == 18
    root = image_tree(tmp_path, {"train": {"x": 2, "y": 2}, "val": {"x": 1, "y": 1}})
    loaders = build_loaders(DataConfig(dataset="torch/image_folder", root=root, **PLAIN), 8, 0, 1, 0)
    assert loaders.info.num_classes == 2 and loaders.info.in_chans == 3
    assert next(iter(loaders.val))[0].shape == (2, 3, 8, 8)
    with pytest.raises(UserError, match="'torch/cifar10'"):
        build_loaders(DataConfig(dataset="torch/cifar10", root=str(tmp_path / "c"), **PLAIN), 32, 0, 1, 0)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEBIAN_DIR), reason="Debian dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist():
    loaders = build_loaders(DataConfig(**PLAIN), 28, 0, 1, 0)
    assert len(loaders.train.dataset) == 60000 and len(loaders.val.dataset) == 10000
    assert loaders.info.num_classes == 10 and loaders.info.in_chans == 1
    assert sorted(set(loaders.val.dataset.labels.tolist())) == list(range(10))


# ----------------------------------------------------------------------------- transforms

def _image(mode, size=(40, 30)):
    arr = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("mode,mean", [("RGB", [0.485, 0.456, 0.406]), ("L", [0.286])])
def test_deit_transform_rgb_and_gray(mode, mean):
    cfg = DataConfig()  # the DeiT recipe: RandAugment m9 mstd0.5, random erasing 0.25
    tf = train_transform(cfg, 32, mean, [0.35] * len(mean))
    torch.manual_seed(0)
    outs = [tf(_image(mode)) for _ in range(300)]
    assert all(o.shape == (len(mean), 32, 32) and o.dtype == torch.float32 for o in outs)
    assert tf(_image("RGB" if mode == "L" else "L")).shape == (len(mean), 32, 32)  # mode follows mean


def test_posterize_zero_bits_gives_black_not_an_error():
    tf = train_transform(DataConfig(), 32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    aa = next(t for t in tf.transforms if hasattr(t, "ops"))
    op = next(o for o in aa.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # level 10 → keep 0 bits
    out = op(_image("RGB"))
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize("name", ["light", "none"])
def test_light_and_none_transforms_shape(name):
    tf = train_transform(DataConfig(train_transform=name), 28, [0.3], [0.3])
    assert tf(_image("L", (28, 28))).shape == (1, 28, 28)
    assert tf(_image("RGB", (50, 40))).shape == (1, 28, 28)


def test_eval_transform_geometry():
    tf = eval_transform(224, 0.875, "bicubic", [0.5] * 3, [0.25] * 3)
    sizes = [t.size for t in tf.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    assert sizes[0] == 256 and tuple(sizes[1]) == (224, 224)
    img = _image("RGB", (400, 300))
    expected = T.functional.center_crop(T.functional.resize(img, 256, T.InterpolationMode.BICUBIC), 224)
    want = (T.functional.to_tensor(expected) - 0.5) / 0.25
    assert torch.allclose(tf(img), want, atol=1e-6)
    small = _image("L", (28, 28))  # 28 at crop 1.0: identity geometry
    got = eval_transform(28, 1.0, "bicubic", [0.0], [1.0])(small)
    assert torch.equal(got, T.functional.to_tensor(small))


# ----------------------------------------------------------------------------- prepare_imagenet_val.py

def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_imagenet_val",
                                                  os.path.join(ROOT, "scripts", "prepare_imagenet_val.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WNIDS = {1: "n02119789", 2: "n01751748", 3: "n01440764"}  # ID -> WNID (devkit IDs are not in sorted order)
TRUTH = [2, 1, 3, 2, 1]  # labels of images 1..5


def _flat_val(tmp_path):
    val = tmp_path / "val"
    write_images(str(val), [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 6)])
    gt = tmp_path / "gt.txt"
    gt.write_text("".join(f"{t}\n" for t in TRUTH))
    return val, gt


def test_prepare_val_with_ground_truth_and_text_mapping(tmp_path, capsys):
    prep = _prepare_module()
    val, gt = _flat_val(tmp_path)
    mapping = tmp_path / "map.txt"
    mapping.write_text("".join(f"{i} {w}\n" for i, w in WNIDS.items()))
    before = sorted(os.listdir(val))
    assert prep.main([str(val), "--ground-truth", str(gt), "--meta", str(mapping), "--dry-run"]) == 0
    assert "would move 5 images into 3 class folders" in capsys.readouterr().out
    assert sorted(os.listdir(val)) == before
    assert prep.main([str(val), "--ground-truth", str(gt), "--meta", str(mapping)]) == 0
    for i, t in enumerate(TRUTH, 1):
        assert (val / WNIDS[t] / f"ILSVRC2012_val_{i:08d}.JPEG").is_file()
    assert sorted(os.listdir(val)) == sorted(WNIDS.values())
    ds = ImageFolderDataset(str(val))
    assert ds.classes == sorted(WNIDS.values()) and len(ds) == 5


def test_prepare_val_wnid_list_and_csv_copy(tmp_path):
    prep = _prepare_module()
    val, gt = _flat_val(tmp_path)
    wnid_list = tmp_path / "wnids.txt"  # line i is ID i
    wnid_list.write_text("".join(f"{WNIDS[i]}\n" for i in (1, 2, 3)))
    out = tmp_path / "sorted"
    assert prep.main([str(val), "--ground-truth", str(gt), "--meta", str(wnid_list), "--out", str(out), "--copy"]) == 0
    assert len(os.listdir(val)) == 5 and (out / WNIDS[3] / "ILSVRC2012_val_00000003.JPEG").is_file()
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{WNIDS[t]} 1 2 30 40 {WNIDS[t]} 5 6 7 8\n" for i, t in enumerate(TRUTH, 1)))
    assert prep.main([str(val), "--csv", str(solution)]) == 0
    assert sorted(os.listdir(val / WNIDS[2])) == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000004.JPEG"]


def test_prepare_val_refuses_mismatches_and_moves_nothing(tmp_path, capsys):
    prep = _prepare_module()
    val, gt = _flat_val(tmp_path)
    mapping = tmp_path / "map.txt"
    mapping.write_text("".join(f"{i} {w}\n" for i, w in WNIDS.items()))
    short = tmp_path / "short.txt"
    short.write_text("1\n2\n")
    assert prep.main([str(val), "--ground-truth", str(short), "--meta", str(mapping)]) == 2
    assert "2 labels but the val folder holds 5" in capsys.readouterr().err
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    assert prep.main([str(val), "--csv", str(csv_path)]) == 2
    assert "4 without a label" in capsys.readouterr().err
    assert prep.main([str(val), "--ground-truth", str(gt)]) == 2
    assert "--ground-truth and --meta, or --csv" in capsys.readouterr().err
    assert len(os.listdir(val)) == 5


def test_prepare_val_reads_devkit_meta_mat(tmp_path):
    import scipy.io as scipy_io  # a requirement (requirements.txt)
    prep = _prepare_module()
    rows = [(i, w, 0) for i, w in WNIDS.items()] + [(1001, "n00001740", 3)]  # a non-leaf parent entry
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(str(tmp_path / "meta.mat"), {"synsets": synsets})
    assert prep.read_meta(str(tmp_path / "meta.mat")) == WNIDS
