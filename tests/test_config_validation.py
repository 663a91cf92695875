"""Every bad configuration is one clear line naming the file (or option) and the field, and
nothing that passes validation can disable the model: the package manifest, the tokenizer,
device profiles, stream policy options, the context capacity and the CLI."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_runtime_fixtures import runtime_package  # noqa: F401

import listenloop
from listenloop import profiles as profiles_module
from listenloop.cli import main as cli_main
from listenloop.context import check_capacity
from listenloop.errors import ConfigError, DeviceError, Error, ModelPackageError
from listenloop.package import load_package
from listenloop.protocol import CHUNK_SAMPLES
from listenloop.sampling import SamplingConfig

NAN, INF = float("nan"), float("inf")
PROFILES = profiles_module.profiles_dir()


@pytest.fixture()
def pkg(tmp_path, runtime_package):  # noqa: F811
    dst = tmp_path / "pkg"
    shutil.copytree(runtime_package, dst)
    return dst


def _edit_manifest(pkg: Path, section: str, field: str, value) -> None:
    path = pkg / "manifest.json"
    manifest = json.loads(path.read_text())
    (manifest[section] if section else manifest)[field] = value
    path.write_text(json.dumps(manifest))  # NaN and Infinity are written as JSON's common extension


def _write_profile(tmp: Path, edit=None, base: str = "cpu") -> Path:
    data = json.loads((PROFILES / f"{base}.json").read_text())
    if edit:
        edit(data)
    path = tmp / "my_profile.json"
    path.write_text(json.dumps(data))
    return path


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message, message
    return message


# --- the table: each input, its error type, and what the line must name ---------------------

def _manifest_case(section, field, value):
    def run(pkg, tmp):
        _edit_manifest(pkg, section, field, value)
        load_package(pkg)
    return run


def _tokenizer_case(content: bytes):
    def run(pkg, tmp):
        (pkg / "tokenizer.json").write_bytes(content)
        load_package(pkg)  # the package load itself refuses it, before any stream exists
    return run


def _option_case(**options):
    def run(pkg, tmp):
        listenloop.Runtime(pkg, **options).close()
    return run


def _profile_case(edit, base="cpu"):
    def run(pkg, tmp):
        listenloop.Runtime(pkg, profile=str(_write_profile(tmp, edit, base))).close()
    return run


def _mutated_sampling(pkg, tmp):
    config = SamplingConfig(temperature=0.5)
    config.temperature = NAN  # a SamplingConfig is mutable; the stream checks it again
    listenloop.Runtime(pkg, sampling=config).close()


def _raw_manifest(text: str):
    def run(pkg, tmp):
        (pkg / "manifest.json").write_text(text)
        load_package(pkg)
    return run


def _kv_cannot_fit(pkg, tmp):
    # The tiny package's cache is 512 bytes a token: 512 tokens need 256 KiB.
    with mock.patch.object(profiles_module, "available_memory", lambda: 100_000):
        listenloop.Runtime(pkg).close()


def _real_size_kv_cannot_fit(pkg, tmp):
    # The released model's shape: 36 layers, 2 KV heads of 128, float32: 72 KiB a token.
    check_capacity(32768, prefix_len=106, package_context=4096, trained_context=4096,
                   kv_bytes_per_token=2 * 36 * 2 * 128 * 4, available_bytes=2 * 2 ** 30)


M = "manifest.json"
CASES = {
    # manifest numbers that used to load and disable the model
    "manifest speak_bias nan": (_manifest_case("sampling", "speak_bias", NAN), ModelPackageError,
                                [M, "sampling.speak_bias", "[-100, 100]", "got nan"]),
    "manifest speak_bias inf": (_manifest_case("sampling", "speak_bias", INF), ModelPackageError,
                                [M, "sampling.speak_bias", "got inf"]),
    "manifest speak_bias 1e308": (_manifest_case("sampling", "speak_bias", 1e308), ModelPackageError,
                                  [M, "sampling.speak_bias", "got 1e+308"]),
    "manifest speak_bias -inf": (_manifest_case("sampling", "speak_bias", -INF), ModelPackageError,
                                 [M, "sampling.speak_bias"]),
    "manifest speak_bias true": (_manifest_case("sampling", "speak_bias", True), ModelPackageError,
                                 [M, "sampling.speak_bias", "got true"]),
    "manifest temperature nan": (_manifest_case("sampling", "temperature", NAN), ModelPackageError,
                                 [M, "sampling.temperature", "[0, 100]", "got nan"]),
    "manifest temperature 1e9": (_manifest_case("sampling", "temperature", 1e9), ModelPackageError,
                                 [M, "sampling.temperature"]),
    "manifest top_p nan": (_manifest_case("sampling", "top_p", NAN), ModelPackageError,
                           [M, "sampling.top_p", "(0, 1]"]),
    "manifest top_k negative": (_manifest_case("sampling", "top_k", -1), ModelPackageError, [M, "sampling.top_k"]),
    "manifest max_reply_tokens 0": (_manifest_case("sampling", "max_reply_tokens", 0), ModelPackageError,
                                    [M, "sampling.max_reply_tokens", "[1, 32768]"]),
    "manifest max_reply_tokens 1e9": (_manifest_case("sampling", "max_reply_tokens", 10 ** 9), ModelPackageError,
                                      [M, "sampling.max_reply_tokens"]),
    "manifest rope_theta nan": (_manifest_case("decoder", "rope_theta", NAN), ModelPackageError,
                                [M, "decoder.rope_theta", "got nan"]),
    "manifest rms_norm_eps inf": (_manifest_case("decoder", "rms_norm_eps", INF), ModelPackageError,
                                  [M, "decoder.rms_norm_eps"]),
    "manifest log_floor nan": (_manifest_case("audio", "log_floor", NAN), ModelPackageError, [M, "audio.log_floor"]),
    "manifest dynamic_range negative": (_manifest_case("audio", "dynamic_range_log10", -8.0), ModelPackageError,
                                        [M, "audio.dynamic_range_log10"]),
    "manifest max_context 1e9": (_manifest_case("decoder", "max_context", 10 ** 9), ModelPackageError,
                                 [M, "decoder.max_context", "[1, 32768]"]),
    "manifest trained_context nan": (_manifest_case("decoder", "trained_context", NAN), ModelPackageError,
                                     [M, "decoder.trained_context"]),
    "manifest num_layers huge": (_manifest_case("decoder", "num_layers", 10 ** 30), ModelPackageError,
                                 [M, "decoder.num_layers"]),
    "manifest 5000-digit integer": (_raw_manifest('{"format": ' + "9" * 5000 + "}"), ModelPackageError,
                                    [M, "not valid JSON"]),
    "manifest nested too deeply": (_raw_manifest("[" * 200000), ModelPackageError, [M, "not valid JSON"]),
    # the tokenizer, refused when the package loads
    "tokenizer garbage bytes": (_tokenizer_case(bytes(range(256)) * 4), ModelPackageError,
                                ["tokenizer.json", "tokenizer.file"]),
    "tokenizer wrong JSON": (_tokenizer_case(b"{1: 2}"), ModelPackageError,
                             ["tokenizer.json", "tokenizer.file", "not valid JSON"]),
    "tokenizer empty": (_tokenizer_case(b""), ModelPackageError, ["tokenizer.json", "tokenizer.file"]),
    "tokenizer JSON list": (_tokenizer_case(b"[1, 2, 3]"), ModelPackageError, ["tokenizer.json", "tokenizer.file"]),
    "tokenizer JSON, not a tokenizer": (_tokenizer_case(b'{"version": "1.0", "model": {"type": "Nonsense"}}'),
                                        ModelPackageError, ["tokenizer.json", "not a Hugging Face tokenizers file"]),
    # stream policy options (Runtime(**options) -> Policy.build)
    "option speak_bias nan": (_option_case(speak_bias=NAN), ConfigError, ["speak_bias", "got nan"]),
    "option speak_bias inf": (_option_case(speak_bias=INF), ConfigError, ["speak_bias", "got inf"]),
    "option speak_bias -inf": (_option_case(speak_bias=-INF), ConfigError, ["speak_bias"]),
    "option speak_bias 1e308": (_option_case(speak_bias=1e308), ConfigError, ["speak_bias", "[-10000, 10000]"]),
    "option speak_bias string": (_option_case(speak_bias="1.5"), ConfigError, ["speak_bias"]),
    "option speak_bias bool": (_option_case(speak_bias=True), ConfigError, ["speak_bias", "got true"]),
    "option temperature nan": (lambda pkg, tmp: _option_case(sampling=SamplingConfig(temperature=NAN))(pkg, tmp),
                               ConfigError, ["temperature", "got nan"]),
    "option temperature set to nan later": (_mutated_sampling, ConfigError, ["temperature", "got nan"]),
    "option top_p 0": (lambda pkg, tmp: _option_case(sampling=SamplingConfig(top_p=0.0))(pkg, tmp),
                       ConfigError, ["top_p", "(0, 1]"]),
    "option sampling not a config": (_option_case(sampling={"temperature": 1.0}), ConfigError, ["sampling"]),
    "option speak_threshold nan": (_option_case(speak_threshold=NAN), ConfigError, ["speak_threshold", "[0, 1.01]"]),
    "option speak_threshold 2": (_option_case(speak_threshold=2.0), ConfigError, ["speak_threshold"]),
    "option max_reply_tokens 0": (_option_case(max_reply_tokens=0), ConfigError, ["max_reply_tokens"]),
    "option max_reply_tokens 2.5": (_option_case(max_reply_tokens=2.5), ConfigError, ["max_reply_tokens"]),
    "option max_reply_tokens 1e9": (_option_case(max_reply_tokens=10 ** 9), ConfigError, ["max_reply_tokens"]),
    "option history_chunks 0": (_option_case(history_chunks=0), ConfigError, ["history_chunks", "[1, 8]"]),
    "option history_chunks 9": (_option_case(history_chunks=9), ConfigError, ["history_chunks"]),
    "option quiet_resets string": (_option_case(quiet_resets="no"), ConfigError, ["quiet_resets"]),
    "option sampler without decide": (_option_case(sampler=object()), ConfigError, ["sampler"]),
    # the context capacity
    "max_context 1e9": (_option_case(max_context=10 ** 9), ModelPackageError, ["max_context 1000000000", "32768"]),
    "max_context nan": (_option_case(max_context=NAN), ModelPackageError, ["max_context", "whole number"]),
    "KV cache cannot fit": (_kv_cannot_fit, ModelPackageError,
                            ["max_context 512", "needs 256.0 KiB (262144 bytes)", "100000 bytes", "available"]),
    "real-size KV cannot fit": (_real_size_kv_cannot_fit, ModelPackageError,
                                ["max_context 32768", "2415919104 bytes", "2147483648 bytes", "29127 tokens fit"]),
    # device profiles
    "profile threads nan": (_profile_case(lambda d: d["session"].__setitem__("intra_op_num_threads", NAN)),
                            DeviceError, ["my_profile.json", "session.intra_op_num_threads", "got nan"]),
    "profile threads negative": (_profile_case(lambda d: d["session"].__setitem__("inter_op_num_threads", -2)),
                                 DeviceError, ["my_profile.json", "session.inter_op_num_threads", "[0, 256]"]),
    "profile threads huge": (_profile_case(lambda d: d["session"].__setitem__("intra_op_num_threads", 100000)),
                             DeviceError, ["my_profile.json", "session.intra_op_num_threads"]),
    "profile threads bool": (_profile_case(lambda d: d["session"].__setitem__("inter_op_num_threads", True)),
                             DeviceError, ["my_profile.json", "session.inter_op_num_threads", "got true"]),
    "profile execution_mode": (_profile_case(lambda d: d["session"].__setitem__("execution_mode", "fast")),
                               DeviceError, ["my_profile.json", "session.execution_mode", "sequential"]),
    "profile unknown session setting": (_profile_case(lambda d: d["session"].__setitem__("intra_threads", 2)),
                                        DeviceError, ["my_profile.json", "session.intra_threads", "unknown"]),
    "profile config entry null": (_profile_case(lambda d: d["session"]["config_entries"].__setitem__("a.b", None)),
                                  DeviceError, ["my_profile.json", "session.config_entries.a.b"]),
    "profile max_context 1e9": (_profile_case(lambda d: d.__setitem__("max_context", 10 ** 9)),
                                DeviceError, ["my_profile.json", "max_context", "[1, 32768]"]),
    "profile max_context inf": (_profile_case(lambda d: d.__setitem__("max_context", INF)),
                                DeviceError, ["my_profile.json", "max_context"]),
    "profile kv device": (_profile_case(lambda d: d.__setitem__("kv_cache_device", "tpu")),
                          DeviceError, ["my_profile.json", "kv_cache_device"]),
    "profile providers empty": (_profile_case(lambda d: d.__setitem__("providers", [])),
                                DeviceError, ["my_profile.json", "providers"]),
    "profile provider not a pair": (_profile_case(lambda d: d.__setitem__("providers", ["CPUExecutionProvider"])),
                                    DeviceError, ["my_profile.json", "providers[0]"]),
    "profile provider twice": (_profile_case(lambda d: d["providers"].append(["CPUExecutionProvider", {}])),
                               DeviceError, ["my_profile.json", "providers[1][0]", "twice"]),
    "profile device_id nan": (_profile_case(lambda d: d["providers"][0][1].__setitem__("device_id", NAN), "cuda"),
                              DeviceError, ["my_profile.json", "providers[0][1].device_id"]),
    "profile without providers": (_profile_case(lambda d: d.clear() or d.__setitem__("x", 1)), DeviceError,
                                  ["my_profile.json", "providers", "missing"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_configuration_is_one_line_naming_file_and_field(case, pkg, tmp_path):
    run, kind, names = CASES[case]
    with pytest.raises(kind) as info:
        run(pkg, tmp_path)
    assert isinstance(info.value, Error)
    message = _one_line(info.value)
    for name in names:
        assert name in message, (name, message)
    if names[0] in (M, "tokenizer.json"):
        assert message.startswith(f"{pkg / names[0]}: "), message  # the file with its folder
    if "my_profile.json" in names:
        assert message.startswith(f"{tmp_path / 'my_profile.json'}: "), message


def test_profile_with_garbage_json(tmp_path):
    path = tmp_path / "broken.json"
    for content in (b"\xff\xfe garbage", b'{"providers": [', b"[" * 100000, b"[1, 2]"):
        path.write_bytes(content)
        with pytest.raises(DeviceError) as info:
            profiles_module.load_profile(path)
        assert _one_line(info.value).startswith(f"{path}: ")


def test_shipped_profiles_and_package_pass():
    for name in profiles_module.available_profiles():
        profiles_module.load_profile(name)
    load_package(listenloop.package.default_package_path())


def test_values_at_the_edges_of_their_ranges_run(pkg):
    """The ends of each range are accepted and a stream runs with them."""
    _edit_manifest(pkg, "sampling", "speak_bias", -100)
    _edit_manifest(pkg, "sampling", "temperature", 100)
    _edit_manifest(pkg, "sampling", "top_p", 1e-9)
    _edit_manifest(pkg, "sampling", "max_reply_tokens", 1)
    _edit_manifest(pkg, "decoder", "rope_theta", 1e10)
    with listenloop.Runtime(pkg, speak_bias=1e4, speak_threshold=1.01, history_chunks=1) as rt:
        _run_two_chunks(rt)
    with listenloop.Runtime(pkg, sampling=SamplingConfig(temperature=1e-300, seed=1), speak_bias=-1e4) as rt:
        events = _run_two_chunks(rt)
    assert not any(e.spoke for e in events if e.kind == "Decision")


def test_kv_check_uses_the_memory_that_is_available(pkg, monkeypatch):
    monkeypatch.setattr(profiles_module, "available_memory", lambda: 512 * 512)  # exactly one 512-token cache
    listenloop.Runtime(pkg).close()
    monkeypatch.setattr(profiles_module, "available_memory", lambda: None)  # unknown: no check
    listenloop.Runtime(pkg).close()


def test_available_memory_is_a_positive_number_of_bytes():
    available = profiles_module.available_memory()
    assert available is None or (isinstance(available, int) and available > 0)


# --- the CLI ----------------------------------------------------------------------------------

@pytest.fixture()
def wav(tmp_path):
    path = tmp_path / "zeros.wav"
    sf.write(path, np.zeros(2 * CHUNK_SAMPLES, np.float32), 16000)
    return path


@pytest.mark.parametrize("args,names", [
    (["--speak-bias", "nan"], ["speak_bias", "got nan"]),
    (["--speak-bias", "inf"], ["speak_bias", "got inf"]),
    (["--speak-bias", "1e308"], ["speak_bias", "[-10000, 10000]"]),
    (["--max-context", "1000000000"], ["max_context 1000000000", "32768"]),
])
def test_cli_refuses_bad_options_in_one_line(args, names, pkg, wav, capsys):
    code = cli_main(["run", str(wav), "--package", str(pkg), *args])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("listenloop: error: ") and "unexpected" not in lines[0], err
    for name in names:
        assert name in lines[0]


def test_cli_refuses_a_broken_tokenizer_before_streaming(pkg, wav, capsys):
    (pkg / "tokenizer.json").write_bytes(b"{1: 2}")
    code = cli_main(["run", str(wav), "--package", str(pkg), "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""  # no event was printed: the load failed
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.json" in lines[0] and "unexpected" not in lines[0], err


# --- properties: random mutations either load and run, or fail in one Error line -------------

def _run_two_chunks(runtime) -> list:
    with runtime.session() as session:
        session.accept_waveform(np.zeros(2 * CHUNK_SAMPLES, np.float32))
        session.finish(timeout=60)
        events = list(session.events(timeout=5))
    faults = [e for e in events if e.kind == "Fault"]
    assert not faults, faults
    assert [e.chunk for e in events if e.kind == "Decision"] == [0, 1]
    return events


def _paths(obj, prefix=()):
    """Every place in a JSON document: (keys...) tuples, containers included."""
    out = []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return out
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(_paths(value, prefix + (key,)))
    return out


def _apply(doc, path, op, value):
    *parents, last = path
    node = doc
    for key in parents:
        node = node[key]
    if op == "delete":
        del node[last]
    else:
        node[last] = value


WEIRD = st.one_of(
    st.sampled_from([NAN, INF, -INF, 1e308, -1e308, 1e-310, 0, -1, 1, 2, 32768, 10 ** 9, 10 ** 30, -(10 ** 30),
                     0.5, -0.5, True, False, None, "", "x", "NaN", "../manifest.json", [], [1], [1, 2], {}, {"a": 1}]),
    st.integers(-2 ** 40, 2 ** 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-5, 400), max_size=4),
)


# Numbers near the ends of the ranges, so that many mutations of a number still load and run.
PLAUSIBLE = st.one_of(
    st.sampled_from([0, 1, -1, 2, 8, 9, 13, 100, -100, 100.5, 1e4, 1e-9, 0.5, 1.01, 256, 257, 512, 32768, 32769]),
    st.integers(-1000, 40000),
    st.floats(-200, 200),
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_at(doc, path):
    for key in path:
        try:
            doc = doc[key]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def _mutate(data, doc, extra_paths=()):
    """1-3 mutations: a value replaced (by NaN, inf, huge, negative, wrong type...) or deleted;
    a number is mostly replaced by another number."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(doc) + [p for p in extra_paths if _parent_exists(doc, p)]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "replace", "delete"]), label="op")
        value = None
        if op == "replace":
            numeric = _is_number(_value_at(doc, path)) or path in extra_paths
            value = data.draw(st.one_of(PLAUSIBLE, PLAUSIBLE, WEIRD) if numeric else WEIRD, label="value")
        try:
            _apply(doc, path, op, value)
        except (KeyError, IndexError, TypeError):
            pass  # the path went away with an earlier mutation
    return doc


