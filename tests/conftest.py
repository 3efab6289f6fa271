"""Shared fixtures: a small, learnable Fashion-MNIST-format dataset written as real IDX files."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_idx_dataset(root, n_train=96, n_test=37, classes=10, seed=0):
    """Fashion-MNIST's four IDX .gz files with ``n_train``/``n_test`` 28x28 images whose class
    is visible (a bright square at a class-dependent position), so a tiny model can learn it."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)

    def images_labels(n):
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        imgs = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 4)
            imgs[i, 2 + 8 * r: 8 + 8 * r, 2 + 6 * col: 8 + 6 * col] = 255
        return imgs, labels.astype(np.uint8)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs, labels = images_labels(n)
        with gzip.open(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        with gzip.open(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory):
    return write_idx_dataset(str(tmp_path_factory.mktemp("fmnist")))


def write_image_folder(root, classes=("a", "b", "c", "d", "e"), per_class=3, size=(40, 48), split="val", seed=0):
    """``root/split/<class>/<i>.png``: random RGB images of ``size`` (h, w), not square, so that
    evaluation's resize and centre crop matter."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, split, c), exist_ok=True)
        for i in range(per_class):
            img = (rng.random((*size, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, split, c, f"{i}.png"))
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Five classes a..e, three 40x48 RGB images each, in ``<root>/val``."""
    return write_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


@pytest.fixture
def http_server(tmp_path):
    """(base URL, directory): a local HTTP server, in a thread, serving a fresh directory."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
