"""How fast does listing take names? `list_images` on a folder of N files and on a manifest of N lines.

Times the checkout this runs from (run it once with PYTHONPATH=main, once with a branch, to
compare): a folder tree of N empty `.jpg` files (1,000 a folder), a manifest of the same N
absolute paths, and each again with one name in 1,000 not UTF-8 (a Latin-1 byte, the `%XX`
path of `raypose.inputs.names`; a checkout without it fails there, which the table says).
The files are made once under --out and reused. Best of --repeats runs, in this process: wall
seconds and CPU seconds (user + system, this process; steadier than wall time on a shared machine).

    python benchmarks/listing_names.py --images 200000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from raypose.config.spec import ImagesSpec  # noqa: E402
from raypose.inputs.listing import list_images  # noqa: E402


def make_inputs(out: Path, images: int, latin1: bool) -> tuple[Path, Path]:
    """A folder of `images` empty files and a manifest of their paths; with `latin1`, one name in 1,000 is not UTF-8."""
    tag = f"{images}-{'latin1' if latin1 else 'utf8'}"
    folder, manifest = out / f"folder-{tag}", out / f"manifest-{tag}.txt"
    if not manifest.exists():
        names = []
        for i in range(images):
            sub = os.fsencode(folder / f"{i // 1000:05d}")
            if i % 1000 == 0:
                os.makedirs(sub, exist_ok=True)
            name = sub + (b"/caf\xe9-%09d.jpg" % i if latin1 and i % 1000 == 7 else b"/%09d.jpg" % i)
            open(name, "wb").close()
            names.append(name)
        manifest.write_bytes(b"".join(n + b"\n" for n in names))
    return folder, manifest


def best_seconds(path: Path, repeats: int) -> dict[str, float] | str:
    """The best wall and CPU seconds of `repeats` listings, or the error an older checkout raises."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            listing = list_images(ImagesSpec(path=str(path)))
        except Exception as exc:  # an older checkout on non-UTF-8 names
            return f"{type(exc).__name__}"
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        table = getattr(listing, "images", listing)  # a Listing here, a table before
        assert table.num_rows > 0
    return {"wall": round(min(wall), 3), "cpu": round(min(cpu), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out/listing"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for latin1 in (False, True):
        folder, manifest = make_inputs(args.out, args.images, latin1)
        for kind, path in (("folder", folder), ("manifest", manifest)):
            results[f"{kind}, {'1 in 1,000 Latin-1' if latin1 else 'UTF-8'}"] = best_seconds(path, args.repeats)
    import raypose

    print(json.dumps({"checkout": str(Path(raypose.__file__).parent.parent), "images": args.images,
                      "seconds": results}, indent=1))


if __name__ == "__main__":
    main()
