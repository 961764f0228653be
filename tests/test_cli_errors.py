"""Every command-line mistake is one line naming the problem, a non-zero exit and no traceback."""

import subprocess

import pytest

from tests import helpers


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=helpers.env(), timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def empty_catalogue(tmp_path):
    (tmp_path / "empty" / "small").mkdir(parents=True)
    return tmp_path / "empty"


def test_builder_mistakes(tmp_path, empty_catalogue):
    build = helpers.BIN / "lookalike-build"
    assert_one_line(run(build, "build", "--images", tmp_path / "nowhere", "--out", tmp_path / "A"),
                    "--images", "is not a folder")
    assert_one_line(run(build, "build", "--images", tmp_path, "--out", tmp_path / "A"), "has no small/ folder")
    assert_one_line(run(build, "build", "--images", empty_catalogue, "--out", tmp_path / "A"), "no image files")
    assert_one_line(run(build, "build", "--images", empty_catalogue), "--out")
    assert_one_line(run(build, "build", "--images", empty_catalogue, "--out", tmp_path / "A", "--language", "x'y"),
                    "--language")
    assert_one_line(run(build, "build", "--images", empty_catalogue, "--out", tmp_path / "A", "--backbone", "big"),
                    "--backbone")
    assert_one_line(run(build, "build", "--images", empty_catalogue, "--out", tmp_path / "A", "--augment-neighbours",
                        "99"), "augment_neighbours must be between 0 and 50, not 99")
    assert_one_line(run(build, "sample", "fashion-mnist", "--out", tmp_path / "s", "--limit", "0"), "--limit")
    assert not (tmp_path / "A").exists()
    (tmp_path / "B").mkdir()
    assert_one_line(run(build, "add", "--out", tmp_path / "A", "--images", empty_catalogue), "--out", "is not a folder")
    assert_one_line(run(build, "add", "--out", tmp_path / "B", "--images", tmp_path), "has no small/ folder")
    assert_one_line(run(build, "add", "--out", tmp_path / "B", "--images", empty_catalogue), "CURRENT", "build")
    assert_one_line(run(build, "add", "--out", tmp_path / "B", "--images", empty_catalogue, "--max-delta-rows", "x"),
                    "--max-delta-rows")
    assert_one_line(run(build, "deltas", "--out", tmp_path / "B"), "CURRENT")


@pytest.mark.e2e
def test_a_catalogue_with_nothing_to_index_is_one_line_after_the_scan(tmp_path):
    catalogue = tmp_path / "broken"
    (catalogue / "small" / "aa").mkdir(parents=True)
    (catalogue / "small" / "aa" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = run(helpers.BIN / "lookalike-build", "--log-level", "ERROR", "build", "--images", catalogue, "--out",
                 tmp_path / "A")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "lookalike-build: only 0 image(s) passed the filter" in result.stderr


def test_server_mistakes(tmp_path):
    serve = helpers.BIN / "lookalike-serve"
    assert_one_line(run(serve, "--artifacts", tmp_path / "nowhere"), "--artifacts", "is not a folder")
    assert_one_line(run(serve, "--artifacts", tmp_path, "--tls-cert", tmp_path / "c.pem"), "--tls-key")
    assert_one_line(run(serve, "--artifacts", tmp_path, "--port", "many"), "--port")
    assert_one_line(run(serve, "--artifacts", tmp_path, "--http-port", "-2"), "--http-port")
    assert_one_line(run(serve, "--artifacts", tmp_path, "--catalogue", tmp_path / "nowhere"), "--catalogue",
                    "is not a folder")
    assert_one_line(run(serve, "--artifacts", tmp_path, "--max-candidates", "5"), "max_candidates must be at least")


def test_client_mistakes(tmp_path):
    cli = helpers.BIN / "lookalike"
    assert_one_line(run(cli, "similar"), "one of the arguments")
    assert_one_line(run(cli, "similar", tmp_path / "missing.jpg"), "no image file")
    assert_one_line(run(cli, "similar", "--vector", "[1, 2"), "lookalike:")
    assert_one_line(run(cli, "similar", "--product", "p", "--image-id", "i"), "not allowed with")
    assert_one_line(run(cli, "bench", "--catalogue", tmp_path / "nowhere", "--requests", "1"), "lookalike:")
