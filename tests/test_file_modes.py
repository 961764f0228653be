"""Files in ARTIFACTS are readable by a server running as another user than the builder."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from lookalike import artifacts
from lookalike.availability import AVAILABILITY_FILE, change_availability
from lookalike.leases import write_lease
from tests import helpers

NOBODY = 65534  # the usual uid and gid of nobody/nogroup


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _write_every_small_file(out: Path) -> list[Path]:
    out.mkdir(exist_ok=True)
    artifacts.write_current(out, "v1")
    artifacts.write_json_atomic(out / artifacts.MANIFEST, {"version": "v1"})
    change_availability(out, hide=["P1"])
    lease = write_lease(out, "holder-1", ["v1"], 60)
    return [out / artifacts.CURRENT, out / artifacts.MANIFEST, out / AVAILABILITY_FILE, lease]


def test_pointer_files_get_the_mode_a_plain_open_would(tmp_path):
    with _umask(0o022):
        written = _write_every_small_file(tmp_path / "a")
    assert {path.name: oct(_mode(path)) for path in written} == {path.name: "0o644" for path in written}
    with _umask(0o027):
        written = _write_every_small_file(tmp_path / "b")
    assert {oct(_mode(path)) for path in written} == {"0o640"}
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".availability.lock" and p.is_file()]  # no leftovers
    assert _mode(tmp_path / "b" / ".leases") == 0o750


def test_an_explicit_mode_wins_and_a_bad_one_is_refused(tmp_path):
    artifacts.write_atomic(tmp_path / "x.json", "{}", mode=0o600)
    assert _mode(tmp_path / "x.json") == 0o600
    for bad in (0o755, 0o400, 0o4644):
        with pytest.raises(ValueError, match="must let the owner read and write and nobody execute"):
            artifacts.use_file_mode(bad)
    assert artifacts.folder_mode(0o640) == 0o750 and artifacts.folder_mode(0o604) == 0o705


def test_a_finished_folder_is_settled_to_the_file_mode(tmp_path):
    folder = tmp_path / "staging"
    (folder / "model" / "variables").mkdir(parents=True)
    (folder / "model" / "variables" / "data").write_bytes(b"x")
    fd, _ = tempfile.mkstemp(dir=folder)  # 0o600, as a library writing through mkstemp leaves it
    os.close(fd)
    os.chmod(folder / "model", 0o700)
    artifacts.settle_folder(folder, 0o644)
    assert {_mode(p) for p in folder.rglob("*") if p.is_file()} == {0o644}
    assert {_mode(p) for p in [folder, *folder.rglob("*")] if p.is_dir()} == {0o755}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([helpers.BIN / "lookalike-build", *map(str, args)], capture_output=True, text=True,
                          env=helpers.env(), timeout=60)


def test_the_cli_writes_with_file_mode(tmp_path):
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    hidden = _cli("hide", "--out", out, "--file-mode", "0640", "P1")
    assert hidden.returncode == 0, hidden.stderr
    assert _mode(out / AVAILABILITY_FILE) == 0o640
    for mode, message in (("0755", "must let the owner read and write"), ("rw-r--r--", "not an octal file mode")):
        bad = _cli("unhide", "--out", out, "--file-mode", mode, "P1")
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert json.loads((out / AVAILABILITY_FILE).read_text())["version"] == 1  # the refused command wrote nothing


@pytest.fixture
def shared_copy(built):
    """A copy of the built ARTIFACTS (file modes kept) in a folder another user can traverse. Not under
    pytest's tmp folder: pytest sets /tmp/pytest-of-<user> back to 0o700 whenever any session starts."""
    folder = Path(tempfile.mkdtemp(prefix="lookalike-other-user-"))
    try:
        os.chmod(folder, 0o755)
        out = folder / "ARTIFACTS"
        shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _as_nobody(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, user=NOBODY, group=NOBODY, extra_groups=[], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60, **kwargs)


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root (CI and this machine are root)")
def test_a_server_running_as_another_user_serves_what_root_built(shared_copy, catalogue):
    if artifacts.current_umask() & 0o004:
        pytest.skip(f"umask {artifacts.current_umask():03o} keeps new files from other users, as a plain open "
                    f"would; --file-mode overrides it")
    out = shared_copy
    hide = _cli("hide", "--out", out, helpers.SHARED_PRODUCT)  # availability.json, written as root too
    assert hide.returncode == 0, hide.stderr
    unreadable = [str(path) for path in sorted(out.rglob("*"))
                  if _as_nobody("cat" if path.is_file() else "ls", path).returncode != 0]
    assert not unreadable, f"another user cannot read: {unreadable}"

    try:
        reachable = _as_nobody(sys.executable, "-c", "import server.cli", cwd=out.parent, env=helpers.env())
    except PermissionError as error:  # the interpreter's folder is private (a pyenv under /root)
        reachable = error
    if not isinstance(reachable, subprocess.CompletedProcess) or reachable.returncode != 0:
        warnings.warn(f"every file was read as another user, but no server was started as one: it cannot run "
                      f"{sys.executable} or import this repository ({str(reachable)[-300:]})", stacklevel=1)
        return
    port, log_path = helpers.free_port(), out.parent / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", str(port), "--metrics-port", "-1",
             "--log-format", "text"], user=NOBODY, group=NOBODY, extra_groups=[], cwd=out.parent,
            env={**helpers.env(), "HOME": str(out.parent)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        from client import ImageSimilarityClient

        address = f"127.0.0.1:{port}"
        helpers.wait_healthy(address, process, 180, log_path)
        with ImageSimilarityClient(address) as client:
            info = client.info()
            matches = client.find_similar(product_id=helpers.first_listing(catalogue)["item_id"], k=5)
        assert info["version"] == artifacts.read_current(out) and info["hidden_product_count"] == 1
        assert len(matches) == 5 and matches.availability_version == 1
        assert helpers.SHARED_PRODUCT not in {match.product_id for match in matches}
        # Paths stay relative to the catalogue's image folder, as clients use them.
        assert all((catalogue / "small" / match.path).is_file() for match in matches)
    finally:
        process.terminate()
        process.wait(30)
