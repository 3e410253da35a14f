"""Converting FER+ ∪ AffectNet at the `paper` preset's 224 px: peak memory and disk, against the store's size.

At 224 px the real union is ~19 GB of pixels (113k training faces), more than the RAM of many
machines. The conversion decodes into a memory-mapped scratch file and writes the store from it, so its
peak resident memory should stay far below the store's size. This script builds an AffectNet copy in
the data set's own layout (file lists + JPEG images of varied sizes, written here) and a FER+ pair in
the challenge CSV format, converts them in a fresh process at 224 px, and reports the child's peak RSS
(``ru_maxrss``), wall time and the store's size. The images are synthetic (reduced setting): the
memory figures depend on the pixel count, not on what the faces show.

    python benchmarks/bench_prepare.py [--num-affectnet 3000] [--num-fer 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from occkd_core.data.affectnet import AFFECTNET_HEADER  # noqa: E402

FER_VOTES_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def write_fer(folder: Path, num_rows: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    usages = ["Training", "PublicTest", "PrivateTest"]
    rows, votes = ["emotion,pixels,Usage"], [FER_VOTES_HEADER]
    for index in range(num_rows):
        usage = usages[0] if index < num_rows * 0.8 else usages[1 + index % 2]
        pixels = " ".join(map(str, rng.integers(0, 256, 48 * 48)))
        rows.append(f"0,{pixels},{usage}")
        counts = [0] * 10
        counts[index % 8] = 10
        votes.append(f"{usage},fer{index:07d}.png," + ",".join(map(str, counts)))
    (folder / "fer2013.csv").write_text("\n".join(rows) + "\n")
    (folder / "fer2013new.csv").write_text("\n".join(votes) + "\n")


def write_affectnet(root: Path, num_images: int, rng: np.random.Generator) -> None:
    lists, images = root / "Manually_Annotated_file_lists", root / "Manually_Annotated_Images"
    lists.mkdir(parents=True)
    num_test = max(8, num_images // 20)
    for file_name, count in (("training.csv", num_images - num_test), ("validation.csv", num_test)):
        lines = [",".join(AFFECTNET_HEADER)]
        for index in range(count):
            side = int(rng.integers(180, 420))  # AffectNet's images vary in size
            rel = f"{index % 50}/{file_name[:5]}{index:06d}.jpg"
            path = images / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, quality=85)
            box = (side // 8, side // 8, side * 3 // 4, side * 3 // 4)
            landmarks = ";".join(["1.0"] * 136)
            lines.append(f"{rel},{box[0]},{box[1]},{box[2]},{box[3]},{landmarks},{index % 8},0.1,0.1")
        (lists / file_name).write_text("\n".join(lines) + "\n")


# ru_maxrss counts mapped file pages too, which the kernel can drop and re-read under pressure; the
# anonymous part (RssAnon: heap, numpy arrays in RAM) is what must fit. Linux has no peak counter for
# it, so a thread samples /proc/self/status every 20 ms.
CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
from occkd_core.data.sources import prepare_real_data
peak = {"anon": 0}
done = threading.Event()
def sample():
    while not done.is_set():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        time.sleep(0.02)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
path = prepare_real_data("fer", Path(sys.argv[1]), Path(sys.argv[2]), union_size=int(sys.argv[3]))
seconds = time.perf_counter() - start
done.set()
thread.join()
print(json.dumps({"seconds": seconds, "store_bytes": path.stat().st_size, "peak_anon_bytes": peak["anon"],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def convert(root: Path, cache: Path, size: int, repo: Path) -> dict:
    """Convert in a fresh Python process, so its peak memory is the conversion's alone."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(cache), str(size)],
                         capture_output=True, text=True, check=True, cwd=repo)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-affectnet", type=int, default=3000)
    parser.add_argument("--num-fer", type=int, default=600)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout whose occkd_core converts (e.g. a worktree of an older commit, to compare)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_fer(root / "ferplus", args.num_fer, rng)
        write_affectnet(root / "affectnet", args.num_affectnet, rng)
        for size in (48, 224):
            result = convert(root, Path(tmp) / f"cache{size}", size, args.repo)
            rows.append((f"{size} px", args.num_fer + args.num_affectnet, result["store_bytes"] / 1e9,
                         result["peak_anon_bytes"] / 1e9, result["peak_rss_bytes"] / 1e9, result["seconds"]))
    print(machine_line())
    print()
    print(f"occkd_core from {args.repo}\n")
    print(markdown_table(("stored size", "faces (FER+ + AffectNet)", "store on disk, GB",
                          "peak anonymous RSS, GB", "peak RSS incl. mapped file pages, GB", "seconds"), rows))
    print("\nSynthetic images in the data sets' own formats (a reduced setting: "
          f"{args.num_affectnet} AffectNet JPEGs of 180-420 px, {args.num_fer} FER+ rows).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