def _parent_exists(doc, path):
    node = doc
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return isinstance(node, dict)


def _load_and_run(package_dir, profile="cpu"):
    try:
        runtime = listenloop.Runtime(package_dir, profile=profile)
    except Error as exc:  # anything else (and a message over several lines) fails the test
        _one_line(exc)
        return
    with runtime:
        _run_two_chunks(runtime)


PROPERTY = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(300)
@PROPERTY
@given(data=st.data())
def test_mutated_manifest_loads_and_runs_or_fails_in_one_line(runtime_package, data):  # noqa: F811
    manifest = json.loads((runtime_package / "manifest.json").read_text())
    mutated = _mutate(data, manifest, extra_paths=[("decoder", "trained_context")])
    with tempfile.TemporaryDirectory() as tmp:
        package_dir = Path(tmp) / "pkg"
        shutil.copytree(runtime_package, package_dir)
        (package_dir / "manifest.json").write_text(json.dumps(mutated, allow_nan=True))
        _load_and_run(package_dir)


@pytest.mark.timeout(300)
@PROPERTY
@given(data=st.data(), base=st.sampled_from(["cpu", "cuda", "jetson"]))
def test_mutated_profile_loads_and_runs_or_fails_in_one_line(runtime_package, data, base):  # noqa: F811
    profile = json.loads((PROFILES / f"{base}.json").read_text())
    mutated = _mutate(data, profile)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{base}_mutated.json"
        path.write_text(json.dumps(mutated, allow_nan=True))
        _load_and_run(runtime_package, profile=str(path))


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(bias=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 70, 2 ** 70)))
def test_any_speak_bias_is_accepted_only_when_finite_and_in_range(bias):
    from listenloop.stream import Policy

    defaults = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "speak_bias": 0.0, "max_reply_tokens": 8}
    if -10000 <= bias <= 10000:  # never true for NaN or an infinity
        assert Policy.build(defaults, speak_bias=bias).speak_bias == float(bias)
    else:
        with pytest.raises(ConfigError) as info:
            Policy.build(defaults, speak_bias=bias)
        assert _one_line(info.value).startswith("speak_bias must be a finite number in [-10000, 10000]")


@pytest.mark.parametrize("option,value", [
    ("event_queue", float("nan")), ("event_queue", 1e300), ("event_queue", 0), ("listen_queue", 2 ** 70),
    ("listen_queue", 1.5), ("ring_seconds", float("inf")), ("ring_seconds", "8"), ("ring_seconds", 1e12),
    ("ring_seconds", 0.5), ("stats_every", -1), ("stats_every", True),
])
def test_session_options_out_of_range_are_one_config_error_line(runtime_package, option, value):  # noqa: F811
    rt = listenloop.Runtime(runtime_package)
    with pytest.raises(ConfigError) as info:
        rt.session(**{option: value})
    message = str(info.value)
    assert message.startswith(f"{option} must be ") and "\n" not in message
    assert rt.open_sessions == 0
    rt.close()
