"""The benchmark scripts run end to end (tiny sizes) and print their tables; their numbers are not checked here,
except the on-device parity of bench_accelerator.py, which on a CPU must be within the parity test's tolerance."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, fixtures=None):
    env = dict(os.environ)
    if fixtures is not None:
        env["DETR_JAX_FIXTURES"] = str(fixtures)
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--no-append", *args],
                         capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_bench_train_small_prints_its_table():
    text = _run("bench_train.py", "--small", "--no-memory", "--no-malloc-tuning")
    rows = [line for line in text.splitlines() if line.startswith(("| train step", "| inference"))]
    assert len(rows) == 2, text[-3000:]
    assert "model FLOPs per call" in text and "nan GFLOP" not in text


def test_bench_accelerator_parity_on_cpu_is_within_the_test_tolerance(fixtures_dir):
    text = _run("bench_accelerator.py", "--repeats", "1", "--batch", "2", "--tokens", "48", fixtures=fixtures_dir)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| float32, ")}
    assert len(rows) == 3, text[-3000:]
    for row in rows.values():
        assert row.split("|")[4].strip() == "yes", row
    attention = [line for line in text.splitlines() if line.startswith(("| encoder", "| decoder"))]
    assert len(attention) == 2 * 2 * 5  # 2 cases x 2 dtypes x 5 implementations (cuDNN refused on a CPU)


def test_bench_matcher_and_bench_loader_print_their_tables(tmp_path):
    text = _run("bench_matcher.py", "--repeats", "1", "--shapes", "2x2x10x5,1x3x4x6")
    table = text[text.index("| [L, B, N, M] |"):]
    assert "| [2, 2, 10, 5] |" in table and "| [1, 3, 4, 6] |" in table, text[-2000:]
    text = _run("bench_loader.py", "--num-batches", "1", "--batch-size", "2", "--max-workers", "1", "--num-train", "16",
                "--worker-types", "process", "--sim-images", "512", "--bucket-samples", "512",
                "--data-dir", str(tmp_path / "tfds"))
    assert "| process | 1 |" in text and "1 process vs 8 processes, recipe" in text, text[-3000:]
