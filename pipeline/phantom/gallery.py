"""The gallery `docs/phantom.png`: one phantom radiograph per finding with its truth box, beside a
no-finding image of the same anatomy, so that a reader can judge whether each looks like its name."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.base.vocab import FINDINGS, NO_FINDING
from pipeline.phantom import anatomy, build


def gallery(path, seed: int = 0, size: int = 1024, tile: int = 512, difficulty=0.0, view: str = "PA") -> Path:
    """Render one image per finding (plus one without) on anatomy variant 0 and save a 5 x 3 montage."""
    anatomy.load_atlas()
    job = {"seed": int(seed), "size": int(size), "difficulty": build.parse_difficulty(difficulty)}
    names = [NO_FINDING, *FINDINGS]
    cols = 5
    rows = -(-len(names) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), "black")
    font = ImageFont.load_default(size=max(12, tile // 20))
    scale = tile / size
    for k, name in enumerate(names):
        item = {"index": 10_000 + k, "image": "", "variant": 0, "view": view,
                "findings": [] if name == NO_FINDING else [name]}
        img, truth = build.render_image(job, item)
        im = Image.fromarray(img).resize((tile, tile), Image.LANCZOS).convert("RGB")
        draw = ImageDraw.Draw(im)
        for _, x, y, w, h in truth:
            draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(255, 40, 40),
                           width=max(2, tile // 170))
        draw.text((8, 6), name.replace("_", " "), fill=(255, 230, 0), font=font)
        sheet.paste(im, ((k % cols) * tile, (k // cols) * tile))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/phantom.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--view", default="PA", choices=["PA", "AP"])
    p.add_argument("--difficulty", default="default")
    a = p.parse_args()
    print(gallery(a.out, seed=a.seed, view=a.view, difficulty=a.difficulty))
