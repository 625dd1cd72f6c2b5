"""moectl end to end as a user runs it: a real subprocess, real files."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.cli.main import main


def moectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300)


def test_make_checkpoint_then_run_reference(tmp_path):
    out = tmp_path / "ckpt"
    r = moectl("make-checkpoint", "--family", "qwen2_moe", "--preset", "tiny", "--out", str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    r = moectl("run-reference", "--checkpoint", str(out), "--max-tokens", "5", "hello experts")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello experts") and "MiB" in r.stderr


def test_run_reference_streams_the_reference_tokens(tiny_checkpoint, capsys):
    from router_service.model.reference import ReferenceModel
    from router_service.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_checkpoint)
    prompt = "route every token"
    expected = ReferenceModel.from_pretrained(tiny_checkpoint).generate_greedy(tok.encode(prompt), 6)
    expected = expected[: expected.index(1)] if 1 in expected else expected  # </s> = 1 ends generation
    assert main(["run-reference", "--checkpoint", str(tiny_checkpoint), "--max-tokens", "6", prompt]) == 0
    assert capsys.readouterr().out == prompt + tok.decode(expected) + "\n"


def test_inspect(tiny_checkpoint, capsys):
    assert main(["inspect", "--checkpoint", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "family       mixtral" in out and "8 per layer, top-2" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--checkpoint", "/nonexistent/ckpt"], "checkpoint directory /nonexistent/ckpt does not exist"),
        (["run-reference", "--checkpoint", "CKPT", "--max-tokens", "0", "x"], "--max-tokens must be >= 1"),
        (["run-reference", "--checkpoint", "CKPT", ""], "prompt is empty"),
    ],
)
def test_bad_input_is_one_line(argv, message, tiny_checkpoint, capsys):
    argv = [str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unsupported_architecture_and_corrupt_header(tiny_checkpoint, tmp_path):
    import json
    import shutil

    bad = shutil.copytree(tiny_checkpoint, tmp_path / "llama")
    config = json.loads((bad / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    (bad / "config.json").write_text(json.dumps(config))
    r = moectl("inspect", "--checkpoint", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unsupported architecture ['LlamaForCausalLM']" in r.stderr

    corrupt = shutil.copytree(tiny_checkpoint, tmp_path / "corrupt")
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    r = moectl("inspect", "--checkpoint", str(corrupt))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "corrupt safetensors file" in r.stderr


def test_argparse_rejects_bad_choices():
    r = moectl("run-reference", "--checkpoint", "x", "--dtype", "int8", "p")
    assert r.returncode == 2 and "invalid choice: 'int8'" in r.stderr and r.stderr.count("\n") == 1
    r = moectl("make-checkpoint", "--family", "llama", "--preset", "tiny", "--out", "x")
    assert r.returncode == 2 and "invalid choice: 'llama'" in r.stderr


def test_help_lists_commands():
    r = moectl("--help")
    assert r.returncode == 0
    for cmd in ("make-checkpoint", "inspect", "run-reference", "bench"):
        assert cmd in r.stdout


def test_bench_kernel_compares_backends_and_their_outputs(capsys):
    # On CPU the triton columns run under TRITON_INTERPRET=1 (conftest): tiny shapes, one token count.
    assert main(["bench", "kernel", "--hidden", "16", "--ffn", "24", "--experts", "4", "--tokens", "3",
                 "--repeats", "1", "--dtype", "bfloat16", "--backends", "torch,triton-portable,triton"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split() == ["tokens", "torch", "ms", "triton-portable", "ms", "triton", "ms", "triton-portable",
                              "x", "triton", "x", "triton-portable", "|diff|", "triton", "|diff|"]
    values = row.split()
    assert values[0] == "3" and all(float(d) < 1e-2 for d in values[-2:])  # both triton paths equal torch's
    assert main(["bench", "kernel", "--backends", "torch,torch"]) == 2
    assert "--backends must name distinct ones of torch,triton,triton-portable" in capsys.readouterr().err


def test_bench_kernel_fits_the_touch_cost(capsys, monkeypatch):
    """--touch-cost times calls of n pairs spread over m experts and fits t = c + a * m + b * n. The timer
    is replaced by a known cost (0.3 ms + 0.5 ms per expert + 10 us per pair: touch_cost 50), computed from
    the slot ids each real call gets, so the fit is checked exactly; the real timing runs in the test
    above. Too few counts, or no cost per expert, are refused."""
    from cluster.bench import kernel

    seen = []

    real_call = kernel._call

    def fake_call(backend, hidden, slot_ids, weights, experts):
        kernel_call = real_call(backend, hidden, slot_ids, weights, experts)

        def call():
            assert kernel_call().shape == hidden.shape  # the real kernel runs, on the shapes asked for
            n, m = len(slot_ids), len(set(slot_ids.flatten().tolist()))
            seen.append((n, m))
            return 0.3 + 0.5 * m + 0.01 * n
        return call

    monkeypatch.setattr(kernel, "_call", fake_call)
    monkeypatch.setattr(kernel, "_time_ms", lambda fn, repeats, device: fn())
    assert main(["bench", "kernel", "--hidden", "32", "--ffn", "48", "--dtype", "float32", "--touch-cost",
                 "--repeats", "1", "--backends", "torch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    grid = [(n, m) for n in (1, 2, 4, 8, 16, 32, 64) for m in (1, 2, 4) if m <= n]  # decode sizes by default
    assert seen == grid and [tuple(map(int, line.split()[:2])) for line in lines[2:-2]] == grid
    assert lines[-2] == "fit: 0.300 ms per call + 0.500 ms per expert touched + 10.00 us per pair"
    assert lines[-1] == "touch_cost 50.0 (pairs one expert's weight read costs)"
    monkeypatch.setattr(kernel, "_time_ms", lambda fn, repeats, device: 1.0 + 0 * fn())  # flat: nothing to fit
    assert main(["bench", "kernel", "--hidden", "32", "--ffn", "48", "--touch-cost", "--tokens", "1,8",
                 "--repeats", "1", "--backends", "torch"]) == 1
    assert "touch_cost cannot be fitted" in capsys.readouterr().out
    assert main(["bench", "kernel", "--touch-cost", "--tokens", "4,4"]) == 2
    assert "--touch-cost fits a cost per pair: --tokens needs two different counts or more" in capsys.readouterr().err
    assert main(["bench", "kernel", "--touch-cost", "--experts", "2"]) == 2
    assert "--experts must be >= 4" in capsys.readouterr().err


def test_bench_kernel_needs_no_redis_client():
    """A GPU box may have torch and triton but not the cluster's packages: the kernel benchmark runs."""
    code = ("import sys; sys.modules['redis'] = None  # any `import redis` now fails\n"
            "from cluster.cli.main import main\n"
            "sys.exit(main(['bench', 'kernel', '--hidden', '16', '--ffn', '16', '--experts', '2', '--tokens', '1',"
            " '--repeats', '1', '--backends', 'torch']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch ms" in done.stdout


def test_serve_file_is_0600_on_every_write_and_never_follows_a_link(tmp_path, monkeypatch):
    import json
    import stat

    from cluster.deploy import connect

    serve_file = tmp_path / "home" / "serve.json"
    monkeypatch.setattr(connect, "SERVE_FILE", serve_file)
    serve_file.parent.mkdir()
    serve_file.write_text("{}")
    serve_file.chmod(0o644)  # left by an older version, or by someone else
    connect.write_serve_file("redis://:pw@127.0.0.1:1/0", 9000)
    assert stat.S_IMODE(serve_file.stat().st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    serve_file.unlink()
    serve_file.symlink_to(victim)  # planted where moectl serve writes
    connect.write_serve_file("redis://:pw@127.0.0.1:1/0", 9000)
    assert victim.read_text() == "untouched" and not serve_file.is_symlink()
    assert stat.S_IMODE(serve_file.stat().st_mode) == 0o600
    assert json.loads(serve_file.read_text())["redis_url"] == "redis://:pw@127.0.0.1:1/0"
    assert [p.name for p in serve_file.parent.iterdir()] == ["serve.json"]  # no temporary file left
