"""`minivid benchmark`: a dataset (LOVEU-TGVE-2023 CSV or JSONL) through the batch machinery and
`minivid eval`'s metrics into one table (issue 21.5, 21.6)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minivid.cli import main
from minivid.eval.benchmark import DatasetError, format_table, read_dataset, summarize
from minivid.video import save_grid, write_video

HEADER = ("Video name,Our GT caption,Style Change Caption,Object Change Caption,Background Change Caption,"
          "Multiple Changes Caption\n")


@pytest.fixture(scope="module")
def loveu(tmp_path_factory):
    """A three-video dataset in LOVEU-TGVE-2023's layout: two mp4s in one section, a frame folder in another."""
    root = tmp_path_factory.mktemp("loveu")
    g = torch.Generator().manual_seed(0)
    (root / "DAVIS_480p" / "480p_videos").mkdir(parents=True)
    for name in ("clipa", "clipb"):
        write_video(root / "DAVIS_480p" / "480p_videos" / f"{name}.mp4", torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
                    fps=4)
    frames = root / "youtube_480p" / "480p_frames" / "clipc"
    frames.mkdir(parents=True)
    for i in range(3):
        save_grid(frames / f"{i:05d}.png", torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)
    (root / "LOVEU-TGVE-2023_Dataset.csv").write_text(
        HEADER + "DAVIS_480p,,,,,\n"
        "clipa,a red square,a red square in van gogh style,,,\n"
        "clipb,a green disc,,a yellow disc,,\n"
        "youtube_480p,,,,,\n"
        "clipc,noise,,,a cat in the snow,\n")
    return root


def test_reads_loveu_tgve_layout(loveu):
    pairs = read_dataset(loveu)
    assert [(p.id, p.kind, p.source_prompt) for p in pairs] == [
        ("clipa-style", "style", "a red square"), ("clipb-object", "object", "a green disc"),
        ("clipc-background", "background", "noise")]
    assert pairs[0].video.endswith("DAVIS_480p/480p_videos/clipa.mp4")
    assert pairs[2].video.endswith("youtube_480p/480p_frames/clipc") and pairs[2].prompt == "a cat in the snow"
    assert [p.id for p in read_dataset(loveu, limit=2)] == ["clipa-style", "clipb-object"]
    # the CSV path alone works too (videos looked for beside it)
    assert [p.id for p in read_dataset(loveu / "LOVEU-TGVE-2023_Dataset.csv")] == [p.id for p in pairs]


@pytest.mark.parametrize("csv, message", [
    (HEADER + "DAVIS_480p,,,,,\nclipa,x,y,,,\nmissing,x,y,,,\n", r"Dataset.csv:4: video 'missing' not found"),
    ("Video name,Our GT caption\nclipa,x\n", r":1: no prompt column"),
    ("clip,prompt\nclipa,x\n", r":1: no video column"),
    (HEADER + "DAVIS_480p,,,,,\nclipa,x,y,,,\nclipa,x,z,,,\n", r":4: duplicate id 'clipa-style' \(also at .*:3\)"),
])
def test_bad_datasets_are_refused_before_anything_runs(loveu, tmp_path, csv, message):
    bad = tmp_path / "ds"
    bad.mkdir()
    os.symlink(loveu / "DAVIS_480p", bad / "DAVIS_480p")
    (bad / "LOVEU-TGVE-2023_Dataset.csv").write_text(csv)
    with pytest.raises(DatasetError, match=message):
        read_dataset(bad)


