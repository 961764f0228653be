"""Client misuse fails at once, before any network call; no TensorFlow or Spark import."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from client import ImageSimilarityClient
from client.library import image_bytes
from client.loadgen import LoadConfig, parse_mix


def test_client_package_imports_neither_tensorflow_nor_spark():
    code = ("import sys, client, client.cli, client.loadgen; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'pyspark', 'keras', 'annoy')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_images_may_be_paths_bytes_or_pil(tmp_path):
    image = Image.new("RGB", (4, 4), "red")
    image.save(tmp_path / "x.png")
    assert image_bytes(tmp_path / "x.png") == (tmp_path / "x.png").read_bytes()
    assert image_bytes(str(tmp_path / "x.png")).startswith(b"\x89PNG")
    assert image_bytes(image).startswith(b"\x89PNG")
    assert image_bytes(b"abc") == b"abc"


@pytest.mark.parametrize("bad, error", [(None, TypeError), (42, TypeError), (b"", ValueError),
                                        ("/no/such/file.png", FileNotFoundError),
                                        (np.zeros((2, 2)), TypeError)])
def test_bad_images_fail_fast(bad, error):
    with pytest.raises(error):
        image_bytes(bad)


def test_find_similar_misuse_fails_fast():
    client = ImageSimilarityClient("127.0.0.1:1")  # nothing listens: misuse must fail before calling
    with pytest.raises(ValueError, match="exactly one"):
        client.find_similar(b"x", item_id="a")
    with pytest.raises(ValueError, match="exactly one"):
        client.find_similar()
    with pytest.raises(ValueError, match="k must be"):
        client.find_similar(item_id="a", k=0)
    with pytest.raises(ValueError, match="host:port"):
        ImageSimilarityClient("localhost")
    client.close()


def test_load_config_always_ends_and_mix_is_checked(tmp_path):
    with pytest.raises(ValueError, match="ends by itself"):
        LoadConfig("127.0.0.1:1", tmp_path, duration_s=None, requests=None)
    with pytest.raises(ValueError, match="unknown operations"):
        LoadConfig("127.0.0.1:1", tmp_path, mix={"delete": 1})
    assert parse_mix("embed=1,id=3") == {"embed": 1.0, "id": 3.0}
