"""bench/bench_gpu.py on the CPU with the tiny preset: every figure is in its JSON and the phases agree."""
from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gpu


@pytest.fixture
def one_thread():
    # The shared 2-core machine: two intra-op threads next to other jobs make a tiny step 10x slower.
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_cpu_run_writes_every_figure(tmp_path, one_thread, capsys):
    out = tmp_path / "bench.json"
    rc = bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "4", "--samples", "60",
                         "--image-text-batch", "4", "--region-batch", "4", "--region-max-images", "2",
                         "--workers", "0", "--cpu-threads", "1", "--peak-tflops", "1", "--compile", "off",
                         "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loader keeps up:" in printed and "(a)/(b) images/s" in printed
    r = json.loads(out.read_text())
    fed, replay, alone = r["fed"], r["replay"], r["loader_alone"]
    assert r["config"]["preset"] == "tiny" and r["config"]["mode"] == "summed"
    assert r["precision"] == "fp32" and r["params"] > 1_000_000
    # (b) replays exactly the steps of (a): same batches, same images and text rows, same FLOPs.
    assert fed["steps"] == replay["steps"] == 2
    assert (fed["batches"], fed["images"], fed["text_rows"], fed["flops"]) == \
        (replay["batches"], replay["images"], replay["text_rows"], replay["flops"])
    assert fed["batches"] >= 3  # warmup 4 puts a region batch into the timed steps (seeded plan)
    for phase in (fed, replay, alone):
        assert phase["images_per_s"] > 0 and phase["text_rows_per_s"] >= phase["images_per_s"]
    assert 0.0 <= fed["data_wait_frac"] < 1.0 and replay["data_wait_frac"] == 0.0
    # FLOPs: counted per batch shape, both kinds present, a step sums its batches.
    shapes = r["flops_by_batch_shape"]
    assert any(k.startswith("region") for k in shapes) and any(k.startswith("image_text") for k in shapes)
    assert all(v > 0 for v in shapes.values())
    assert r["flops_per_step"] == pytest.approx(fed["flops"] / fed["steps"])
    assert min(shapes.values()) <= r["flops_per_step"] <= sum(shapes.values()) * fed["batches"]
    # MFU against the given peak (1 TFLOP/s): achieved TFLOP/s over 1.
    assert r["peak_flops"] == 1e12
    assert fed["mfu"] == pytest.approx(fed["tflops_per_s"]) and fed["mfu"] > 0
    assert r["fed_over_replay"] == pytest.approx(fed["images_per_s"] / replay["images_per_s"])
    assert r["loader_keeps_up"] == (r["fed_over_replay"] >= bench_gpu.KEEPS_UP)
    assert r["loader_over_compute"] > 0
    assert "peak_allocated_gib" not in r["memory"]  # n/a on CPU


def test_peak_table_by_device_name():
    assert bench_gpu.peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_gpu.peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert bench_gpu.peak_for_name("NVIDIA H200") == 989e12
    assert bench_gpu.peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench_gpu.peak_for_name("NVIDIA GeForce RTX 3090") is None


def test_bad_arguments_are_user_errors(capsys):
    assert bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench_gpu.main(["--preset", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_synthesize_once_then_read_with_dataset(tmp_path, one_thread, capsys):
    """bench/gpu_check.sh's flow: --synthesize-only makes the data once, later runs read it through --dataset."""
    data = tmp_path / "data"
    assert bench_gpu.main(["--synthesize-only", str(data), "--samples", "60"]) == 0
    assert "synthesized 60 images in 1 part(s)" in capsys.readouterr().out
    parts = sorted(p for p in data.iterdir() if p.name.startswith("part-"))
    assert [p.name for p in parts] == ["part-000"] and (parts[0] / "manifest.json").exists()
    out = tmp_path / "bench.json"
    rc = bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "2",
                         "--image-text-batch", "4", "--region-batch", "4", "--region-max-images", "2",
                         "--workers", "0", "--cpu-threads", "1", "--dataset", str(parts[0]), "--compile", "off",
                         "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["config"]["data"] == str(parts[0])
    assert r["fed"]["images"] == r["replay"]["images"] > 0
    assert (data / "part-000").exists()  # a --dataset is read, never deleted


def test_eager_and_compiled_side_by_side(tmp_path, one_thread, capsys):
    """--compile both: the eager and the compiled trainer in one run (dynamo's eager backend: the flow, quickly)."""
    out = tmp_path / "bench.json"
    rc = bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "2", "--samples", "60",
                         "--image-text-batch", "4", "--region-batch", "4", "--region-max-images", "2",
                         "--workers", "0", "--cpu-threads", "1", "--peak-tflops", "1", "--compile", "both",
                         "--compile-backend", "eager", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "=== eager" in printed and "=== compiled" in printed and "compiled / eager images/s" in printed
    r = json.loads(out.read_text())
    eager, compiled = r["modes"]["eager"], r["modes"]["compiled"]
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    for m in (eager, compiled):
        assert m["warmup"]["kinds"] == ["image_text", "region"] and m["warmup"]["steps"] >= 2
        assert m["fed"]["images_per_s"] > 0 and m["replay"]["mfu"] > 0
    # the same batches in both (seeded plan), the same useful FLOPs (counted eagerly on the real rows)
    assert (eager["fed"]["images"], eager["fed"]["flops"]) == (compiled["fed"]["images"], compiled["fed"]["flops"])
    assert r["compiled_over_eager"]["replay"] == pytest.approx(
        compiled["replay"]["images_per_s"] / eager["replay"]["images_per_s"])
    assert r["compile_s"] == pytest.approx(compiled["warmup"]["overhead_s"] - eager["warmup"]["overhead_s"])