def test_bad_dataset_through_the_cli(loveu, tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    plan.write_text(json.dumps({"video": str(loveu / "nothing.mp4"), "prompt": "x"}) + "\n")
    assert main(["benchmark", str(plan), "--tiny", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "plan.jsonl:1: video" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()                           # nothing ran, nothing written
    (tmp_path / "two").mkdir()
    for n in ("a.csv", "b.csv"):
        (tmp_path / "two" / n).write_text(HEADER)
    assert main(["benchmark", str(tmp_path / "two"), "--tiny", "--out", str(tmp_path / "out")]) == 1
    assert "expected one CSV of prompts in the folder, found 2" in capsys.readouterr().err
    assert main(["benchmark", str(loveu), "--method", "cove,sdedit", "--tiny", "--out", str(tmp_path / "o")]) == 1
    assert "unknown sdedit" in capsys.readouterr().err
    assert main(["benchmark", str(loveu), "--method", "i2vedit", "--tiny", "--out", str(tmp_path / "o")]) == 1
    assert "first_frame" in capsys.readouterr().err


def test_summarize_mean_std_n_and_the_papers_number():
    records = [{"metrics": {"subject_consistency": {"value": v},
                            "clip_frame_consistency": {"value": v, "all_pairs": v / 2}}} for v in (0.5, 0.7, 0.9)]
    records.append({"metrics": {"subject_consistency": {"value": float("nan")}}})        # not counted
    t = summarize(records, "cove")
    assert t["subject_consistency"]["n"] == 3 and t["subject_consistency"]["mean"] == pytest.approx(0.7)
    assert t["subject_consistency"]["std"] == pytest.approx(0.2)                          # sample std (n - 1)
    assert t["subject_consistency"]["reported"]["value"] == 0.9731
    assert t["frame_consistency_all_pairs"]["mean"] == pytest.approx(0.35)
    assert "all pairs" in t["frame_consistency_all_pairs"]["definition"]
    assert "consecutive" in t["frame_consistency_consecutive"]["definition"]
    assert "reported" not in summarize(records, "tcve")["subject_consistency"]
    assert t["subject_consistency"]["reported"]["differs"] == ["pairs 3, the paper 115"]    # not COVE's 115 pairs


def test_the_papers_number_is_comparable_only_in_the_papers_setting():
    records = [{"metrics": {"subject_consistency": {"value": 0.9}}}] * 115
    same = summarize(records, "cove", ran={"tiny": False, "frames": None, "size": None})
    assert "differs" not in same["subject_consistency"]["reported"]
    assert "0.9731 (COVE Table 1" in format_table({"cove": same}, {})
    tiny = summarize(records[:2], "cove", ran={"tiny": True, "frames": 2, "size": None})
    assert tiny["subject_consistency"]["reported"]["differs"] == ["pairs 2, the paper 115",
                                                                 "tiny random models, not the official weights"]
    table = format_table({"cove": tiny}, {})
    assert "not comparable (pairs 2, the paper 115; tiny random models" in table and "0.9731" not in table
    ei2 = [{"metrics": {"clip_frame_consistency": {"value": 0.9, "all_pairs": 0.9}}}] * 75
    assert summarize(ei2, "ei2", ran={"tiny": False, "frames": 16, "size": 512})["frame_consistency_all_pairs"][
        "reported"]["differs"] == ["frames 16, the paper 8"]


def _run_benchmark(dataset, out, *extra, ranks=1):
    args = ["benchmark", str(dataset), "--method", "cove", "--tiny", "--frames", "2", "--steps", "1", "--out", str(out),
            "--metrics", "clip_text_alignment,clip_frame_consistency,subject_consistency", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "minivid", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
               "minivid", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.distributed
def test_benchmark_one_process_equals_two_ranks_and_a_rerun_skips(loveu, tmp_path):
    plan = tmp_path / "plan.jsonl"                    # the three pairs, and one whose video is not a video
    (tmp_path / "broken.mp4").write_text("not a video")
    lines = [{"id": p.id, "video": p.video, "prompt": p.prompt, "source_prompt": p.source_prompt}
             for p in read_dataset(loveu)] + [{"id": "broken", "video": str(tmp_path / "broken.mp4"), "prompt": "x"}]
    plan.write_text("".join(json.dumps(x) + "\n" for x in lines))
    one = _run_benchmark(plan, tmp_path / "one")
    assert one.returncode == 1, one.stderr[-3000:]                 # the broken item failed, the others ran
    two = _run_benchmark(plan, tmp_path / "two", ranks=2)
    assert two.returncode == 1, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "benchmark.json").read_text()) for d in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["counts"] == b["counts"] == {"cove": {"scored": 3, "failed": 1}}
    assert set(a["table"]["cove"]) == {"clip_text_alignment", "clip_score", "frame_consistency_consecutive",
                                       "frame_consistency_all_pairs", "subject_consistency"}
    for column, e in a["table"]["cove"].items():
        assert e["n"] == 3
        assert b["table"]["cove"][column]["mean"] == pytest.approx(e["mean"], abs=1e-6)
        assert b["table"]["cove"][column]["std"] == pytest.approx(e["std"], abs=1e-6)
    assert {e["rank"] for e in b["items"]["cove"]} == {0, 1}                         # shared over the ranks
    broken = next(e for e in a["items"]["cove"] if e["id"] == "broken")
    assert broken["status"] == "failed" and (tmp_path / "one" / "cove" / "broken" / "error.json").is_file()
    assert "| cove | subject_consistency |" in (tmp_path / "one" / "benchmark.md").read_text()
    # a rerun skips the finished items (and tries the failed one again)
    stamp = (tmp_path / "one" / "cove" / "clipa-style" / "record.json").stat().st_mtime_ns
    again = _run_benchmark(plan, tmp_path / "one")
    statuses = {e["id"]: e["status"] for e in json.loads((tmp_path / "one" / "benchmark.json").read_text())["items"]["cove"]}
    assert statuses == {"clipa-style": "skipped", "clipb-object": "skipped", "clipc-background": "skipped",
                        "broken": "failed"}, again.stderr[-2000:]
    assert (tmp_path / "one" / "cove" / "clipa-style" / "record.json").stat().st_mtime_ns == stamp


def test_tuned_methods_tune_once_per_source_video(loveu, tmp_path):
    plan = tmp_path / "plan.jsonl"
    video = str(loveu / "DAVIS_480p" / "480p_videos" / "clipa.mp4")
    plan.write_text("".join(json.dumps({"id": f"e{i}", "video": video, "prompt": p, "source_prompt": "a square"}) + "\n"
                            for i, p in enumerate(["a red square", "a blue square"])))
    assert main(["benchmark", str(plan), "--method", "ei2", "--tiny", "--frames", "2", "--steps", "1", "--tune-steps",
                 "1", "--metrics", "clip_frame_consistency", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out" / "ei2"
    assert sorted(p.name for p in out.iterdir()) == ["e0", "e1", "tune-clipa"]
    tune = json.loads((out / "tune-clipa" / "record.json").read_text())
    assert tune["settings"]["prompt"] == "a square" and tune["settings"]["steps"] == 1
    for e in ("e0", "e1"):
        rec = json.loads((out / e / "record.json").read_text())
        assert rec["settings"]["tuned"] == str(out / "tune-clipa")
        assert "clip_frame_consistency" in rec["results"]["eval"]["metrics"]
    table = json.loads((tmp_path / "out" / "benchmark.json").read_text())["table"]["ei2"]
    assert table["frame_consistency_all_pairs"]["n"] == 2
