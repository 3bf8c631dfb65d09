"""The curate stage's contact sheet: ``report.html`` (self-contained, thumbnails inlined) and
``contact_sheet.png`` (the same samples as one image, for MLflow).

Kept crops are shown as they will be trained on; rejected images as thumbnails of the whole source with
the detected faces outlined in green and the would-be crop in yellow, grouped by reason with the detail.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

MAX_KEPT = 60  # kept crops shown (evenly spread over the id order)
MAX_PER_REASON = 8  # rejected thumbnails shown per reason
TILE = 112  # px, tile side in the PNG sheet


def _spread(rows: list[Any], n: int) -> list[Any]:
    if len(rows) <= n:
        return rows
    return [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]


def _jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _load(path: Path | None, side: int):
    """The image scaled (up or down) to fit a ``side`` square; a grey "no preview" tile without one."""
    from PIL import Image, ImageDraw

    if path is None or not path.is_file():
        im = Image.new("RGB", (side, side), (200, 200, 200))
        ImageDraw.Draw(im).text((8, side // 2 - 6), "no preview", fill=(90, 90, 90))
        return im
    im = Image.open(path).convert("RGB")
    s = side / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                     Image.Resampling.NEAREST if s >= 2 else Image.Resampling.LANCZOS)


def write(out_dir: Path, kept: list[dict], rejected: list[dict], metrics: dict, cache_dir: Path) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    kept_show = _spread(kept, MAX_KEPT)
    # metrics["rejected_by_reason"] lists every reason in curate's order (this module imports no stage).
    rej_show = {reason: [r for r in rejected if r["reason"] == reason][:MAX_PER_REASON]
                for reason in metrics["rejected_by_reason"]}
    rej_show = {k: v for k, v in rej_show.items() if v}

    def data_uri(im) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(_jpeg(im)).decode()

    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>PortraitGen curate report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
             ".grid{display:flex;flex-wrap:wrap;gap:8px}.tile{width:140px;font-size:11px;word-wrap:break-word}"
             ".tile img{display:block;max-width:128px;max-height:128px}.muted{color:#666}</style></head><body>",
             "<h1>Curate report</h1><table>"]
    rows = [("images listed", metrics["total"]), ("kept", metrics["kept"]), ("rejected", metrics["rejected"]),
            ("train / bench_reference", f"{metrics['split']['train']} / {metrics['split']['bench_reference']}"),
            ("captions", ", ".join(f"{k}: {v}" for k, v in metrics["captions"].items())),
            ("analysed / from cache", f"{metrics['processed']} / {metrics['cached']}"),
            ("crop resolution", f"{metrics['resolution']} px")]
    rows += [(f"rejected: {k}", v) for k, v in metrics["rejected_by_reason"].items() if v]
    parts += [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows]
    parts.append(f"</table><h2>Kept ({len(kept_show)} of {len(kept)})</h2><div class='grid'>")
    for r in kept_show:
        im = _load(out_dir / r["image_path"], 128)
        parts.append(f"<div class='tile'><img src='{data_uri(im)}' title='{esc(r['caption'])}'>"
                     f"<b>{esc(r['id'])}</b> <span class='muted'>{esc(r['split'])}</span><br>{esc(r['caption'])}</div>")
    parts.append("</div>")
    for reason, items in rej_show.items():
        total = metrics["rejected_by_reason"][reason]
        parts.append(f"<h2>Rejected: {esc(reason)} ({len(items)} of {total})</h2><div class='grid'>")
        for r in items:
            thumb = cache_dir / r["thumb_file"] if r.get("thumb_file") else None
            im = _load(thumb, 128)
            parts.append(f"<div class='tile'><img src='{data_uri(im)}'><b>{esc(Path(r['source_path']).name)}</b>"
                         f"<br><span class='muted'>{esc(r['detail'])}</span></div>")
        parts.append("</div>")
    parts.append("<p class='muted'>Rejected thumbnails: faces found in green, the crop in yellow.</p></body></html>")
    report = out_dir / "report.html"
    report.write_text("".join(parts), encoding="utf-8")

    # The PNG sheet: a row band of kept crops, then one row per rejection reason.
    cols = 10
    bands: list[tuple[str, list]] = [("kept", [_load(out_dir / r["image_path"], TILE) for r in kept_show])]
    bands += [(f"rejected: {reason}", [_load(cache_dir / r["thumb_file"] if r.get("thumb_file") else None, TILE)
                                       for r in items]) for reason, items in rej_show.items()]
    label_h, pad = 16, 4
    height = sum(label_h + max(1, -(-len(ims) // cols)) * (TILE + pad) for _, ims in bands) + pad
    sheet = Image.new("RGB", (cols * (TILE + pad) + pad, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for label, ims in bands:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += label_h
        for i, im in enumerate(ims):
            r, cidx = divmod(i, cols)
            sheet.paste(im, (pad + cidx * (TILE + pad), y + r * (TILE + pad)))
        y += max(1, -(-len(ims) // cols)) * (TILE + pad)
    sheet_path = out_dir / "contact_sheet.png"
    sheet.save(sheet_path)
    return report, sheet_path
