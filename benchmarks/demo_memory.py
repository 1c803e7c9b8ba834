"""Memory a demo session holds: resident MB per session after each uploads large images (and gets an answer).

    python benchmarks/demo_memory.py [--sessions 5] [--images 4] [--side 4096]

Each session sends one message with `--images` PNG uploads of `--side` x `--side` pixels (small
files: flat colours compress well) to a `DemoChat` over a tiny model whose image processor reads
224 x 224 (BLIP-2's size), and is kept alive afterwards, as Gradio's session state keeps it. Prints
the process's resident memory before and after, the difference per session, and the pixel bytes a
session's images hold. Uses only `DemoChat.submit`, so it measures older versions of the demo too.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from textbind.config import ModelConfig
from textbind.generation import InterleavedGenerator
from textbind.model.builder import build_model
from textbind.serve.chat import DemoChat, DemoSettings
from textbind.tiny import TinySizes, build_tiny_pretrained


def resident_megabytes() -> float:
    """Resident set size of this process (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def large_upload(path: Path, side: int, index: int) -> Path:
    image = Image.new("RGB", (side, side), (255, 255, 255))
    colour = ((60 * index) % 256, 80, 200)
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=colour)
    image.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--images", type=int, default=4, help="uploads per session (the demo allows 4)")
    parser.add_argument("--side", type=int, default=4096, help="upload width and height in pixels")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        paths = build_tiny_pretrained(root / "tiny", seed=0, sizes=TinySizes(image_size=224, patch_size=32))
        bundle = build_model(ModelConfig(**paths, trainable=[]))
        bundle.model.eval()
        generator = InterleavedGenerator.from_bundle(bundle, None)
        settings = DemoSettings(output_dir=str(root / "out"), max_upload_bytes=64 << 20)
        chat = DemoChat(generator, settings)
        uploads = [str(large_upload(root / f"upload{index}.png", args.side, index)) for index in range(args.images)]
        options = {"decoding": "greedy", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4,
                   "generate_images": False, "seed": 0}
        size = sum(Path(path).stat().st_size for path in uploads) / 1024
        print(f"{args.images} uploads of {args.side}x{args.side} pixels per session ({size:.0f} kB of files)")
        list(chat.submit(None, "What do you see?", uploads[:1], options))  # warm-up: first-call allocations
        gc.collect()
        before = resident_megabytes()
        sessions = []
        for _ in range(args.sessions):
            final = list(chat.submit(None, "What do you see?", uploads, options))[-1]
            assert final.session is not None and final.result is not None and not final.result.refused
            sessions.append(final.session)
        gc.collect()
        after = resident_megabytes()
        per_session = (after - before) / args.sessions
        print(f"resident memory: {before:.0f} MB before, {after:.0f} MB with {args.sessions} sessions")
        print(f"per session: {per_session:.1f} MB")
        image_bytes = getattr(sessions[0], "image_bytes", None)
        if image_bytes is None:  # older demos: count the pixels of the kept images directly
            image_bytes = sum(len(image.getbands()) * image.width * image.height
                              for turn in sessions[0].turns for image in turn.image_list)
        print(f"pixel bytes held by a session's images: {image_bytes / (1 << 20):.2f} MB")
        chat.close()


if __name__ == "__main__":
    main()
